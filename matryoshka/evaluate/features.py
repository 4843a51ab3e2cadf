"""Feature metrics: absorption, splitting, monosemanticity and per-group hierarchy statistics.

Notation. W latents with unit decoder directions w_i = W_dec[i] / ||W_dec[i]||; the N evaluated held-out
tokens (at most ``feature_tokens`` of them); n_i the number of those tokens on which latent i fires
(activation > 0 after the inference selection), f_i = n_i / N its density; C_ij the number of tokens on
which i and j both fire. A latent is *rare* when n_i < ``rare_below`` (dead latents, n_i = 0, are rare).
Every pair statistic is over unordered pairs i < j.

    absorption            = #{i<j : cos(w_i, w_j) > absorption_above} / (W (W-1) / 2)        (the seed's)
    splitting             = #{i<j : C_ij / N > split_above} / (W (W-1) / 2)                   (the seed's)
    splitting_conditional = #{i<j non-rare : C_ij / min(n_i, n_j) > split_above} / (L (L-1) / 2),
                            L the number of non-rare latents: how often the rarer of two latents fires
                            only alongside the other, which the seed's rate-of-all-tokens version misses
                            for any latent firing on less than half the tokens
    monosemanticity_i     = ((1 - f_i) + 1 / (1 + H_i)) / 2 for non-rare i (the seed's score), H_i the
                            entropy in nats of the seed's 50-bin histogram of i's nonzero activations:
                            bins of width w = (max - min) / 50 (w = 1/50 around the value when all are
                            equal), h_b = c_b / (n_i w) + 1e-10, p_b = h_b / sum h, H_i = -sum p_b ln p_b.
                            The seed scored dead and rarely firing latents as perfect (entropy 0,
                            sparsity 1); here they are excluded and counted instead. Reported: the mean
                            and median over the scored latents.

Hierarchy, per Matryoshka group g (latents [a_g, b_g); BatchTopK and TopK have one group):

    density        = mean f_i over the group's latents;  l0 = mean number of the group's latents firing
                     per token;  dead, rare = counts of such latents in the group
    earlier_cofire = for g > 0, the fraction of the group's activations (token, latent) on whose token a
                     latent of an earlier group also fires: near 1 when coarse early latents are refined
                     by later ones, low when later latents fire on their own
    within_cos     = mean |cos(w_i, w_j)| over pairs i < j inside the group
    between_cos    = mean |cos(w_i, w_j)| over i in g, j in g + 1 (the seed's "between-group similarity")

Memory. No W x W matrix is ever built. Decoder cosines are computed in row blocks of the upper triangle
(``block_mb`` bytes of float32 per block); co-activation counts are sparse products of a block of latent
rows of the binary code matrix with the whole of it (scipy CSR), so the work and memory follow the
non-zero co-activations, not W^2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import Cache
from ..train.dictionary import Dictionary
from ..train.sparse import Code
from .metrics import heldout_reader

HIST_BINS, HIST_EPS = 50, 1e-10  # the seed's monosemanticity histogram


@dataclass
class Codes:
    """Sparse latent codes of N evaluated tokens: one (token, latent, value) triple per activation."""

    tokens: np.ndarray   # [nnz] int64, 0 .. n-1
    latents: np.ndarray  # [nnz] int64
    values: np.ndarray   # [nnz] float32, > 0
    n: int
    width: int

    @classmethod
    def from_dense(cls, acts: np.ndarray) -> Codes:
        """For tests and small examples: a dense [N, W] activation matrix."""
        t, j = np.nonzero(acts > 0)
        return cls(t.astype(np.int64), j.astype(np.int64), acts[t, j].astype(np.float32), *acts.shape)

    @property
    def fires(self) -> np.ndarray:
        """n_i: tokens on which each latent fires."""
        return np.bincount(self.latents, minlength=self.width)


def _block_rows(width: int, block_mb: float, bytes_per_entry: int) -> int:
    return max(1, min(width, int(block_mb * 2**20 // (bytes_per_entry * width))))


def _top_pairs(pairs: list[tuple[float, int, int]], top: int) -> list[tuple[float, int, int]]:
    return sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))[:top]


# -- decoder geometry -------------------------------------------------------------------------------
@torch.no_grad()
def decoder_similarity(W_dec: torch.Tensor, group_sizes: list[int], above: float = 0.9, block_mb: float = 64,
                       block_rows: int | None = None, top: int = 10, progress: bool = False) -> dict[str, Any]:
    """Absorption and per-group decoder cosines from the upper triangle of cos(w_i, w_j), in row blocks."""
    width = W_dec.shape[0]
    w = W_dec.float()
    norm = w.norm(dim=1).clamp_min(1e-12)  # cosines are scaled per block: no normalised copy of the decoder
    bounds = np.cumsum([0, *group_sizes])
    G = len(group_sizes)
    abs_sum = np.zeros((G, G))
    n_pairs = np.zeros((G, G))
    above_count = 0
    best: list[tuple[float, int, int]] = []
    rows = block_rows or _block_rows(width, block_mb, 4)

    def consume(s: torch.Tensor, i0: int, j0: int, mask: torch.Tensor | None) -> None:
        """One block of cosines, rows i0.., columns j0..; ``mask`` keeps the pairs i < j of a diagonal block.
        The block is overwritten (no copy of its size is made)."""
        nonlocal above_count, best
        if mask is not None:
            s.masked_fill_(~mask, -math.inf)
        above_count += int((s > above).sum())
        k = min(top, s.numel())
        vals, idx = torch.topk(s.reshape(-1), k)
        best = _top_pairs(best + [(float(v), i0 + int(f) // s.shape[1], j0 + int(f) % s.shape[1])
                                  for v, f in zip(vals, idx) if v > -math.inf], top)
        if mask is not None:
            s.masked_fill_(~mask, 0.0)
        s.abs_()
        for gr in range(G):
            r0, r1 = max(bounds[gr], i0), min(bounds[gr + 1], i0 + s.shape[0])
            if r0 >= r1:
                continue
            for gc in range(gr, G):
                c0, c1 = max(bounds[gc], j0), min(bounds[gc + 1], j0 + s.shape[1])
                if c0 >= c1:
                    continue
                rs, cs = slice(r0 - i0, r1 - i0), slice(c0 - j0, c1 - j0)
                abs_sum[gr, gc] += float(s[rs, cs].sum(dim=1).double().sum())  # row sums: no block-sized copy
                n_pairs[gr, gc] += int(mask[rs, cs].sum()) if mask is not None else (r1 - r0) * (c1 - c0)

    for i0 in tqdm(range(0, width, rows), desc="decoder cosines", disable=not progress, leave=False):
        i1 = min(i0 + rows, width)
        block, scale = w[i0:i1], norm[i0:i1, None]
        diag = (block @ block.T).div_(scale).div_(norm[None, i0:i1])
        consume(diag, i0, i0, torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=w.device).triu(1))
        if i1 < width:
            consume((block @ w[i1:].T).div_(scale).div_(norm[None, i1:]), i0, i1, None)
    total = width * (width - 1) // 2
    def mean(a: int, b: int) -> float | None:  # None: no pairs (a group of one latent)
        return float(abs_sum[a, b] / n_pairs[a, b]) if n_pairs[a, b] else None

    return {"absorption": above_count / total if total else 0.0, "absorbed_pairs": above_count,
            "top_similar": [[i, j, round(v, 6)] for v, i, j in best],
            "within_cos": [mean(g, g) for g in range(G)],
            "between_cos": [mean(g, g + 1) if g + 1 < G else None for g in range(G)]}


# -- co-activation ----------------------------------------------------------------------------------
def coactivation(codes: Codes, above: float = 0.5, rare_below: int = 50, block_mb: float = 64,
                 block_rows: int | None = None, top: int = 10, progress: bool = False) -> dict[str, Any]:
    """Splitting (the seed's and the conditional version) from sparse co-activation counts in row blocks."""
    from scipy import sparse

    W, N = codes.width, codes.n
    ones = np.ones(len(codes.latents), np.int32)
    A = sparse.csr_matrix((ones, (codes.tokens, codes.latents)), shape=(N, W))
    AT = A.T.tocsr()
    fires = codes.fires
    live = fires >= max(rare_below, 1)
    seed_count = cond_count = 0
    best: list[tuple[float, int, int]] = []
    rows = block_rows or _block_rows(W, block_mb, 12)  # a block's product holds at most rows*W (int32, int64)
    for i0 in tqdm(range(0, W, rows), desc="co-activation", disable=not progress, leave=False):
        C = (AT[i0:i0 + rows] @ A).tocoo()
        i, j, c = C.row.astype(np.int64) + i0, C.col.astype(np.int64), C.data
        keep = j > i
        i, j, c = i[keep], j[keep], c[keep]
        seed_count += int((c > above * N).sum())
        both = live[i] & live[j]
        cond_count += int((c[both] > above * np.minimum(fires[i[both]], fires[j[both]])).sum())
        if len(c):
            k = np.lexsort((j, i, -c))[:top]  # ties by index: the same pairs whatever the blocks
            best = _top_pairs(best + [(float(c[m]) / N, int(i[m]), int(j[m])) for m in k], top)
    total, L = W * (W - 1) // 2, int(live.sum())
    live_pairs = L * (L - 1) // 2
    return {"splitting": seed_count / total if total else 0.0, "split_pairs": seed_count,
            "splitting_conditional": cond_count / live_pairs if live_pairs else 0.0,
            "conditional_pairs": cond_count, "top_coactive": [[i, j, round(v, 6)] for v, i, j in best]}


# -- monosemanticity --------------------------------------------------------------------------------
def monosemanticity(codes: Codes, rare_below: int = 50) -> np.ndarray:
    """The seed's per-latent score; NaN for rare (and dead) latents, which are not scored."""
    fires = codes.fires
    scored = fires >= max(rare_below, 1)
    out = np.full(codes.width, np.nan)
    keep = scored[codes.latents]
    lat, val = codes.latents[keep], codes.values[keep].astype(np.float64)
    if not len(lat):
        return out
    order = np.argsort(lat, kind="stable")
    lat, val = lat[order], val[order]
    starts = np.flatnonzero(np.r_[True, lat[1:] != lat[:-1]])
    ids = lat[starts]
    lo, hi = np.minimum.reduceat(val, starts), np.maximum.reduceat(val, starts)
    same = hi == lo
    lo = np.where(same, lo - 0.5, lo)  # numpy's histogram range for a constant sample
    span = np.where(same, 1.0, hi - lo)
    rank = np.repeat(np.arange(len(ids)), np.diff(np.r_[starts, len(lat)]))
    b = np.clip(((val - lo[rank]) * (HIST_BINS / span[rank])).astype(np.int64), 0, HIST_BINS - 1)
    counts = np.bincount(rank * HIST_BINS + b, minlength=len(ids) * HIST_BINS).reshape(len(ids), HIST_BINS)
    n = fires[ids].astype(np.float64)
    h = counts / (n * span / HIST_BINS)[:, None] + HIST_EPS
    p = h / h.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    out[ids] = ((1 - n / codes.n) + 1 / (1 + entropy)) / 2
    return out


# -- hierarchy --------------------------------------------------------------------------------------
def hierarchy(codes: Codes, group_sizes: list[int], rare_below: int = 50) -> list[dict[str, Any]]:
    """Per-group density, L0, dead/rare counts and earlier-group co-firing (see the module docstring)."""
    bounds = np.cumsum([0, *group_sizes])
    fires = codes.fires
    group = np.searchsorted(bounds, codes.latents, side="right") - 1
    first_group = np.full(codes.n, len(group_sizes))
    np.minimum.at(first_group, codes.tokens, group)
    earlier = first_group[codes.tokens] < group
    out = []
    for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        mine = group == g
        f = fires[a:b]
        out.append({"group": g, "size": int(b - a), "density": float(f.mean() / codes.n) if codes.n else 0.0,
                    "l0": float(mine.sum() / codes.n) if codes.n else 0.0, "dead": int((f == 0).sum()),
                    "rare": int((f < max(rare_below, 1)).sum()),
                    "earlier_cofire": float(earlier[mine].mean()) if g and mine.any() else None})
    return out


# -- all of them ------------------------------------------------------------------------------------
@dataclass
class FeatureMetrics:
    tokens: int
    absorption: float
    absorbed_pairs: int
    splitting: float
    split_pairs: int
    splitting_conditional: float
    conditional_pairs: int
    monosemanticity: float | None
    monosemanticity_median: float | None
    monosemanticity_scored: int
    monosemanticity_excluded: int
    hierarchy: list[dict[str, Any]]
    top_similar: list[list] = field(default_factory=list)
    top_coactive: list[list] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def feature_metrics(W_dec: torch.Tensor, group_sizes: list[int], codes: Codes, absorption_above: float = 0.9,
                    split_above: float = 0.5, rare_below: int = 50, block_mb: float = 64,
                    block_rows: int | None = None, progress: bool = False) -> FeatureMetrics:
    sim = decoder_similarity(W_dec, group_sizes, absorption_above, block_mb, block_rows, progress=progress)
    co = coactivation(codes, split_above, rare_below, block_mb, block_rows, progress=progress)
    mono = monosemanticity(codes, rare_below)
    scored = mono[~np.isnan(mono)]
    groups = hierarchy(codes, group_sizes, rare_below)
    for g in groups:
        g["within_cos"], g["between_cos"] = sim["within_cos"][g["group"]], sim["between_cos"][g["group"]]
    return FeatureMetrics(
        tokens=codes.n, absorption=sim["absorption"], absorbed_pairs=sim["absorbed_pairs"],
        splitting=co["splitting"], split_pairs=co["split_pairs"], splitting_conditional=co["splitting_conditional"],
        conditional_pairs=co["conditional_pairs"],
        monosemanticity=float(scored.mean()) if len(scored) else None,
        monosemanticity_median=float(np.median(scored)) if len(scored) else None,
        monosemanticity_scored=len(scored), monosemanticity_excluded=codes.width - len(scored), hierarchy=groups,
        top_similar=sim["top_similar"], top_coactive=co["top_coactive"],
        settings={"absorption_above": absorption_above, "split_above": split_above, "rare_below": rare_below})


# -- the held-out stream ----------------------------------------------------------------------------
@torch.no_grad()
def heldout_codes(dic: Dictionary, cache: Cache, source: str, max_tokens: int, batch_size: int = 4096,
                  on_batch: Callable[[Code, np.ndarray], None] | None = None, progress: bool = False) -> Codes:
    """Encode the held-out split (non-BOS tokens, inference selection) once. The first ``max_tokens``
    tokens of the stream are kept as :class:`Codes`; ``on_batch(code, cache_rows)`` sees every batch."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n = 0
    for code, rows in _stream(dic, cache, source, batch_size, progress):
        if on_batch is not None:
            on_batch(code, rows)
        if n < max_tokens:
            take = min(code.batch, max_tokens - n)
            keep = code.rows < take
            parts.append(((code.rows[keep] + n).numpy(), code.latents[keep].numpy(),
                          code.values[keep].float().numpy()))
            n += take
        elif on_batch is None:
            break
    cat = (lambda k, dt: np.concatenate([p[k] for p in parts]).astype(dt)) if parts else \
        (lambda k, dt: np.empty(0, dt))
    return Codes(cat(0, np.int64), cat(1, np.int64), cat(2, np.float32), n, dic.width)


def _stream(dic: Dictionary, cache: Cache, source: str, batch_size: int,
            progress: bool) -> Iterator[tuple[Code, np.ndarray]]:
    with heldout_reader(cache, [source], batch_size, dic.W_enc.device) as reader:
        for _ in tqdm(range(reader.batches_per_epoch), desc="feature codes", disable=not progress, leave=False):
            x = next(reader)[source]
            code = dic.select(dic.pre_acts(x), training=False)
            yield Code(code.rows.cpu(), code.latents.cpu(), code.values.cpu(), code.batch, code.width), \
                reader.last_rows.copy()
