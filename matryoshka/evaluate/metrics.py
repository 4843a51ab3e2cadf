"""Reconstruction metrics on a cache's held-out split, with the dictionary's inference selection.

Over the N evaluated (non-BOS) held-out tokens, y the target (the source, for an SAE), y_hat_g the
reconstruction from the first g groups, mu the dataset mean from the cache's statistics:

    FVU            = sum ||y - y_hat||^2 / sum ||y - mu||^2           (also per Matryoshka prefix)
    FVU (scalar mean) = sum ||y - y_hat||^2 / sum (y_ij - m)^2, m the one mean of all N*d numbers (the seed
                     repository's FVU; eval.json's ``fvu_seed``)
    MSE            = sum ||y - y_hat||^2 / (N d)
    cosine         = mean over tokens of cos(y, y_hat)
    L0             = mean number of active latents per token
    density_j      = fraction of tokens on which latent j fires; dead: density 0 (no firing on any evaluated
                     token; training's ``aux_dead`` is another count); dense: density > dense_above
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache import Cache
from ..cache.reader import ReaderConfig, ShuffledReader
from ..train.dictionary import Dictionary


@dataclass
class Reconstruction:
    tokens: int
    fvu: float
    fvu_seed: float
    mse: float
    cosine: float
    l0: float
    prefix_fvu: list[float]
    dead: int
    dense: int
    density: np.ndarray = field(repr=False)
    dead_per_group: list[int] = field(default_factory=list)


def heldout_reader(cache: Cache, arrays: list[str], batch_size: int,
                   device: str | torch.device = "cpu") -> ShuffledReader:
    """Every held-out token once, as float32; a small held-out split gets smaller batches, same tokens.
    The buffer is small but its blocks, at least half a half of it, hold two batches whatever the chunk size
    (order is irrelevant here)."""
    a, b = cache.split["heldout"]
    batch_size = min(batch_size, max(1, (b - a) // 2))
    cfg = ReaderConfig(batch_size=batch_size, buffer_tokens=8 * batch_size + 4 * cache.chunk_tokens, split="heldout")
    return ShuffledReader(arrays, cache, cfg, dtype=torch.float32, device=device)


@torch.no_grad()
def reconstruction(dic: Dictionary, cache: Cache, source: str, target: str | None = None, batch_size: int = 4096,
                   dense_above: float = 0.1) -> Reconstruction:
    """Evaluate ``dic`` (in the cache's units, e.g. from ``matryoshka.load``, on any device) on every held-out
    token once."""
    target = target or source
    device = dic.W_enc.device
    mu = torch.as_tensor(cache.stats(target).mean, dtype=torch.float64, device=device)
    arrays = list(dict.fromkeys([source, target]))
    sse = torch.zeros(dic.n_groups, dtype=torch.float64, device=device)
    sst = s1 = s2 = cos = 0.0
    fired = torch.zeros(dic.width, dtype=torch.float64, device=device)
    n = nnz = 0
    with heldout_reader(cache, arrays, batch_size, device) as reader:
        for _ in range(reader.batches_per_epoch):
            batch = next(reader)
            x, y = batch[source], batch[target]
            code = dic.select(dic.pre_acts(x), training=False)
            prefixes = dic.prefixes(code, x).double()
            yd = y.double()
            sse += (prefixes - yd.unsqueeze(1)).pow(2).sum(dim=(0, 2))
            sst += float((yd - mu).pow(2).sum())
            s1 += float(yd.sum())
            s2 += float(yd.pow(2).sum())
            cos += float(torch.nn.functional.cosine_similarity(prefixes[:, -1], yd, dim=-1).sum())
            fired += torch.bincount(code.latents, minlength=dic.width).double()
            n += len(y)
            nnz += len(code.values)
    d = dic.d_out
    seed_sst = s2 - s1 * s1 / (n * d)
    density = (fired / n).cpu().numpy()
    sse = sse.cpu()
    bounds = [0, *dic.bounds.tolist()]
    return Reconstruction(
        tokens=n, fvu=float(sse[-1] / sst), fvu_seed=float(sse[-1] / seed_sst), mse=float(sse[-1] / (n * d)),
        cosine=cos / n, l0=nnz / n, prefix_fvu=(sse / sst).tolist(), dead=int((density == 0).sum()),
        dense=int((density > dense_above).sum()), density=density,
        dead_per_group=[int((density[a:b] == 0).sum()) for a, b in zip(bounds[:-1], bounds[1:])])
