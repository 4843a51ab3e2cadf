"""Reconstruction metrics: known answers on a held-out split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from matryoshka.cache import Cache
from matryoshka.evaluate.metrics import reconstruction
from matryoshka.fixtures import write_cache
from matryoshka.train.dictionary import Dictionary

CTX, D = 16, 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    n = 64 * CTX
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, D)) * 2 + 1).astype(np.float32)
    tokens = rng.integers(4, 99, n)
    tokens[::CTX] = 0
    return Cache(write_cache(tmp_path_factory.mktemp("m") / "c", {"x": x}, tokens, CTX, 4, heldout_seqs=16))


def _heldout(cache):
    a, b = cache.split["heldout"]
    rows = np.arange(a, b)
    return cache.read("x", a, b)[rows % CTX != 0].astype(np.float64)


def test_predicting_the_mean_gives_fvu_1(cache):
    dic = Dictionary(D, D, 8, 2, "batchtopk")
    with torch.no_grad():
        dic.W_dec.zero_()
        dic.b_dec.copy_(torch.as_tensor(cache.stats("x").mean, dtype=torch.float32))
    r = reconstruction(dic, cache, "x", batch_size=64)
    y = _heldout(cache)
    mu = cache.stats("x").mean
    assert r.tokens == len(y)
    want = ((y - mu.astype(np.float32)) ** 2).sum() / ((y - mu) ** 2).sum()
    assert r.fvu == pytest.approx(want, rel=1e-6) and r.fvu == pytest.approx(1.0, abs=1e-2)


def test_the_identity_gives_fvu_0_and_known_l0(cache):
    """relu(x) and relu(-x) as latents, decoded by +I and -I, reconstruct x exactly."""
    dic = Dictionary(D, D, 2 * D, 1, "matryoshka", [D, D])
    eye = torch.eye(D)
    with torch.no_grad():
        dic.W_enc.copy_(torch.cat([eye, -eye], 1))
        dic.W_dec.copy_(torch.cat([eye, -eye], 0))
        dic.b_dec.zero_()
    r = reconstruction(dic, cache, "x", batch_size=64)
    y = _heldout(cache)
    assert r.fvu < 1e-12 and r.mse < 1e-12 and r.cosine == pytest.approx(1.0)
    assert r.l0 == pytest.approx(float((y != 0).sum(1).mean()))
    pos = (y > 0).mean(0)
    np.testing.assert_allclose(r.density, np.concatenate([pos, (y < 0).mean(0)]))
    # the first group alone keeps the positive parts: FVU of relu(y) against y, by hand
    want = ((y - np.maximum(y, 0)) ** 2).sum() / ((y - cache.stats("x").mean) ** 2).sum()
    assert r.prefix_fvu[0] == pytest.approx(want, rel=1e-9) and r.prefix_fvu[1] < 1e-12
    assert r.dead == 0 and r.dense == 2 * D


def test_seed_fvu_variant_is_around_one_scalar_mean(cache):
    dic = Dictionary(D, D, 8, 2, "batchtopk")
    dic.threshold.fill_(1e9)  # nothing fires: the reconstruction is b_dec = 0
    r = reconstruction(dic, cache, "x", batch_size=64)
    y = _heldout(cache)
    assert r.fvu_seed == pytest.approx((y ** 2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    assert r.l0 == 0 and r.dead == 8 and r.dead_per_group == [8] and r.dense == 0
