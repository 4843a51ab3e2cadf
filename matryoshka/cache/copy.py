"""`pipeline cache copy SRC DEST_ROOT`: share a finished cache with a team, or bring one near the GPUs.

The copy lands at ``DEST_ROOT/<model>/<fingerprint>``, always the path ``pipeline harvest --cache-root
DEST_ROOT`` gives the same harvest (the model folder named from the manifest, never from where the source
sits), so a teammate whose cache root is that bucket finds it by its fingerprint and their harvest of the
same config does nothing. Either side may be a directory or an fsspec URL (local -> S3 to share, S3 ->
local to train from local disk).

A source that says complete but lacks a chunk object is refused before anything is written. Every object
but the root ``zarr.json`` goes first, each activation and token chunk's crc32c checked on the way (a
damaged source chunk stops the copy, named, and what this copy created is removed); the root
``zarr.json``, which makes the destination a cache, goes last. So a copy killed midway is never taken
for a cache, and the same command again copies only what is missing: a chunk already there is kept when
its size and its stored crc32c (its last 4 bytes, read alone) equal the source's, since objects are
written whole, never torn, and a same-size chunk may come from another harvest of one fingerprint; the
small metadata objects are always rewritten (an array's ``zarr.json`` of another length has one size).
The destination's writer lock is held throughout, so a copy and a harvest never write one cache at once.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from .format import chunk_key, crc_ok
from .location import Location, is_partial
from .lock import LOCK_NAME, writer_lock
from .store import Cache, CacheError, cache_location

ROOT_META = "zarr.json"


def destination(cache: Cache, dest_root: str | Path) -> str | Path:
    """``dest_root/<model>/<fingerprint>`` as harvest names it: where the source sits says nothing (a cache
    at ``./<fingerprint>`` or ``s3://bucket/<fingerprint>`` has no model folder above it)."""
    return cache_location(dest_root, cache.manifest)


def _copied(key: str) -> bool:
    """Objects a copy carries: not the lock, nor a killed writer's temporary file."""
    name = key.rsplit("/", 1)[-1]
    return not (name == LOCK_NAME or is_partial(name))


def _chunk_keys(cache: Cache) -> list[str]:
    return [chunk_key(name, i) for name in [*cache.array_names, "tokens"] for i in range(cache.n_chunks)]


def copy_cache(src: str | Path, dest_root: str | Path, workers: int = 16, progress: bool = True) -> str | Path:
    """Copy the complete cache ``src`` under ``dest_root``; return where it landed."""
    cache = Cache(src)
    cache.require_complete()
    dest = Location.of(destination(cache, dest_root))
    if dest.same_place(cache.location):
        raise CacheError(f"cache copy: {cache.path!r} is already at {dest_root!r}; give another destination")
    objects = cache.location.listing()
    missing = [k for k in _chunk_keys(cache) if k not in objects]
    if missing:  # else the destination would say complete without them
        raise CacheError(f"cache copy: {cache.path!r} says complete but lacks {len(missing)} chunk object(s) ("
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); nothing copied: run "
                         "`pipeline cache verify` on the source")
    dest.check_writable()
    created = dest.created_by_us()
    dest.make()
    try:
        return _copy(cache, objects, dest, workers, progress).pathlike
    except CacheError:  # a damaged source: nothing worth resuming
        if created is not None:
            created.remove()
        raise


def _copy(cache: Cache, objects: dict[str, int], dest: Location, workers: int, progress: bool) -> Location:
    src = cache.location
    with writer_lock(dest):
        if dest.exists(ROOT_META):
            there = Cache(dest)
            if there.fingerprint != cache.fingerprint:
                raise CacheError(f"cache copy: {str(dest)!r} holds fingerprint {there.fingerprint}, not "
                                 f"{cache.fingerprint}; give another destination")
            if not there.complete:
                raise CacheError(f"cache copy: {str(dest)!r} holds an unfinished harvest of this cache; finish it "
                                 "with `pipeline harvest --resume`, or remove it and copy again")
            if progress:
                print(f"cache {dest} is already complete; nothing to copy", file=sys.stderr)
            return dest
        chunks = set(_chunk_keys(cache))
        have = dest.listing()
        todo = {k: n for k, n in objects.items() if _copied(k) and k != ROOT_META}
        bar = tqdm(total=sum(todo.values()), desc="copy", unit="B", unit_scale=True, disable=not progress)

        def one(key: str) -> None:
            n = todo[key]  # a chunk already there is this one if its size and crc32c match; metadata always goes
            if key in chunks and have.get(key) == n >= 4 and dest.read_tail(key, n) == src.read_tail(key, n):
                bar.update(n)
                return
            data = src.read(key)
            if key in chunks and not crc_ok(data):
                raise CacheError(f"cache copy: chunk {key} of {cache.path!r} fails its crc32c check; the "
                                 "destination is not a cache (run `pipeline cache verify` on the source)")
            dest.write(key, data)
            bar.update(len(data))

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(one, sorted(todo)))
        finally:
            bar.close()
        dest.write(ROOT_META, src.read(ROOT_META))  # last: now it is a cache
    return dest
