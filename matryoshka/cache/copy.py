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

from . import remote
from .format import chunk_key, crc_ok
from .lock import LOCK_NAME, writer_lock
from .retry import retrying
from .store import Cache, CacheError, cache_location

ROOT_META = "zarr.json"


def destination(cache: Cache, dest_root: str | Path) -> str | Path:
    """``dest_root/<model>/<fingerprint>`` as harvest names it: where the source sits says nothing (a cache
    at ``./<fingerprint>`` or ``s3://bucket/<fingerprint>`` has no model folder above it)."""
    return cache_location(dest_root, cache.manifest)


def _same_place(a: str | Path, b: str | Path) -> bool:
    if remote.is_url(a) or remote.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _holds_cache(path: str | Path) -> bool:
    return remote.exists(str(path), ROOT_META) if remote.is_url(path) else (Path(path) / ROOT_META).is_file()


def _copied(key: str) -> bool:
    """Objects a copy carries: not the lock, nor a killed writer's temporary file."""
    name = key.rsplit("/", 1)[-1]
    return not (name == LOCK_NAME or name.startswith(".part-") or name.endswith(".partial"))


def _chunk_keys(cache: Cache) -> list[str]:
    return [chunk_key(name, i) for name in [*cache.array_names, "tokens"] for i in range(cache.n_chunks)]


def _tail(path: str | Path, key: str, size: int) -> bytes:
    """An object's last 4 bytes (a chunk's crc32c), read alone: comparing two chunks costs no download."""
    if not remote.is_url(path):
        with open(Path(path) / key, "rb") as f:
            f.seek(size - 4)
            return f.read(4)
    fs, root = remote.filesystem(str(path))
    return retrying(lambda: fs.cat_file(f"{root.rstrip('/')}/{key}", start=size - 4, end=size),
                    f"reading {path}/{key}")


def copy_cache(src: str | Path, dest_root: str | Path, workers: int = 16, progress: bool = True) -> str | Path:
    """Copy the complete cache ``src`` under ``dest_root``; return where it landed."""
    cache = Cache(src)
    cache.require_complete()
    dest = destination(cache, dest_root)
    if _same_place(dest, cache.path):
        raise CacheError(f"cache copy: {cache.path!r} is already at {dest_root!r}; give another destination")
    objects = remote.listing(cache.path)
    missing = [k for k in _chunk_keys(cache) if k not in objects]
    if missing:  # else the destination would say complete without them
        raise CacheError(f"cache copy: {cache.path!r} says complete but lacks {len(missing)} chunk object(s) ("
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); nothing copied: run "
                         "`pipeline cache verify` on the source")
    if remote.is_url(dest):
        remote.check_writable(str(dest))
    created = remote.created_by_us(dest)
    if not remote.is_url(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
    try:
        return _copy(cache, objects, dest, workers, progress)
    except CacheError:  # a damaged source: nothing worth resuming
        if created is not None:
            remote.remove(created)
        raise


def _copy(cache: Cache, objects: dict[str, int], dest: str | Path, workers: int, progress: bool) -> str | Path:
    with writer_lock(dest):
        if _holds_cache(dest):
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
        have = remote.listing(dest)
        todo = {k: n for k, n in objects.items() if _copied(k) and k != ROOT_META}
        bar = tqdm(total=sum(todo.values()), desc="copy", unit="B", unit_scale=True, disable=not progress)

        def one(key: str) -> None:
            n = todo[key]  # a chunk already there is this one if its size and crc32c match; metadata always goes
            if key in chunks and have.get(key) == n >= 4 and _tail(dest, key, n) == _tail(cache.path, key, n):
                bar.update(n)
                return
            data = remote.read_object(cache.path, key)
            if key in chunks and not crc_ok(data):
                raise CacheError(f"cache copy: chunk {key} of {cache.path!r} fails its crc32c check; the "
                                 "destination is not a cache (run `pipeline cache verify` on the source)")
            remote.write_object(dest, key, data)
            bar.update(len(data))

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(one, sorted(todo)))
        finally:
            bar.close()
        remote.write_object(dest, ROOT_META, remote.read_object(cache.path, ROOT_META))  # last: now it is a cache
    return dest
