"""Top-activating contexts: for every latent, the held-out tokens on which it fires hardest.

While evaluation streams the held-out split, :class:`TopContexts` keeps, per latent, its ``n`` largest
activations and their cache rows (bounded memory: width x n, whatever the split's size; ties go to the
lower row). A cache row r is token ``r % context_size`` of sequence ``r // context_size``, so the rows
and the cache's ``tokens`` array give each context back, decoded with the model's tokenizer and the
activating token marked «like this».
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from ..cache import Cache
from ..train.sparse import Code


class TopContexts:
    """The ``n`` largest activations of each latent and their cache rows (row -1: an empty slot)."""

    def __init__(self, width: int, n: int) -> None:
        self.values = np.zeros((width, n), np.float32)
        self.rows = np.full((width, n), -1, np.int64)

    def add(self, code: Code, cache_rows: np.ndarray) -> None:
        """One batch: ``cache_rows[b]`` is the cache row of batch row b (the reader's ``last_rows``)."""
        self.update(code.latents.numpy(), code.values.float().numpy(), cache_rows[code.rows.numpy()])

    def update(self, latents: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
        n = self.values.shape[1]
        keep = values >= self.values[latents, -1]  # only what can enter a latent's top n (values are > 0)
        latents, values, rows = latents[keep], values[keep], rows[keep]
        if not len(latents):
            return
        touched = np.unique(latents)
        lat = np.concatenate([np.repeat(touched, n), latents])
        val = np.concatenate([self.values[touched].reshape(-1), values])
        row = np.concatenate([self.rows[touched].reshape(-1), rows])
        filled = row >= 0
        order = np.lexsort((np.where(filled, row, np.iinfo(np.int64).max), -val, lat))
        lat, val, row = lat[order], val[order], row[order]
        start = np.searchsorted(lat, lat)  # first position of each entry's latent in the sorted order
        rank = np.arange(len(lat)) - start
        top = rank < n
        self.values[lat[top], rank[top]] = val[top]
        self.rows[lat[top], rank[top]] = row[top]


def cache_tokenizer(cache: Cache) -> tuple[Any | None, str]:
    """The tokenizer of the cache's model, or None and why (then contexts show token ids)."""
    m = cache.manifest["model"]
    if m.get("arch") in ("none", "synthetic"):
        return None, f"the cache's source ({m['name']}) has no tokenizer"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(m["resolved"], revision=m.get("revision")), ""
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "show ids"
        return None, f"the tokenizer of {m['name']!r} could not be loaded ({type(e).__name__})"


def context_text(tokens: np.ndarray, row: int, context_size: int, tokenizer: Any | None,
                 before: int = 12, after: int = 4) -> str:
    """The tokens around cache row ``row`` inside its sequence, the activating one marked «...».
    ``tokens`` is the cache's token array from row 0 (at least up to the sequence's end)."""
    seq0 = row - row % context_size
    a, b = max(seq0, row - before), min(seq0 + context_size, row + after + 1)
    left, tok, right = tokens[a:row].tolist(), [int(tokens[row])], tokens[row + 1:b].tolist()
    if tokenizer is None:
        pieces = [" ".join(map(str, left)), " ".join(map(str, tok)), " ".join(map(str, right))]
        return f"{pieces[0]} «{pieces[1]}» {pieces[2]}".strip()
    left_s, tok_s, right_s = (tokenizer.decode(t) if t else "" for t in (left, tok, right))
    return f"{left_s}«{tok_s}»{right_s}"


def markdown_safe(text: str) -> str:
    """One line of literal text in Markdown: newlines shown as ⏎, HTML and emphasis characters escaped."""
    text = html.escape(text.replace("\r", "").replace("\n", "⏎"), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return text


def top_contexts(cache: Cache, values: np.ndarray, rows: np.ndarray, latents: list[int], tokenizer: Any | None,
                 before: int = 12, after: int = 4) -> dict[int, list[tuple[float, str]]]:
    """Decoded top contexts of ``latents`` from a run's saved ``top_values``/``top_rows``."""
    wanted = rows[latents]
    last = int(wanted.max()) if wanted.size else -1
    if last < 0:
        return {j: [] for j in latents}
    ctx = cache.manifest["context_size"]
    end = min((last // ctx + 1) * ctx, cache.tokens_committed)
    tokens = np.asarray(cache.tokens[:end])  # the held-out split comes first: a small read
    return {j: [(float(v), context_text(tokens, int(r), ctx, tokenizer, before, after))
                for v, r in zip(values[j], rows[j]) if r >= 0] for j in latents}
