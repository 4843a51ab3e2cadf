"""Sparse latent codes and the sparse decoder.

A batch's code is a list of (row, latent, value) triples, never a dense batch x latents matrix. The
decoder sums ``value * W_dec[latent]`` per (row, group) bag with ``F.embedding_bag``, so one call gives
every Matryoshka group's partial sum, and a cumulative sum over groups gives every prefix
reconstruction: the work is proportional to the active latents, not to the dictionary's width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .distributed import Team


@dataclass
class Code:
    """Active latents of a batch of ``batch`` rows, sorted by row then latent."""

    rows: torch.Tensor     # [n] int64
    latents: torch.Tensor  # [n] int64
    values: torch.Tensor   # [n] float, carries the gradient
    batch: int
    width: int

    def dense(self) -> torch.Tensor:
        """[batch, width]: for users, tests and small batches, never for training."""
        out = torch.zeros(self.batch, self.width, dtype=self.values.dtype, device=self.values.device)
        return out.index_put((self.rows, self.latents), self.values)


def bag_counts(bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Entries per bag (``bag`` < ``n_bags``). ``bincount`` would read the largest bag back to the host
    to size its output (a sync that stalls the GPU's queue); the size is known, so this never syncs."""
    return torch.zeros(n_bags, dtype=torch.long, device=bag.device).index_add_(0, bag, torch.ones_like(bag))


def _sorted(flat: torch.Tensor, values: torch.Tensor, batch: int, width: int) -> Code:
    order = torch.argsort(flat)
    flat, values = flat[order], values[order]
    return Code(flat // width, flat % width, values, batch, width)


def _candidates(flat: torch.Tensor, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and values of a superset of ``flat``'s ``n`` largest entries, ties included.

    A top-k over all B x M values is slow; so a threshold a little below the n-th largest value,
    estimated from a strided sample, keeps a few more candidates than needed (if too few pass, all are
    kept). The sample is a fixed function of ``flat``, so equal inputs give equal candidates.
    """
    if n * 8 < flat.numel():
        stride = max(1, flat.numel() // (1 << 16))
        while math.gcd(stride, width) != 1:  # a stride sharing a factor with the width would sample few latents
            stride += 1
        t = torch.quantile(flat[::stride].float(), 1 - 2 * n / flat.numel())
        idx = torch.nonzero(flat > t).squeeze(1)
        if len(idx) >= n:
            return idx, flat[idx]
    return torch.arange(flat.numel(), device=flat.device), flat


def batch_topk(acts: torch.Tensor, k: int, team: Team | None = None) -> Code:
    """The ``k * B`` largest activations of the whole batch (one selection shared by all groups).

    Exactly defined, ties included: every value above the (k*B)-th largest ``t``, then values equal to
    ``t`` in row-major order until k*B are kept. With a ``team`` of data-parallel ranks (each holding
    ``acts`` of an equal share of the global batch, in rank order), B is the global batch: the ranks
    all-gather their local k*B largest values to find ``t`` and share its ties in rank order, so the
    selection is the one a single process makes on the concatenated batch (train/distributed.py).
    """
    b, m = acts.shape
    flat = acts.reshape(-1)
    size = team.size if team is not None else 1
    n = k * b * size
    idx, vals = _candidates(flat, n, m)
    top = torch.topk(vals, min(n, len(vals)), sorted=False).values
    if size > 1:
        pad = torch.full((n - len(top),), -math.inf, dtype=top.dtype, device=top.device)
        top = torch.topk(team.all_gather(torch.cat([top, pad])), n, sorted=False).values
    t = top.min()
    above = vals > t
    ties = torch.nonzero(vals == t).squeeze(1)
    if size > 1:
        counts = torch.stack([above.sum(), torch.tensor(len(ties), device=flat.device)])
        every = team.all_gather(counts).view(size, 2)
        free = n - every[:, 0].sum() - every[:team.rank, 1].sum()  # earlier ranks' ties go first
    else:
        free = n - above.sum()
    above[ties] = torch.arange(len(ties), device=flat.device) < free  # the first `free` ties, on the device
    keep = torch.nonzero(above & (vals > 0)).squeeze(1)  # one read-back for both selections
    return _sorted(idx[keep], vals[keep], b, m)


def row_topk(acts: torch.Tensor, k: int) -> Code:
    """The ``k`` largest activations of each row."""
    b, m = acts.shape
    vals, idx = torch.topk(acts, k, dim=-1, sorted=False)
    flat = (idx + torch.arange(b, device=acts.device)[:, None] * m).reshape(-1)
    vals = vals.reshape(-1)
    keep = vals > 0
    return _sorted(flat[keep], vals[keep], b, m)


def above(acts: torch.Tensor, threshold: torch.Tensor | float) -> Code:
    """Every activation above ``threshold`` (inference for BatchTopK-trained dictionaries: a JumpReLU)."""
    b, m = acts.shape
    rows, lats = torch.nonzero(acts > threshold, as_tuple=True)
    return Code(rows, lats, acts[rows, lats], b, m)


def group_partials(code: Code, W_dec: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """[batch, groups, d_out]: each group's decoded partial sum, no bias. ``bounds`` are the group ends."""
    n_groups = len(bounds)
    group = torch.bucketize(code.latents, bounds, right=True)
    bag = code.rows * n_groups + group
    # embedding_bag wants bags as offsets into an input sorted by bag; (row, latent) order is (row, group) order.
    counts = bag_counts(bag, code.batch * n_groups)
    offsets = torch.cumsum(counts, 0) - counts
    out = F.embedding_bag(code.latents, W_dec, offsets, mode="sum", per_sample_weights=code.values.to(W_dec.dtype))
    return out.view(code.batch, n_groups, -1)
