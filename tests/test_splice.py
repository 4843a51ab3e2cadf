"""Downstream LM metrics: known answers for splices into tiny GPT-2 and Gemma-2 models, on caches the
tests harvest with the real harvest."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import zarr

from helpers import harvest_config
from matryoshka.cache import Cache, CacheError
from matryoshka.config import SITES, ConfigError
from matryoshka.evaluate.splice import LM, Splice, constant, dictionary_fn, no_lm_reason
from matryoshka.harvest import harvest
from matryoshka.models import Capture, load_model, model_info
from matryoshka.train.dictionary import Dictionary

LAYER = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is much faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(model_dir, corpus, tmp_path_factory) -> Cache:
    """Every site of layer 1; 4 held-out contexts of 32 tokens, each starting with BOS."""
    return Cache(harvest(harvest_config(model_dir, corpus, tmp_path_factory.mktemp("s") / "cache"), progress=False))


@pytest.fixture(scope="module")
def lm(cache) -> LM:
    return LM.load(cache, tokens=128, batch_size=3, device="cpu")  # two batches, the second one short


def _block(lm: LM):
    """A copy of the spliced block: its modules, called inside a splice, must not run the splice's hooks."""
    return copy.deepcopy((lm.model.transformer.h if lm.arch == "gpt2" else lm.model.model.layers)[LAYER])


def _mlp_of_mlp_in(lm: LM):
    """mlp_out as an exact function of mlp_in (the block's own modules)."""
    b = _block(lm)
    return b.mlp if lm.arch == "gpt2" else lambda x: b.post_feedforward_layernorm(b.mlp(x))


def _mlp_of_resid_mid(lm: LM):
    """mlp_out as an exact function of resid_mid: a perfect transcoder."""
    b, mlp = _block(lm), _mlp_of_mlp_in(lm)
    return lambda x: mlp(b.ln_2(x) if lm.arch == "gpt2" else b.pre_feedforward_layernorm(x))


def _site(s: str) -> str:
    return f"{LAYER}.{s}"


def test_identity_splices_change_nothing_at_every_site(lm):
    splices = {s: Splice(_site(s), lambda x: x) for s in SITES}
    splices["tc resid_mid->mlp_out"] = Splice(_site("mlp_out"), _mlp_of_resid_mid(lm), _site("resid_mid"))
    splices["tc mlp_in->mlp_out"] = Splice(_site("mlp_out"), _mlp_of_mlp_in(lm), _site("mlp_in"))
    clean, out, n = lm.compare(splices)
    assert n == 4 * 30 and clean > 0
    for name, (ce, kl) in out.items():
        assert ce == clean and kl == 0.0, name


@pytest.mark.parametrize("site", ["resid_mid", "mlp_out"])
def test_identity_dictionary_recovers_all_of_the_loss(lm, site):
    """A real Dictionary that is exactly the identity (relu(x) and relu(-x), decoded by +I and -I),
    through the same path as a trained run: CE recovered 1 against both ablations, KL 0."""
    d = lm.cache.manifest["arrays"][_site(site)]["width"]
    dic = Dictionary(d, d, 2 * d, 1, "batchtopk")
    eye = torch.eye(d)
    with torch.no_grad():
        dic.W_enc.copy_(torch.cat([eye, -eye], 1))
        dic.W_dec.copy_(torch.cat([eye, -eye], 0))
        dic.b_dec.zero_()
    r = lm.downstream(dictionary_fn(dic.eval()), _site(site))
    assert r["ce_spliced"] == r["ce_clean"] and r["kl"] == 0.0
    assert r["ce_recovered_zero"] == 1.0 and r["ce_recovered_mean"] == 1.0
    assert r["ce_zero_ablated"] != r["ce_clean"] and r["ce_mean_ablated"] != r["ce_clean"]  # random weights: either way
    assert (r["sequences"], r["tokens"]) == (4, 4 * 30)


def test_transcoder_identity_recovers_all_of_the_loss(lm):
    r = lm.downstream(_mlp_of_resid_mid(lm), _site("mlp_out"), _site("resid_mid"))
    assert r["ce_spliced"] == r["ce_clean"] and r["kl"] == 0.0 and r["ce_recovered_zero"] == 1.0


def _forwards(lm: LM) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Counts the LM's forward passes (a real pre-hook on the top module); ``.remove()`` the handle after."""
    calls: list = []
    return calls, lm.model.register_forward_pre_hook(lambda m, a: calls.append(1))


def test_many_dictionaries_in_one_pass_give_each_ones_numbers_alone(cache):
    """Three dictionaries on two targets in one pass: per batch 1 clean + 3 spliced + 2 x 2 ablation
    forwards (instead of 3 x (1 + 1) + 4), and exactly the numbers each gets alone on a fresh LM."""
    fresh = lambda: LM.load(cache, tokens=128, batch_size=3, device="cpu")  # noqa: E731
    lm = fresh()
    assert lm.model.config._attn_implementation == cache.manifest["model"]["attn_implementation"]
    splices = {"scaled": Splice(_site("resid_mid"), lambda x: 0.9 * x),
               "shifted": Splice(_site("resid_mid"), lambda x: x + 0.05),
               "tc": Splice(_site("mlp_out"), _mlp_of_resid_mid(lm), _site("resid_mid"))}
    calls, handle = _forwards(lm)
    together = lm.downstream_many(splices)
    handle.remove()
    assert len(calls) == 2 * (1 + 3 + 2 * 2)  # two batches
    for name, s in splices.items():
        alone = fresh().downstream(s.fn, s.target, s.source)
        assert together[name] == alone, name
    calls, handle = _forwards(lm)
    again = lm.downstream_many({"scaled": splices["scaled"]})  # ablations of a seen target are not rerun
    handle.remove()
    assert len(calls) == 2 * (1 + 1) and again["scaled"] == together["scaled"]
    assert together["tc"]["ce_spliced"] == together["tc"]["ce_clean"]  # the exact transcoder


def test_ablations_are_splices_of_zero_and_of_the_cache_mean(lm, cache):
    """Zero-ablation is the zero function; mean-ablation is the mean of the site's non-BOS rows, here
    recomputed from the cached rows themselves, not taken from the statistics."""
    for s in ("resid_mid", "mlp_out"):
        name = _site(s)
        rows = cache.read(name, 0, cache.manifest["n_tokens"]).astype(np.float64)
        mean = rows[np.asarray(cache.tokens[:]) != cache.manifest["bos"]["token_id"]].mean(0)
        r = lm.downstream(lambda x: x, name)
        _, out, _ = lm.compare({"zero": Splice(name, lambda x: torch.zeros_like(x)),
                                "mean": Splice(name, constant(mean))})
        assert out["zero"][0] == r["ce_zero_ablated"]
        assert out["mean"][0] == pytest.approx(r["ce_mean_ablated"], rel=1e-6)
        assert out["zero"][1] > 0 and out["mean"][1] > 0


def test_ablations_equal_a_model_whose_mlp_writes_zero_or_the_mean(model_dir, corpus, tmp_path):
    """Independent known answers, on a cache without BOS (so every position is ablated and scored):
    zero-ablating mlp_out equals a plain HF forward of weights whose MLP branch outputs exactly 0
    (GPT-2: c_proj = 0; Gemma-2: the post-feedforward norm's scale 1 + w = 0), and for GPT-2,
    mean-ablation equals c_proj's weight 0 and bias the cache mean."""
    from transformers import AutoModelForCausalLM

    cache = Cache(harvest(harvest_config(model_dir, corpus, tmp_path / "c", sites="1.mlp_out", layers=None,
                                         bos="none"), progress=False))
    lm = LM.load(cache, tokens=128, batch_size=4, device="cpu")
    r = lm.downstream(lambda x: x, _site("mlp_out"))
    assert lm.bos_id is None and r["tokens"] == 4 * 31
    raw = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    gpt2 = lm.arch == "gpt2"
    block = (raw.transformer.h if gpt2 else raw.model.layers)[LAYER]
    with torch.no_grad():
        if gpt2:
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
        else:
            block.post_feedforward_layernorm.weight.fill_(-1.0)
        assert r["ce_zero_ablated"] == pytest.approx(float(raw(input_ids=lm.tokens, labels=lm.tokens).loss), rel=1e-5)
        if gpt2:
            block.mlp.c_proj.bias.copy_(torch.as_tensor(cache.stats(_site("mlp_out")).mean))
            mean = float(raw(input_ids=lm.tokens, labels=lm.tokens).loss)
            assert r["ce_mean_ablated"] == pytest.approx(mean, rel=1e-5)


def _masked_labels(tokens: torch.Tensor, bos: int) -> torch.Tensor:
    """HF labels for the scored predictions: no prediction of a BOS, none made from a BOS."""
    labels = tokens.clone()
    labels[tokens == bos] = -100
    labels[:, 1:][tokens[:, :-1] == bos] = -100
    return labels


def test_clean_ce_is_a_plain_hf_forward_loss_without_bos(lm, model_dir):
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    labels = _masked_labels(lm.tokens, lm.bos_id)
    assert (lm.tokens[:, 0] == lm.bos_id).all() and int((labels[:, 1:] != -100).sum()) == 4 * 30
    with torch.no_grad():
        loss = float(raw(input_ids=lm.tokens, labels=labels).loss)
    clean, _, n = lm.compare({})
    assert n == 4 * 30 and clean == pytest.approx(loss, rel=1e-5)


def test_resid_mid_replacement_reaches_the_residual_stream(lm):
    """resid_post = resid_mid + mlp_out must use the replacement on both paths: with resid_mid set to a
    constant c, resid_post is c + MLP branch of c at every position (a norm-input-only splice fails this)."""
    d = lm.cache.manifest["arrays"][_site("resid_mid")]["width"]
    c = torch.linspace(-2, 2, d)
    keep = torch.zeros(2, 32, dtype=torch.bool)
    handles = lm._hooks(Splice(_site("resid_mid"), constant(c)), keep)
    cap = Capture(lm.model, lm.arch, [(LAYER, "mlp_in"), (LAYER, "resid_post")])
    try:
        got = cap(lm.tokens[:2])
    finally:
        cap.close()
        for h in handles:
            h.remove()
    with torch.no_grad():
        want = c + _mlp_of_resid_mid(lm)(c[None])[0]
    torch.testing.assert_close(got[(LAYER, "resid_post")], want.expand(2, 32, d), rtol=1e-6, atol=1e-6)
    b = _block(lm)
    norm = b.ln_2 if lm.arch == "gpt2" else b.pre_feedforward_layernorm
    torch.testing.assert_close(got[(LAYER, "mlp_in")], norm(c[None])[0].expand(2, 32, d))


def test_bos_positions_are_left_as_the_model_computes_them(lm):
    """A splice that replaces every value does not touch a BOS position: it keeps the model's value."""
    keep = lm.tokens[:2] == lm.bos_id
    handles = lm._hooks(Splice(_site("resid_pre"), lambda x: torch.full_like(x, 7.0)), keep)
    cap = Capture(lm.model, lm.arch, [(LAYER, "resid_pre")])
    try:
        got = cap(lm.tokens[:2])[(LAYER, "resid_pre")]
    finally:
        cap.close()
        for h in handles:
            h.remove()
    assert (got[:, 1:] == 7.0).all() and not (got[:, 0] == 7.0).any()


def test_bfloat16_lm_splices_in_float32_and_identity_is_exact(cache):
    """Dictionaries compute in float32; a bf16 LM's sites go in and out through float32 exactly."""
    m = cache.manifest["model"]
    model = load_model(model_info(m["resolved"]), dtype="bfloat16", device="cpu", progress=False)
    lm16 = LM(model, m["arch"], cache, tokens=64, batch_size=2)
    seen = []

    def identity(x):
        seen.append(x.dtype)
        return x

    clean, out, _ = lm16.compare({"id": Splice(_site("resid_mid"), identity),
                                  "tc": Splice(_site("mlp_out"), lambda x: torch.zeros(len(x), x.shape[1]),
                                               _site("mlp_in"))})
    assert seen and set(seen) == {torch.float32}
    assert out["id"] == (clean, 0.0) and out["tc"][0] != clean and out["tc"][1] > 0


def test_the_contexts_are_whole_heldout_sequences_and_sites_are_checked(lm, cache):
    a, b = cache.split["heldout"]
    held = np.asarray(cache.tokens[a:b]).reshape(-1, 32)
    for tokens, n in ((33, 2), (128, 4), (10**6, 4)):  # rounded up to whole contexts, at most the split
        np.testing.assert_array_equal(LM(lm.model, lm.arch, cache, tokens).tokens.numpy(), held[:n])
    keep = torch.zeros(1, 32, dtype=torch.bool)
    with pytest.raises(ConfigError, match="source 1.mlp_out is computed after target 1.resid_mid"):
        lm._hooks(Splice(_site("resid_mid"), lambda x: x, _site("mlp_out")), keep)
    with pytest.raises(CacheError, match="has no LM site '1.nope'"):
        lm._hooks(Splice("1.nope", lambda x: x), keep)


def test_no_lm_for_a_synthetic_cache(tmp_path):
    from matryoshka.fixtures import write_cache

    n = 8 * 16
    c = Cache(write_cache(tmp_path / "c", {"x": np.ones((n, 4), np.float32)}, np.zeros(n, int), 16, 2, heldout_seqs=2))
    assert "not harvested from a language model" in no_lm_reason(c)


def _copy_with(cache: Cache, dest, edit) -> Cache:
    shutil.copytree(cache.path, dest)
    g = zarr.open_group(str(dest), mode="r+")
    manifest = g.attrs["manifest"]
    edit(manifest)
    g.attrs["manifest"] = manifest
    return Cache(dest)


def test_unloadable_or_different_model_is_a_one_line_error(cache, tmp_path):
    assert no_lm_reason(cache) is None
    gone = _copy_with(cache, tmp_path / "gone", lambda m: m["model"].update(resolved=str(tmp_path / "no-model")))
    with pytest.raises(ConfigError, match="cannot load the cache's model .*--no-lm"):
        LM.load(gone, tokens=64)
    other = _copy_with(cache, tmp_path / "other", lambda m: m["identity"].update(model="sha256:0"))
    with pytest.raises(CacheError, match="is not the one .*--no-lm"):
        LM.load(other, tokens=64)


@pytest.fixture(scope="module")
def trained(gpt2_dir, corpus, tmp_path_factory):
    """A tiny SAE and transcoder trained on a harvested GPT-2 cache."""
    from matryoshka.config import TrainConfig
    from matryoshka.train.trainer import train

    tmp = tmp_path_factory.mktemp("e")
    path = harvest(harvest_config(gpt2_dir, corpus, tmp / "cache", sites="1.resid_mid,1.mlp_out", layers=None),
                   progress=False)
    runs = [{"name": "sae", "source": "1.resid_mid", "width": 128, "k": 4, "arch": "batchtopk", "tokens": "2K"},
            {"name": "tc", "source": "1.resid_mid", "target": "1.mlp_out", "width": 128, "k": 4, "arch": "batchtopk",
             "tokens": "2K"}]
    train(TrainConfig(cache=str(path), runs=runs, runs_dir=str(tmp / "runs"), batch_size=128, buffer_tokens=1024,
                      checkpoint_every=100), progress=False)
    return Cache(path), tmp / "runs"


def _evaluate_args(cache: Cache, runs) -> list[str]:
    return ["evaluate", "--cache", cache.path, "--runs-dir", str(runs), "--no-features", "--contexts", "0",
            "--no-report", "--lm-tokens", "96", "--lm-batch-size", "2", "--batch-size", "64", "-q"]


def test_evaluate_adds_the_downstream_metrics_of_every_run(trained):
    import json

    from typer.testing import CliRunner

    from matryoshka.cli import app

    cache, runs = trained
    out = CliRunner().invoke(app, _evaluate_args(cache, runs))
    assert out.exit_code == 0, out.output
    assert "CE rec0" in out.output and "skipped" not in out.output
    res = {p.parent.name: json.loads(p.read_text())["lm"] for p in runs.glob("*/*/eval.json")}
    assert set(res) == {"sae", "tc"}
    for name, r in res.items():
        assert (r["sequences"], r["tokens"]) == (3, 3 * 30)
        assert r["ce_recovered_zero"] == pytest.approx((r["ce_zero_ablated"] - r["ce_spliced"])
                                                       / (r["ce_zero_ablated"] - r["ce_clean"]))
        assert r["ce_recovered_mean"] == pytest.approx((r["ce_mean_ablated"] - r["ce_spliced"])
                                                       / (r["ce_mean_ablated"] - r["ce_clean"]))
        assert r["kl"] > 0 and r["ce_spliced"] != r["ce_clean"], name
    assert res["sae"]["ce_clean"] == res["tc"]["ce_clean"]
    assert res["sae"]["ce_zero_ablated"] != res["tc"]["ce_zero_ablated"]  # resid_mid vs the transcoder's target


def test_evaluating_the_runs_of_a_cache_together_equals_each_alone(trained, tmp_path):
    """`evaluate --cache` runs one LM pass for both runs; `evaluate RUN` one pass each: same eval.json numbers."""
    from matryoshka.config import EvaluateConfig
    from matryoshka.evaluate.stage import evaluate

    cache, runs = trained
    kw = dict(runs_dir=str(runs), features=False, contexts=0, report=False, lm_tokens=96, lm_batch_size=2,
              batch_size=64)
    together = {r["run"]: r for r in evaluate(EvaluateConfig(cache=cache.path, **kw))}
    assert set(together) == {"sae", "tc"}
    for name, r in together.items():
        (alone,) = evaluate(EvaluateConfig(run=r["path"], **kw))
        assert alone["lm"] == r["lm"] and alone["fvu"] == r["fvu"], name


def test_no_lm_skips_in_one_line_and_an_unloadable_model_suggests_it(trained, tmp_path):
    import json

    from typer.testing import CliRunner

    from matryoshka.cli import app

    cache, runs = trained
    out = CliRunner().invoke(app, _evaluate_args(cache, runs) + ["--no-lm"])
    assert out.exit_code == 0, out.output
    assert "downstream LM metrics skipped (--no-lm)" in out.output and "CE rec0" not in out.output
    assert all(json.loads(p.read_text())["lm"] is None for p in runs.glob("*/*/eval.json"))
    gone = _copy_with(cache, tmp_path / "gone", lambda m: m["model"].update(resolved=str(tmp_path / "no-model")))
    bad = CliRunner().invoke(app, _evaluate_args(gone, runs))
    assert bad.exit_code == 2 and "--no-lm" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_a_bos_that_is_also_the_eos_is_left_out_by_position_everywhere(gpt2_dir, corpus, tmp_path):
    """GPT-2's BOS id also separates documents inside a context. Under the context policy only position 0 of
    each context is a BOS row, for the statistics, the reader and the splice alike (they once disagreed:
    the statistics and the splice dropped the separators too, the reader did not)."""
    from transformers import AutoTokenizer

    from matryoshka.cache.reader import ReaderConfig, ShuffledReader

    model = tmp_path / "gpt2-bos-is-eos"
    shutil.copytree(gpt2_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = tok.bos_token
    tok.save_pretrained(model)
    cache = Cache(harvest(harvest_config(model, corpus, tmp_path / "cache", sites="1.resid_mid"), progress=False))
    ctx, bos, n = cache.manifest["context_size"], cache.manifest["bos"]["token_id"], cache.manifest["n_tokens"]
    tokens = np.asarray(cache.tokens[:])
    start = np.arange(n) % ctx == 0
    assert (tokens[start] == bos).all() and (tokens[~start] == bos).sum() > 5  # separators mid-context
    x = cache.read("1.resid_mid", 0, n).astype(np.float64)
    stats = cache.stats("1.resid_mid")
    assert stats.count == n - n // ctx
    np.testing.assert_allclose(stats.mean, x[~start].mean(0), rtol=1e-9, atol=1e-12)
    served = []
    for split in ("train", "heldout"):
        with ShuffledReader(["1.resid_mid"], cache, ReaderConfig(batch_size=16, buffer_tokens=256, split=split)) as r:
            for _ in range(r.batches_per_epoch):
                next(r)
                served += r.last_rows.tolist()
    assert sorted(served) == np.flatnonzero(~start).tolist()
    lm = LM.load(cache, tokens=128, batch_size=3, device="cpu")
    assert torch.equal(lm.bos, torch.zeros_like(lm.bos).index_fill_(1, torch.tensor([0]), True))
    assert int(lm.scored.sum()) == len(lm.tokens) * (ctx - 2)
