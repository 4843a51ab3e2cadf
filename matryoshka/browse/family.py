"""Each latent's likely parent in an earlier Matryoshka group, from co-activation and decoder cosine.

Evaluation reports these statistics in aggregate (``features.coactivation``, ``features.decoder_similarity``);
the browser needs them per latent. With n_j the tokens on which latent j fires and C_ij those on which i and j
both fire (the same sparse counts evaluation uses), a latent j of group g > 0 has candidates i in groups
< g ranked by

    share(i, j) = C_ij / n_j        (how often the more general latent i fires when j does)

ties broken by the decoder cosine cos(w_i, w_j), then by the lower index. j's *parent* is its best candidate
when share >= ``min_share``; the *children* of i are the latents whose parent it is. Group-0 latents are the
roots. Work and memory follow the non-zero co-activations (row blocks of a sparse product), never W x W.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..evaluate.features import Codes


@dataclass
class Family:
    parent: np.ndarray      # [W] int64, -1: none (a root, or no candidate reaching min_share)
    share: np.ndarray       # [W] float32: share of the best candidate (0: none)
    cos: np.ndarray         # [W] float32: decoder cosine with the best candidate
    candidates: list[list[tuple[int, float, float]]]  # per latent: (i, share, cos), best first
    group: np.ndarray       # [W] group of each latent

    def children(self) -> list[list[int]]:
        """Per latent, the latents whose parent it is, the most faithful (highest share) first."""
        out: list[list[int]] = [[] for _ in range(len(self.parent))]
        for j in np.lexsort((np.arange(len(self.parent)), -self.share)):
            if self.parent[j] >= 0:
                out[self.parent[j]].append(int(j))
        return out


def unit_rows(W_dec: torch.Tensor) -> np.ndarray:
    w = W_dec.detach().float().cpu().numpy()
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def family(codes: Codes, W_dec: torch.Tensor, group_sizes: list[int], min_share: float = 0.5, top: int = 3,
           block: int = 2048) -> Family:
    from scipy import sparse

    W = codes.width
    bounds = np.cumsum([0, *group_sizes])
    group = np.searchsorted(bounds, np.arange(W), side="right") - 1
    parent = np.full(W, -1, np.int64)
    share = np.zeros(W, np.float32)
    cos = np.zeros(W, np.float32)
    candidates: list[list[tuple[int, float, float]]] = [[] for _ in range(W)]
    if len(group_sizes) < 2 or not len(codes.latents):
        return Family(parent, share, cos, candidates, group)
    w = unit_rows(W_dec)
    fires = codes.fires
    early = int(bounds[-2])  # candidates sit in the groups before the last
    A = sparse.csr_matrix((np.ones(len(codes.latents), np.int32), (codes.tokens, codes.latents)), shape=(codes.n, W))
    AT = A.T.tocsr()
    A_early = A[:, :early].tocsr()
    for j0 in range(int(bounds[1]), W, block):
        C = (AT[j0:j0 + block] @ A_early).tocoo()
        j, i, c = C.row.astype(np.int64) + j0, C.col.astype(np.int64), C.data.astype(np.float64)
        keep = group[i] < group[j]
        j, i, c = j[keep], i[keep], c[keep]
        if not len(j):
            continue
        s = c / fires[j]
        order = np.lexsort((i, -s, j))  # per child: highest share first, then the lower index
        j, i, s = j[order], i[order], s[order]
        first = np.searchsorted(j, j)
        rank = np.arange(len(j)) - first
        near = rank < top + 2  # a few more than shown, so the cosine can break ties among equal shares
        j, i, s = j[near], i[near], s[near]
        cs = np.einsum("nd,nd->n", w[j], w[i])
        order = np.lexsort((i, -cs, -s, j))
        j, i, s, cs = j[order], i[order], s[order], cs[order]
        rank = np.arange(len(j)) - np.searchsorted(j, j)
        for jj, ii, ss, cc in zip(j[rank < top], i[rank < top], s[rank < top], cs[rank < top]):
            candidates[jj].append((int(ii), float(ss), float(cc)))
        best = rank == 0
        share[j[best]], cos[j[best]] = s[best], cs[best]
        parent[j[best]] = np.where(s[best] >= min_share, i[best], -1)
    return Family(parent, share, cos, candidates, group)
