"""Per-latent page data from a :class:`~.sample.Sample`: density, activation histogram, contexts.

Contexts are the latent's top activations (:class:`~matryoshka.evaluate.contexts.TopContexts` over the
sample) and ``per_band`` samples from each of the lower activation quantile bands ``BANDS`` (of the
latent's non-zero activations), each a window of ``before`` + 1 + ``after`` tokens inside its sequence.
Every token of a window carries the latent's activation on it, as a percentage of the latent's largest
activation (what the page shades by); the activating token also keeps its exact value. Token strings are
decoded once per token id (:func:`~matryoshka.evaluate.contexts.cache_tokenizer`); without a tokenizer
(a synthetic cache) they are the ids.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..evaluate.contexts import TopContexts
from .sample import Sample

BANDS = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75)]
HIST_BINS = 24


def token_strings(ids: np.ndarray, tokenizer: Any | None) -> dict[int, str]:
    uniq = np.unique(ids)
    if tokenizer is None:
        return {int(t): str(int(t)) for t in uniq}
    return {int(t): tokenizer.decode([int(t)]) for t in uniq}


def histograms(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """[W, HIST_BINS] counts of each latent's non-zero activations over [0, its max], and the maxima."""
    c = sample.codes
    top = np.zeros(c.width, np.float32)
    np.maximum.at(top, c.latents, c.values)
    b = np.minimum((c.values / np.maximum(top[c.latents], 1e-30) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    counts = np.bincount(c.latents * HIST_BINS + b, minlength=c.width * HIST_BINS).reshape(c.width, HIST_BINS)
    return counts, top


def quantile_rows(sample: Sample, per_band: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[W, len(BANDS) * per_band] cache rows (-1: none) drawn uniformly inside each quantile band of each
    latent's activations, and their band index."""
    c = sample.codes
    W, k = c.width, len(BANDS) * per_band
    out = np.full((W, k), -1, np.int64)
    if not len(c.latents) or not per_band:
        return out, np.repeat(np.arange(len(BANDS)), per_band)
    order = np.lexsort((c.tokens, c.values, c.latents))
    lat = c.latents[order]
    start = np.searchsorted(lat, np.arange(W))
    n = np.bincount(lat, minlength=W)
    rng = np.random.default_rng(seed)
    col = 0
    for lo, hi in BANDS:
        for _ in range(per_band):
            u = rng.random(W)
            pos = start + np.minimum((n * (lo + (hi - lo) * u)).astype(np.int64), np.maximum(n - 1, 0))
            ok = n >= 2 * len(BANDS)  # too few activations: the top contexts already show them all
            out[ok, col] = sample.rows(c.tokens[order[pos[ok]]])
            out[(out[:, :col] == out[:, col:col + 1]).any(axis=1), col] = -1  # a row drawn twice is shown once
            col += 1
    return out, np.repeat(np.arange(len(BANDS)), per_band)


def contexts(sample: Sample, latents: np.ndarray, rows: np.ndarray, context_size: int, top: np.ndarray,
             before: int, after: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows around ``rows`` (one per entry, latent ``latents[i]``): [n, before+1+after] cache rows (-1 past
    the sequence or the sample), the latent's activation there in percent of ``top`` (-1: not encoded), and
    the exact activation at the centre."""
    off = np.arange(-before, after + 1)
    win = rows[:, None] + off[None, :]
    seq0 = (rows - rows % context_size)[:, None]
    ok = (win >= seq0) & (win < seq0 + context_size) & (win >= sample.start) & (win < sample.start + sample.codes.n)
    win = np.where(ok, win, -1)
    lat = np.broadcast_to(latents[:, None], win.shape)
    act = sample.activation(np.where(ok, win, sample.start).reshape(-1), lat.reshape(-1)).reshape(win.shape)
    pct = np.where(ok, np.round(100 * act / np.maximum(top[latents][:, None], 1e-30)), -1).astype(np.int64)
    return win, pct, act[:, before]


def latent_records(sample: Sample, context_size: int, tokenizer: Any | None, n_top: int = 10, per_band: int = 2,
                   before: int = 12, after: int = 4) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """One record per latent: ``n`` fires, ``density``, ``hist``/``max``, ``top`` and ``quantile`` contexts
    as ``{"r": row, "v": value, "t": [token ids], "a": [percent], "c": centre index}``; and the token strings."""
    c = sample.codes
    W = c.width
    tc = TopContexts(W, n_top)
    tc.update(c.latents, c.values, sample.rows(c.tokens))
    hist, top = histograms(sample)
    qrows, qband = quantile_rows(sample, per_band)
    fires = c.fires
    all_rows = np.concatenate([tc.rows, qrows], axis=1)  # [W, n_top + q]
    lat = np.repeat(np.arange(W), all_rows.shape[1])
    flat = all_rows.reshape(-1)
    used = flat >= 0
    win, pct, centre = contexts(sample, lat[used], flat[used], context_size, top, before, after)
    ids = np.where(win >= 0, sample.tokens[np.clip(win - sample.start, 0, len(sample.tokens) - 1)], -1)
    strings = token_strings(ids[ids >= 0], tokenizer)
    recs: list[dict[str, Any]] = [{"n": int(fires[j]), "density": float(fires[j] / max(sample.live, 1)),
                                   "hist": hist[j].tolist(), "max": float(top[j]), "top": [], "quantile": []}
                                  for j in range(W)]
    slot = np.tile(np.arange(all_rows.shape[1]), W)[used]
    for k, (j, s, r) in enumerate(zip(lat[used].tolist(), slot.tolist(), flat[used].tolist())):
        keep = win[k] >= 0
        ctx = {"r": r, "v": round(float(centre[k]), 4), "t": ids[k][keep].tolist(),
               "a": pct[k][keep].tolist(), "c": int(keep[:before].sum())}
        if s < n_top:
            recs[j]["top"].append(ctx)
        else:
            ctx["band"] = int(qband[s - n_top])
            recs[j]["quantile"].append(ctx)
    return recs, strings
