"""`pipeline cache rm CACHE`: delete a cache, never one being written and never a folder that is not one.

A shared bucket fills with caches nobody trains from any more. Removing one takes the cache's writer
lock first (and each shard's, for a multi-worker harvest), so a harvest, a resume or a `cache copy`
still writing it is refused by name, exactly as a second writer would be. Then the root ``zarr.json``
goes first: from that moment no reader, `cache ls` or harvest sees a cache there, so an interrupted
removal leaves objects but never a cache with chunks missing. Readers hold no lock: a training run
reading the cache when it is removed stops with an unreadable chunk.
"""
from __future__ import annotations

from pathlib import Path

from . import remote
from .lock import ObjectLock, WriterLock, writer_lock
from .store import Cache


def remove_cache(cache: Cache | str | Path, break_lock: bool = False) -> None:
    """Delete a cache (opened already, or a directory or URL); ``break_lock`` takes over a stale lock of
    a writer that died on object storage, as ``harvest --break-lock`` does."""
    cache = cache if isinstance(cache, Cache) else Cache(cache)  # anything that is not a cache is refused
    path = cache.path                                             # here: rm never deletes what it cannot name
    shards = cache.group["shards"].attrs["count"] if "shards" in cache.group else 0
    locks: list[WriterLock | ObjectLock] = [writer_lock(path, break_lock)]
    locks += [writer_lock(remote.join(path, "shards", str(i)), break_lock) for i in range(shards)]
    held: list[WriterLock | ObjectLock] = []
    try:
        for lock in locks:
            held.append(lock.acquire())
        remote.remove_object(path, "zarr.json")
        remote.remove(path)
    finally:
        for lock in reversed(held):
            lock.release()
