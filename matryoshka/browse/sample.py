"""The one pass over held-out rows the browser needs: sparse codes of a contiguous stretch of the split.

Unlike evaluation's shuffled stream, the browser reads the held-out rows in order (the first ``tokens`` of
them, whole sequences), so every token around a top context was encoded too and can be shaded by its
activation. BOS rows (:func:`~matryoshka.cache.format.bos_rows`) are encoded as never firing, as the
reader and the statistics leave them out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import Cache
from ..cache.format import bos_rows
from ..evaluate.features import Codes
from ..train.dictionary import Dictionary


@dataclass
class Sample:
    """Codes of cache rows ``start .. start + codes.n`` (token index t is cache row ``start + t``)."""

    codes: Codes
    start: int
    tokens: np.ndarray  # [n] the cache's token ids of those rows
    live: int           # rows that are not BOS rows: the density denominator

    def rows(self, t: np.ndarray) -> np.ndarray:
        return t + self.start

    def activation(self, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """Activation of ``latents[i]`` on cache row ``rows[i]`` (0 where it does not fire; rows outside
        the sample give NaN)."""
        t = rows - self.start
        inside = (t >= 0) & (t < self.codes.n)
        keys = self.codes.tokens * self.codes.width + self.codes.latents  # sorted: rows in order, then latents
        want = np.where(inside, t, 0) * self.codes.width + latents
        at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        hit = (keys[at] == want) if len(keys) else np.zeros(len(want), bool)
        out = np.where(hit, self.codes.values[at] if len(keys) else 0.0, 0.0).astype(np.float32)
        return np.where(inside, out, np.nan)


@torch.no_grad()
def sample_heldout(dic: Dictionary, cache: Cache, source: str, tokens: int, batch_size: int = 4096,
                   progress: bool = False) -> Sample:
    """Encode the first ``tokens`` held-out rows (inference selection), in order."""
    a, b = cache.split["heldout"]
    end = min(b, a + tokens)
    ctx = cache.manifest["context_size"]
    ids = np.asarray(cache.tokens[a:end])
    bos = bos_rows(cache.manifest["bos"], (a + np.arange(end - a)) % ctx, ids)
    parts = []
    for r0 in tqdm(range(a, end, batch_size), desc="browse codes", disable=not progress, leave=False):
        r1 = min(r0 + batch_size, end)
        x = torch.from_numpy(cache.read(source, r0, r1)).to(dic.W_enc.device)
        code = dic.select(dic.pre_acts(x), training=False)
        rows, lat, val = code.rows.cpu().numpy(), code.latents.cpu().numpy(), code.values.float().cpu().numpy()
        keep = (val > 0) & ~bos[rows + r0 - a]
        parts.append((rows[keep] + r0 - a, lat[keep], val[keep]))
    cat = lambda k, dt: np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.empty(0, dt)  # noqa: E731
    codes = Codes(cat(0, np.int64), cat(1, np.int64), cat(2, np.float32), end - a, dic.width)
    return Sample(codes, a, ids, int((~bos).sum()))
