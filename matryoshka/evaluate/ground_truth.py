"""Scores against the ground truth of a synthetic cache (``harvest.source: synthetic``).

The cache stores, per feature ``i``, its true unit direction ``t_i`` in each array, its parent, and its
activation on every token (``matryoshka/harvest/synthetic.py``). For a dictionary whose reconstruction
target is such an array (an SAE on x, or a transcoder onto the target), with unit decoder rows ``w_j``:

    recovery      = mean over true features i of  max_j cos(t_i, w_j)
                    (also over parents and over children alone)
    match(i)      = argmax_j cos(t_i, w_j): the latent that stands for feature i

    absorption    = A / E, over the held-out tokens, with inference selection (the threshold), where
        E = number of (token, child c) pairs on which c and its parent p are both active, and
        A = those of them on which match(c) fires but match(p) does not (and match(c) != match(p)).

So absorption is the fraction of child occurrences on which the parent's latent is silent while the
child's latent carries it: the parent has been absorbed into the child. A dictionary equal to the truth
scores recovery 1 and absorption 0; one whose parent latent is switched off by every child, 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..cache import Cache
from ..train.dictionary import Dictionary


@dataclass
class GroundTruth:
    recovery: float
    recovery_parents: float
    recovery_children: float
    absorption: float
    absorption_events: int
    """E: (token, child) pairs on which the child and its parent are active."""
    tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def directions(cache: Cache, array: str) -> np.ndarray | None:
    """The true unit directions [F, width] of the features in ``array``, or None (no ground truth)."""
    truth = cache.manifest.get("synthetic")
    if truth is None or array not in truth["directions"]:
        return None
    return np.asarray(cache.group[truth["directions"][array]][:], dtype=np.float64)


def cosines(decoder: torch.Tensor | np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[F, width]: cosine of every true direction with every decoder row."""
    w = np.asarray(torch.as_tensor(decoder).detach().cpu().double())
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
    return truth @ w.T


def absorption_counts(active: np.ndarray, present: np.ndarray, parent: np.ndarray, match: np.ndarray
                      ) -> tuple[int, int]:
    """(A, E) of the module docstring. ``active`` [N, width] bool: latents firing; ``present`` [N, F]
    bool: true features active; ``parent`` [F]: parent of each feature (-1: none); ``match`` [F]."""
    a, e = absorption_by_child(active, present, parent, match)
    return int(a.sum()), int(e.sum())


def absorption_by_child(active: np.ndarray, present: np.ndarray, parent: np.ndarray, match: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(A, E) per child feature (the features with a parent, in index order), as :func:`absorption_counts`."""
    child = np.nonzero(parent >= 0)[0]
    p = parent[child]
    events = present[:, child] & present[:, p]
    fires = active[:, match]
    absorbed = events & fires[:, child] & ~fires[:, p] & (match[child] != match[p])
    return absorbed.sum(0), events.sum(0)


@torch.no_grad()
def ground_truth(dic: Dictionary, cache: Cache, source: str, target: str | None = None,
                 batch_size: int = 4096) -> GroundTruth | None:
    """Recovery and absorption of ``dic`` (in the cache's units) on the held-out split, or None when the
    cache has no ground truth for the array it reconstructs."""
    target = target or source
    truth = directions(cache, target)
    if truth is None:
        return None
    meta = cache.manifest["synthetic"]
    parent = np.asarray(meta["parent"])
    cos = cosines(dic.W_dec, truth)
    best = cos.max(axis=1)
    match = cos.argmax(axis=1)
    a, b = cache.split["heldout"]
    absorbed = events = 0
    for r0 in range(a, b, batch_size):
        r1 = min(r0 + batch_size, b)
        x = torch.from_numpy(cache.read(source, r0, r1)).to(dic.W_dec.device)
        active = (dic.encode(x) > 0).cpu().numpy()
        present = cache.read(meta["features"], r0, r1) > 0
        n_abs, n_ev = absorption_counts(active, present, parent, match)
        absorbed, events = absorbed + n_abs, events + n_ev
    return GroundTruth(recovery=float(best.mean()), recovery_parents=float(best[parent < 0].mean()),
                       recovery_children=float(best[parent >= 0].mean()),
                       absorption=absorbed / events if events else float("nan"), absorption_events=events,
                       tokens=b - a)
