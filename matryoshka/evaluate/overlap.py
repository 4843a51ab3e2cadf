"""A run is evaluated only on rows it did not train on.

Caches that differ only in ``--tokens`` share one fingerprint: their rows are the same rows (the source is
deterministic, so row ``i`` of one is row ``i`` of the other), but a percentage ``--holdout`` gives them
different held-out splits. With ``holdout: 10%``, a run trained on a 40K-token cache read rows from about
4K on, and an 80K-token cache holds out its first 8K rows: evaluated there, the run is scored on some 4K
rows it trained on.

Decision: each run records the row ranges it trained on (``trained_rows`` in its config.json: the training
cache's train split, one range per cache it was trained or resumed on), and evaluation refuses, in one line
before any work, a cache whose held-out rows meet them. The alternative, the split inside the fingerprint,
would split one set of rows into many identities (every ``--tokens`` or ``--holdout`` a new cache name, a
new runs folder, no sharing of a larger cache's runs), and would still not say *which* rows a run saw; a
held-out split fixed independently of the size would forbid the percentage form. The record is exact, keeps
the fingerprint meaning "these rows", and allows what is safe: evaluating on any cache of the same rows
whose held-out split ends before the run's training rows begin.

A run written before the record existed trained on its own cache's train split: that cache (``cache`` in
its config) is read for it, and the run is refused if it cannot be opened.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cache import Cache, CacheError


def trained_rows(run: Path, config: dict[str, Any], cache: Cache) -> list[list[int]]:
    """The row ranges ``[start, end)`` the run trained on (see the module docstring)."""
    if "trained_rows" in config:
        return config["trained_rows"]
    if config.get("cache") == cache.path:
        return [cache.split["train"]]
    try:
        return [Cache(config["cache"]).split["train"]]
    except (CacheError, OSError, KeyError):
        raise CacheError(f"evaluate: run {str(run)!r} does not record the rows it trained on and its cache "
                         f"{config.get('cache')!r} cannot be read to find them; evaluate it on that cache, or "
                         "retrain it") from None


def check_disjoint(run: Path, config: dict[str, Any], cache: Cache) -> None:
    """Refuse, in one line, a cache whose held-out rows include rows the run trained on."""
    a, b = cache.split["heldout"]
    for start, end in trained_rows(run, config, cache):
        shared = min(b, end) - max(a, start)
        if shared > 0:
            raise CacheError(
                f"evaluate: run {str(run)!r} trained on rows {start:,}..{end:,} and {cache.path!r} holds out rows "
                f"{a:,}..{b:,}: {shared:,} held-out rows were trained on; evaluate it on a cache whose held-out "
                f"split ends by row {start:,} (its own: {config.get('cache')!r})")
