"""Ground truth beside each latent of a dictionary trained on a synthetic cache.

Per latent j: the true feature it recovers best (argmax_i cos(t_i, w_j), with
:func:`~matryoshka.evaluate.ground_truth.cosines`), whether that feature is a parent or a child, and, for
each child feature c whose match (``match(c)``, the latent that stands for c, as in evaluation) is j, the
fraction of c's occurrences with its parent on which j fires but the parent's latent does not
(:func:`~matryoshka.evaluate.ground_truth.absorption_by_child` on the browser's held-out rows): above 1/2,
j has absorbed the parent.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..cache import Cache
from ..evaluate.ground_truth import absorption_by_child, cosines, directions
from .sample import Sample


def latent_truth(W_dec: torch.Tensor, cache: Cache, target: str, sample: Sample,
                 block: int = 4096) -> list[dict[str, Any]] | None:
    """One record per latent, or None when the cache has no ground truth for ``target``."""
    truth = directions(cache, target)
    if truth is None:
        return None
    meta = cache.manifest["synthetic"]
    parent = np.asarray(meta["parent"])
    cos = cosines(W_dec, truth)  # [F, W]
    match = cos.argmax(axis=1)
    codes, W = sample.codes, sample.codes.width
    present_all = cache.read(meta["features"], sample.start, sample.start + codes.n) > 0
    A = np.zeros(int((parent >= 0).sum()), np.int64)
    E = np.zeros_like(A)
    for t0 in range(0, codes.n, block):
        t1 = min(t0 + block, codes.n)
        sel = (codes.tokens >= t0) & (codes.tokens < t1)
        active = np.zeros((t1 - t0, W), bool)
        active[codes.tokens[sel] - t0, codes.latents[sel]] = True
        a, e = absorption_by_child(active, present_all[t0:t1], parent, match)
        A, E = A + a, E + e
    children = np.nonzero(parent >= 0)[0]
    best = cos.argmax(axis=0)
    out = []
    for j in range(W):
        f = int(best[j])
        absorbed = [{"child": int(c), "parent": int(parent[c]), "rate": float(A[k] / E[k]), "events": int(E[k])}
                    for k, c in enumerate(children) if match[c] == j and E[k]]
        out.append({"feature": f, "cos": float(cos[f, j]), "parent": int(parent[f]),
                    "match": bool(match[f] == j), "absorbed": absorbed})
    return out
