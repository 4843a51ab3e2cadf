"""`pipeline cache rm CACHE`: delete a cache, never one being written and never a folder that is not one.

A shared bucket fills with caches nobody trains from any more. Removing one takes the cache's writer
lock first (and each shard's, for a multi-worker harvest), so a harvest, a resume or a `cache copy`
still writing it is refused by name, exactly as a second writer would be. Then the root ``zarr.json``
goes first: from that moment no reader, `cache ls` or harvest sees a cache there, so an interrupted
removal leaves objects but never a cache with chunks missing. Readers hold no lock: a training run
reading the cache when it is removed stops with an unreadable chunk.

Only the cache's own entries go: its zarr nodes (``acts``, ``tokens``, ``shards``, ``ground_truth``: every
child folder with a ``zarr.json``), its lock and a killed writer's temporary files; then the folder, if
nothing else is in it. Whatever else was put there stays, and a cache at a bucket's root leaves the
bucket. A symbolic link is refused rather than followed halfway.
"""
from __future__ import annotations

from pathlib import Path

from .location import Location, is_partial
from .lock import LOCK_NAME, ObjectLock, WriterLock, writer_lock
from .store import Cache, CacheError


def remove_cache(cache: Cache | str | Path, break_lock: bool = False) -> None:
    """Delete a cache (opened already, or a directory or URL); ``break_lock`` takes over a stale lock of
    a writer that died on object storage, as ``harvest --break-lock`` does."""
    cache = cache if isinstance(cache, Cache) else Cache(cache)  # anything that is not a cache is refused
    where = cache.location                                        # here: rm never deletes what it cannot name
    target = where.symlink_target()
    if target is not None:
        raise CacheError(f"cache rm: {cache.path!r} is a symbolic link to {target!r}; remove the "
                         "cache there, or just the link")
    shards = cache.group["shards"].attrs["count"] if "shards" in cache.group else 0
    locks: list[WriterLock | ObjectLock] = [writer_lock(where, break_lock)]
    locks += [writer_lock(where.join("shards", str(i)), break_lock) for i in range(shards)]
    held: list[WriterLock | ObjectLock] = []
    try:
        for lock in locks:
            held.append(lock.acquire())
        where.remove_object("zarr.json")
        _remove_entries(where)
    finally:
        for lock in reversed(held):
            lock.release()
    where.remove_if_empty(LOCK_NAME)


def _remove_entries(where: Location) -> None:
    """Delete the cache's zarr nodes and a killed writer's temporary files under ``where`` (errors raise:
    a cache half removed must not be reported removed)."""
    names = where.entries()
    for name in sorted(n for n in names if where.exists(f"{n}/zarr.json")):
        where.join(name).remove(strict=True)
    for name in names:
        if is_partial(name):
            where.remove_object(name)
