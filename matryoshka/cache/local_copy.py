"""Say when a local copy (``local_cache_dir``) serves a read: how much of the cache it holds at the start,
and at the end how many chunks still came from the store. Without it, a read served from a stale-looking
or half-filled copy and one served from the bucket look the same, and a slow run cannot be explained."""
from __future__ import annotations

from .format import chunk_key
from .store import Cache

SPLIT_NAMES = {"heldout": "held-out"}
"""How a line names a split: ``heldout`` is the key, "held-out" the word."""


def start_line(cache: Cache, arrays: list[str], split: str | None = None) -> str | None:
    """How much of ``arrays`` (every chunk, or those of ``split``: what the read will take) the cache's local
    copy already holds; None without a local copy."""
    src = cache.chunk_source
    if src is None or src.local is None:
        return None
    chunks = cache.split_chunks(split) if split else range(cache.n_chunks)
    keys = [chunk_key(name, i) for name in arrays for i in chunks]
    have = src.local_count(keys)
    part = f"the {SPLIT_NAMES.get(split, split)} split of " if split else ""
    return (f"local copy: {have} of {len(keys)} chunks ({have / max(len(keys), 1):.0%}) of {part}{cache.path} are "
            f"already in {src.local}; the rest come from the store")


def end_line(cache: Cache) -> str | None:
    """How many chunks this read took from the local copy and from the store; None without a local copy."""
    src = cache.chunk_source
    if src is None or src.local is None:
        return None
    return (f"local copy: {src.served['store']} chunk(s) came from the store, {src.served['local']} from "
            f"{src.local}")
