"""Feature metrics: hand-computed values on tiny dictionaries and codes; chunked equals unchunked."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from matryoshka.cache import Cache
from matryoshka.evaluate.features import (
    Codes,
    _block_rows,
    coactivation,
    decoder_similarity,
    feature_metrics,
    heldout_codes,
    hierarchy,
    monosemanticity,
)
from matryoshka.fixtures import write_cache
from matryoshka.train.dictionary import Dictionary

# Four decoder rows: 0 and 1 nearly parallel (cos 1/sqrt(1.01) = 0.995), 1 and 2 at cos 0.1/sqrt(1.01).
W_DEC = torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0, 0, -2.0]])
# Four tokens: latents 0 and 1 fire together on three, 2 joins them on one, 3 fires alone on the last.
ACTS = np.array([[1.0, 2, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0], [0, 0, 0, 4]])


def test_absorption_and_group_cosines_by_hand():
    s = decoder_similarity(W_DEC, [2, 2])
    assert s["absorbed_pairs"] == 1 and s["absorption"] == pytest.approx(1 / 6)
    c01, c12 = 1 / math.sqrt(1.01), 0.1 / math.sqrt(1.01)
    assert s["top_similar"][0][:2] == [0, 1] and s["top_similar"][0][2] == pytest.approx(c01, abs=1e-6)
    assert s["within_cos"] == pytest.approx([c01, 0.0], abs=1e-6)
    assert s["between_cos"][0] == pytest.approx(c12 / 4, abs=1e-6) and s["between_cos"][1] is None
    assert decoder_similarity(W_DEC, [4], above=0.05)["absorbed_pairs"] == 2  # (0,1) and (1,2)
    assert decoder_similarity(W_DEC, [1, 3])["within_cos"][0] is None  # one latent: no pairs (not NaN in JSON)


def test_splitting_by_hand():
    codes = Codes.from_dense(ACTS)
    co = coactivation(codes, above=0.5, rare_below=1)
    # seed: C01/N = 3/4 is the only joint rate above 0.5
    assert co["split_pairs"] == 1 and co["splitting"] == pytest.approx(1 / 6)
    # conditional: C01/3, C02/1, C12/1 are all 1 > 0.5; pairs with 3 never co-fire
    assert co["conditional_pairs"] == 3 and co["splitting_conditional"] == pytest.approx(3 / 6)
    assert co["top_coactive"][0] == [0, 1, 0.75]
    rare = coactivation(codes, above=0.5, rare_below=2)  # 2 and 3 fire once: rare, left out of the conditional
    assert rare["conditional_pairs"] == 1 and rare["splitting_conditional"] == 1.0
    assert rare["split_pairs"] == 1  # the seed's version counts every pair


def test_monosemanticity_by_hand_dead_and_rare_excluded():
    n = 40
    acts = np.zeros((n, 4))
    acts[:20, 0] = 1.0                      # constant: one bin, entropy ~0
    acts[:10, 1], acts[10:20, 1] = 1.0, 2.0  # two values, half each: entropy ln 2
    acts[:3, 2] = 5.0                       # fires 3 times: rare at rare_below=5; latent 3 is dead
    m = monosemanticity(Codes.from_dense(acts), rare_below=5)
    f = 20 / n
    assert m[0] == pytest.approx(((1 - f) + 1) / 2, abs=1e-6)
    assert m[1] == pytest.approx(((1 - f) + 1 / (1 + math.log(2))) / 2, abs=1e-6)
    assert np.isnan(m[2]) and np.isnan(m[3])
    fm = feature_metrics(torch.eye(4), [4], Codes.from_dense(acts), rare_below=5)
    assert fm.monosemanticity_scored == 2 and fm.monosemanticity_excluded == 2
    assert fm.monosemanticity == pytest.approx((m[0] + m[1]) / 2)


def _seed_monosemanticity(acts: np.ndarray, i: int) -> float:
    """The seed's score, re-stated: histogram density, +1e-10, scipy entropy (normalises), averaged."""
    a = acts[:, i][acts[:, i] > 0]
    hist, _ = np.histogram(a, bins=50, density=True)
    return ((1 - (acts[:, i] > 0).mean()) + 1 / (1 + entropy(hist + 1e-10))) / 2


def test_monosemanticity_equals_the_seeds_formula_on_random_codes():
    rng = np.random.default_rng(0)
    acts = rng.exponential(1.0, (500, 12)) * (rng.random((500, 12)) < rng.uniform(0.05, 0.6, 12))
    m = monosemanticity(Codes.from_dense(acts), rare_below=11)
    for i in range(12):
        assert m[i] == pytest.approx(_seed_monosemanticity(acts, i), rel=1e-9)


def test_hierarchy_by_hand():
    h = hierarchy(Codes.from_dense(ACTS), [2, 2], rare_below=2)
    assert [g["l0"] for g in h] == [1.5, 0.5] and [g["density"] for g in h] == [0.75, 0.25]
    assert h[0]["earlier_cofire"] is None
    assert h[1]["earlier_cofire"] == 0.5  # latent 2 fires beside 0 and 1; latent 3 fires alone
    assert [g["rare"] for g in h] == [0, 2] and [g["dead"] for g in h] == [0, 0]


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    width, d = 37, 5
    W = torch.tensor(rng.standard_normal((width, d)), dtype=torch.float32)
    W[7] = W[3] * 2 + 0.01  # a few near-duplicates so absorption is not zero
    W[20] = -W[11]
    acts = rng.exponential(1.0, (300, width)) * (rng.random((300, width)) < rng.uniform(0.01, 0.7, width))
    codes = Codes.from_dense(acts)
    kw = dict(absorption_above=0.5, split_above=0.3, rare_below=4)
    whole = feature_metrics(W, [5, 12, 20], codes, block_rows=width, **kw).to_json()
    assert whole["absorbed_pairs"] > 0 and whole["split_pairs"] > 0 and whole["conditional_pairs"] > 0
    for rows in (1, 3, 16):
        part = feature_metrics(W, [5, 12, 20], codes, block_rows=rows, **kw).to_json()
        for key in ("absorbed_pairs", "split_pairs", "conditional_pairs", "top_coactive", "monosemanticity"):
            assert part[key] == whole[key], (rows, key)
        assert [p[:2] for p in part["top_similar"]] == [p[:2] for p in whole["top_similar"]]
        for g, h in zip(part["hierarchy"], whole["hierarchy"]):
            assert g["within_cos"] == pytest.approx(h["within_cos"], rel=1e-5)
            if h["between_cos"] is None:  # the last group has no next group
                assert g["between_cos"] is None
            else:
                assert g["between_cos"] == pytest.approx(h["between_cos"], rel=1e-5)
    # and the blocked cosines equal a dense re-computation
    w = torch.nn.functional.normalize(W, dim=1)
    cos = (w @ w.T).numpy()
    iu = np.triu_indices(width, 1)
    assert whole["absorbed_pairs"] == int((cos[iu] > 0.5).sum())
    g1 = slice(5, 17)
    sub = np.abs(cos[g1, g1])[np.triu_indices(12, 1)]
    assert whole["hierarchy"][1]["within_cos"] == pytest.approx(sub.mean(), rel=1e-5)
    assert whole["hierarchy"][0]["between_cos"] == pytest.approx(np.abs(cos[:5, 5:17]).mean(), rel=1e-5)


def test_block_rows_follow_the_memory_budget():
    """A block of decoder cosines holds rows x width float32 numbers within block_mb."""
    assert _block_rows(300, 300 * 4 * 7 / 2**20, 4) == 7
    assert _block_rows(300, 1e-9, 4) == 1 and _block_rows(300, 1e6, 4) == 300
    rng = np.random.default_rng(2)
    W = torch.tensor(rng.standard_normal((300, 4)), dtype=torch.float32)
    codes = Codes.from_dense(rng.random((50, 300)) * (rng.random((50, 300)) < 0.1))
    small = feature_metrics(W, [300], codes, absorption_above=0.8, block_mb=300 * 4 * 7 / 2**20).to_json()
    whole = feature_metrics(W, [300], codes, absorption_above=0.8, block_rows=300).to_json()
    for key in ("absorbed_pairs", "split_pairs", "conditional_pairs", "top_coactive"):
        assert small[key] == whole[key]


def test_heldout_codes_map_back_to_cache_rows(tmp_path):
    ctx, d = 8, 4
    n = 16 * ctx
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    tokens = rng.integers(1, 50, n)
    tokens[::ctx] = 0
    cache = Cache(write_cache(tmp_path / "c", {"x": x}, tokens, ctx, 2, heldout_seqs=6))
    dic = Dictionary(d, d, 10, 3, "matryoshka", [4, 6])
    dic.threshold.fill_(0.2)
    seen = []
    codes = heldout_codes(dic, cache, "x", max_tokens=20, batch_size=16,
                          on_batch=lambda code, rows: seen.append(rows))
    rows = np.concatenate(seen)
    assert sorted(rows) == [r for r in range(6 * ctx) if r % ctx]  # every held-out non-BOS row once
    assert codes.n == 20
    dense = dic.encode(torch.from_numpy(x[rows[:20]])).numpy()
    got = np.zeros((20, 10), np.float32)
    got[codes.tokens, codes.latents] = codes.values
    np.testing.assert_array_equal(got, dense)
