"""Dictionaries and objectives against plain dense re-statements of the seed's Matryoshka math."""
from __future__ import annotations

import pytest
import torch

from matryoshka.train.dictionary import Dictionary
from matryoshka.train.objectives import Objective
from matryoshka.train.sparse import Code, batch_topk, row_topk

GROUPS = [4, 8, 20]  # width 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # tests/test_gpu.py has the rest of the GPU checks


def _dic(seed=0, transcoder=False, d_in=12, d_out=12, arch="matryoshka", k=3, skip=False):
    torch.manual_seed(seed)
    return Dictionary(d_in, d_out, sum(GROUPS), k, arch, GROUPS if arch == "matryoshka" else None,
                      transcoder=transcoder, skip=skip)


def _x(b=16, d=12, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def test_sparse_prefixes_equal_dense_prefixes():
    dic = _dic()
    x = _x()
    acts = dic.pre_acts(x)
    for code in (batch_topk(acts, 3), row_topk(acts, 5)):
        dense = code.dense()
        got = dic.prefixes(code, x)
        start = 0
        recon = dic.b_dec.expand(len(x), -1)
        for g, size in enumerate(GROUPS):
            recon = recon + dense[:, start:start + size] @ dic.W_dec[start:start + size]
            start += size
            torch.testing.assert_close(got[:, g], recon, rtol=1e-5, atol=1e-6)


def test_batch_topk_breaks_ties_at_the_threshold_in_row_major_order():
    acts = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 0.5]])
    code = batch_topk(acts, 1)  # k * B = 2: the 3, then the first of four 1s
    assert code.rows.tolist() == [0, 0] and code.latents.tolist() == [0, 1] and code.values.tolist() == [3.0, 1.0]
    big = torch.ones(64, 64)
    bigger = torch.tensor([5, 700, 701, 2000, 4095])
    big.view(-1)[bigger] = 2.0
    code = batch_topk(big, 2)  # 128: the five 2s, then the first 123 of the 1s
    flat = (code.rows * 64 + code.latents).tolist()
    ones = [i for i in range(4096) if i not in bigger.tolist()][:123]
    assert flat == sorted(bigger.tolist() + ones)


def test_batch_topk_is_one_selection_for_the_whole_batch():
    acts = torch.relu(_x(8, 32))
    code = batch_topk(acts, 2)
    dense = code.dense()
    assert (dense > 0).sum() == 16
    assert dense[dense > 0].min() >= acts.flatten().topk(16).values.min()
    assert not torch.equal((dense > 0).sum(1), torch.full((8,), 2))  # rows get different counts


def seed_step(dic: Dictionary, x: torch.Tensor, inactive: torch.Tensor, threshold: float, k: int):
    """One training step of the seed's GlobalBatchTopKMatryoshkaSAE (``dic.arch == "matryoshka"``) or of its
    BatchTopKSAE (``"batchtopk"``), written out densely and plainly."""
    W_enc = dic.W_enc.detach().clone().requires_grad_()
    W_dec = dic.W_dec.detach().clone().requires_grad_()
    b_dec = dic.b_dec.detach().clone().requires_grad_()
    inactive = inactive.clone().float()
    B = x.shape[0]
    acts = torch.relu((x - b_dec) @ W_enc)
    top = torch.topk(acts.flatten(), k * B)
    acts_topk = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
    positive = acts_topk > 0
    threshold = 0.99 * threshold + 0.01 * acts_topk[positive].min().item()
    inactive += (acts_topk.sum(0) == 0).float()
    inactive[acts_topk.sum(0) > 0] = 0
    if dic.arch == "matryoshka":  # the mean of the bias-only and every prefix's mse
        recon = b_dec
        total = (b_dec - x).pow(2).mean()
        start = 0
        for size in GROUPS:
            recon = acts_topk[:, start:start + size] @ W_dec[start:start + size] + recon
            total = total + (recon - x).pow(2).mean()
            start += size
        loss = total / (len(GROUPS) + 1)
    else:  # BatchTopKSAE: the reconstruction's mse alone
        recon = acts_topk @ W_dec + b_dec
        loss = (recon - x).pow(2).mean()
    dead = inactive >= 20
    if dead.sum() > 0:
        residual = x - recon
        t = torch.topk(acts[:, dead], min(512, int(dead.sum())), dim=-1)
        acts_aux = torch.zeros_like(acts[:, dead]).scatter(-1, t.indices, t.values)
        aux_recon = acts_aux @ W_dec[dead]
        if dic.arch != "matryoshka" or aux_recon.abs().sum() > 0:  # only the Matryoshka class skips a silent aux
            loss = loss + (1 / 32) * (aux_recon - residual).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        normed = W_dec / W_dec.norm(dim=-1, keepdim=True)
        W_dec.grad -= (W_dec.grad * normed).sum(-1, keepdim=True) * normed
        W_dec.data = normed
    torch.optim.Adam([W_enc, W_dec, b_dec], lr=3e-4, betas=(0.9, 0.99)).step()
    return loss.detach(), W_enc.detach(), W_dec.detach(), b_dec.detach(), inactive, threshold


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["matryoshka", "batchtopk"])
@pytest.mark.parametrize("n_dead, silent", [(0, False), (10, False), (10, True)])
def test_reference_step_equals_the_seed(n_dead, silent, arch, device):
    """``silent``: the dead latents' encoder columns are 0, so no dead pre-activation is positive."""
    torch.set_default_dtype(torch.float64)
    try:
        dic = _dic(arch=arch).to(device)
        with torch.no_grad():
            dic.b_dec.normal_(0, 0.1)
            if silent:
                dic.W_enc[:, :n_dead] = 0
        dic.threshold.fill_(0.05)
        obj = Objective(dic, "reference")
        obj.inactive[:n_dead] = 25  # these latents count as dead (their counter passed 20)
        x = _x().to(device)
        before = obj.inactive.clone()
        loss, W_enc, W_dec, b_dec, inactive, threshold = seed_step(dic, x, before, 0.05, k=3)

        opt = torch.optim.Adam([dic.W_enc, dic.W_dec, dic.b_dec], lr=3e-4, betas=(0.9, 0.99))
        out = obj(x, x)
        out.loss.backward()
        obj.before_step()
        opt.step()
        obj.after_step()
        assert (out.aux > 0) == (n_dead > 0 and not (silent and arch == "matryoshka"))
        torch.testing.assert_close(out.loss, loss)
        torch.testing.assert_close(dic.W_enc.detach(), W_enc)
        torch.testing.assert_close(dic.W_dec.detach(), W_dec)
        torch.testing.assert_close(dic.b_dec.detach(), b_dec)
        torch.testing.assert_close(obj.inactive.double(), inactive.double())
        assert dic.threshold.item() == pytest.approx(threshold)
    finally:
        torch.set_default_dtype(torch.float32)


def test_loss_by_hand_on_a_tiny_case():
    """Two groups of one latent, d = 1: every term computed by hand."""
    dic = Dictionary(1, 1, 2, k=1, arch="matryoshka", group_sizes=[1, 1])
    with torch.no_grad():
        dic.W_enc.copy_(torch.tensor([[1.0, 2.0]]))
        dic.W_dec.copy_(torch.tensor([[1.0], [1.0]]))
        dic.b_dec.zero_()
    x = torch.tensor([[1.0], [3.0]])  # acts: [1, 2] and [3, 6]; batch top-2 keeps 6 and 3 (row 2)
    out = Objective(dic, "reference")(x, x)
    # row 1 reconstructs 0 then 0; row 2 reconstructs 3 then 9. mse(b_dec)=(1+9)/2=5,
    # prefix1=((1-0)^2+(3-3)^2)/2=0.5, prefix2=((1-0)^2+(3-9)^2)/2=18.5 -> (5+0.5+18.5)/3 = 8
    assert out.main.item() == pytest.approx(8.0)
    assert out.prefix_mse.tolist() == pytest.approx([0.5, 18.5])
    assert dic.threshold.item() == pytest.approx(0.01 * 3)  # reference EMA from 0, min selected = 3


def test_default_threshold_warm_start_and_detached_aux():
    dic = _dic()
    obj = Objective(dic, "default", dead_tokens=10)
    x = _x()
    out = obj(x, x)
    assert dic.threshold.item() == pytest.approx(out.code.values.min().item())  # warm start, not 0.01 * min
    assert set(obj.inactive.unique().tolist()) == {0, 16}  # counted in tokens: a batch of 16 rows
    for kind, expect in (("reference", True), ("default", False)):
        obj = Objective(_dic(), kind, dead_tokens=1)
        obj.inactive[:10] = 25
        out = obj(x, x)
        live = torch.unique(out.code.latents)
        grad = torch.autograd.grad(out.aux, obj.dic.W_dec)[0][live]
        # the default's aux trains dead latents only; the seed's also pulls the live latents' decoder rows
        assert bool(grad.abs().sum() > 0) == expect


def test_dead_counting():
    dic = _dic()
    ref = Objective(dic, "reference")
    code = Code(torch.tensor([0, 1]), torch.tensor([3, 5]), torch.tensor([1.0, 1.0]), 4, 32)
    ref.inactive[:] = 19
    ref._update_inactive(code, 4)
    assert ref.inactive[3] == 0 and ref.inactive[5] == 0 and ref.inactive[0] == 20
    assert ref.dead_mask().sum() == 30  # dead at 20 steps without firing
    dflt = Objective(_dic(), "default", dead_tokens=100)
    dflt.inactive[:] = 97
    dflt._update_inactive(code, 4)
    assert dflt.inactive[0] == 101 and dflt.dead_mask().sum() == 30


def test_decoder_projection_and_norm():
    for kind in ("reference", "default"):
        dic = _dic()
        obj = Objective(dic, kind)
        out = obj(_x(), _x())
        out.loss.backward()
        obj.before_step()
        W, g = dic.W_dec.detach(), dic.W_dec.grad
        radial = (g * W / W.norm(dim=-1, keepdim=True)).sum(-1)
        assert radial.abs().max() < 1e-6  # the gradient has no component along each row
        torch.optim.Adam(dic.parameters(), lr=1e-2).step()
        obj.after_step()
        norms = dic.W_dec.detach().norm(dim=-1)
        if kind == "default":
            torch.testing.assert_close(norms, torch.ones_like(norms))  # unit norm after the step
        else:
            assert (norms - 1).abs().max() > 1e-4  # the seed renormalises before the step


def test_transcoder_and_skip():
    dic = _dic(transcoder=True, d_in=12, d_out=6, skip=True)
    assert dic.b_enc is not None and dic.W_skip.shape == (12, 6)
    x = _x()
    acts = dic.encode(x)
    with torch.no_grad():
        dic.W_skip.normal_()
    torch.testing.assert_close(dic.decode(dic.encode(x), x), dic(x))
    with pytest.raises(ValueError, match="skip connection"):
        dic.decode(acts)
    assert acts.shape == (16, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transcoder", [False, True])
def test_sparse_encoder_backward_equals_dense_autograd(transcoder, device):
    """The encoder's backward touches only selected entries, yet gives dense autograd's gradients."""
    dic = _dic(transcoder=transcoder, d_out=12).to(device)
    with torch.no_grad():
        dic.b_dec.normal_()
        if dic.b_enc is not None:
            dic.b_enc.normal_(0, 0.1)
    x = _x().to(device)
    code = batch_topk(dic.pre_acts(x), 3)
    weights = torch.randn(len(code.values)).to(device)
    sparse = (dic.attach(x, code.rows, code.latents, code.values) * weights).sum()
    params = [p for p in (dic.W_enc, dic.b_enc, dic.b_dec) if p is not None]
    got = torch.autograd.grad(sparse, params, allow_unused=True)
    h = (x if transcoder else x - dic.b_dec) @ dic.W_enc + (dic.b_enc if transcoder else 0)
    dense = (torch.relu(h)[code.rows, code.latents] * weights).sum()
    want = torch.autograd.grad(dense, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, k", [((256, 512), 4), ((64, 96), 1), ((32, 1024), 16), ((4, 8), 2)])
def test_batch_topk_prefilter_is_exact(shape, k):
    acts = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(k)))
    code = batch_topk(acts, k)
    vals, idx = torch.topk(acts.flatten(), k * shape[0])
    want = torch.sort(idx[vals > 0]).values
    assert torch.equal(code.rows * shape[1] + code.latents, want)
    assert torch.equal(code.values, acts.flatten()[want])  # (no ties in Gaussian data: the same set)


def _tiny(arch: str, groups=None) -> Dictionary:
    """d = 1, three latents with unit decoder rows; latent 2's pre-activation is never positive."""
    dic = Dictionary(1, 1, 3, k=1, arch=arch, group_sizes=groups)
    with torch.no_grad():
        dic.W_enc.copy_(torch.tensor([[1.0, 2.0, -1.0]]))
        dic.W_dec.copy_(torch.tensor([[1.0], [1.0], [1.0]]))
        dic.b_dec.zero_()
    return dic


TINY_X = torch.tensor([[1.0], [3.0]])  # acts [1, 2, 0] and [3, 6, 0]; batch top-2 keeps 6 and 3 (row 2)


@pytest.mark.parametrize("kind", ["reference", "default"])
def test_baselines_use_the_standard_loss_by_hand(kind):
    """BatchTopK and TopK: mse(x_hat, x), with no bias-only term averaged in (that was (5 + 18.5) / 2)."""
    out = Objective(_tiny("batchtopk"), kind)(TINY_X, TINY_X)
    # reconstructions 0 and 3 + 6 = 9: ((1 - 0)^2 + (3 - 9)^2) / 2
    assert out.main.item() == out.loss.item() == pytest.approx(18.5)
    if kind == "default":  # (the reference has no topk)
        out = Objective(_tiny("topk"), kind)(TINY_X, TINY_X)
        # each row's top 1 is latent 1: reconstructions 2 and 6; ((1 - 2)^2 + (3 - 6)^2) / 2
        assert out.main.item() == out.loss.item() == pytest.approx(5.0)
    out = Objective(_tiny("matryoshka", [1, 2]), kind)(TINY_X, TINY_X)
    assert out.main.item() == pytest.approx((5 + 0.5 + 18.5) / 3)  # the Matryoshka keeps the seed's mean


@pytest.mark.parametrize("arch, kind, aux, live_grad", [
    ("matryoshka", "reference", 0.0, 0.0),         # the seed's Matryoshka skips a silent aux
    ("batchtopk", "reference", 18.5 / 32, 36 / 32),  # its BatchTopKSAE keeps it, and it trains live latents
    ("matryoshka", "default", 18.5 / 32, 0.0),     # default: kept as a constant (detached residual)
    ("batchtopk", "default", 18.5 / 32, 0.0),
])
def test_aux_when_no_dead_latent_fires_by_hand(arch, kind, aux, live_grad):
    """Latent 2 is dead and its pre-activation is never positive, so the dead latents decode to 0. The
    residual is x - x_hat = [1 - 0, 3 - 9], so mse(0, residual) = (1 + 36) / 2 = 18.5."""
    dic = _tiny(arch, [1, 2] if arch == "matryoshka" else None)
    obj = Objective(dic, kind, dead_tokens=1)
    obj.inactive[2] = 25
    out = obj(TINY_X, TINY_X)
    assert out.aux.item() == pytest.approx(aux)
    assert out.loss.item() == pytest.approx(out.main.item() + aux)
    grads = torch.autograd.grad(out.aux, [dic.W_enc, dic.W_dec, dic.b_dec], allow_unused=True)
    # d aux / d W_dec[1] = (1/32) * r_2 * d r_2 / d W_dec[1] = (1/32) * (3 - 9) * (-6), r_2 = 3 - (3 W_0 + 6 W_1)
    assert grads[1][1].item() == pytest.approx(live_grad)
    if live_grad == 0:
        assert all(g is None or not g.abs().any() for g in grads)  # the term moves no weight at all
