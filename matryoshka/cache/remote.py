"""Caches on object storage: fetching the chunks of a reader's block in one concurrent request (object
storage is bound by latency, not bandwidth), and telling a storage error from this tool's own.

Where a cache lives (a folder or a prefix on object storage) is a :class:`.location.Location`; zarr reads
and writes a URL through its ``FsspecStore``.

The optional local read-through copy (``local_cache_dir``) keeps every fetched chunk that passes its
crc32c check under ``<dir>/<fingerprint>-<tokens>x<chunk tokens>/<key>``. Committed chunks never change;
the fingerprint names the rows a cache holds, and the layout says which rows each chunk holds (caches of
one fingerprint may differ in token count or chunk size: a harvest extended under another ``--cache``), so
a copy can never be stale; each is still checked by its crc32c when it is decoded.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..files import write_atomic
from .format import crc_ok
from .location import STORE_HINT, Folder, Location, Prefix, describe_error
from .retry import log, retrying, transient

__all__ = ["ChunkSource", "is_store_error", "store_error_line"]


_STORE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


def _from_store_library(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in _STORE_LIBRARIES for c in type(e).__mro__)


def is_store_error(e: BaseException) -> bool:
    """Whether an error comes from the filesystem or a storage library (the user's environment to fix:
    a disk, an endpoint, a network, credentials), not from this tool's own code."""
    return isinstance(e, OSError) or _from_store_library(e)


def store_error_line(e: BaseException) -> str:
    """A storage error in one line, with the hint where the store itself may be unreachable."""
    reach = isinstance(e, (ConnectionError, TimeoutError)) or _from_store_library(e)
    return f"storage: {describe_error(e)}" + (f"; {STORE_HINT}" if reach else "")


class ChunkSource:
    """Stored chunk bytes of one remote cache: many keys fetched concurrently, optionally kept locally."""

    def __init__(self, url: str | Prefix, name: str, local_cache_dir: str | Path | None = None) -> None:
        """``name``: the folder of this cache's copies under ``local_cache_dir`` (see the module docstring)."""
        where = Location.of(url)
        if not isinstance(where, Prefix):  # a local cache is read from its files directly (store.Cache)
            raise TypeError(f"ChunkSource: {where} is not on object storage")
        self.fs, self.root, self.protocol = where.fs, where.root, where.protocol
        copies = Location.of(local_cache_dir).join(name) if local_cache_dir else None
        self.local = copies.path if isinstance(copies, Folder) else None
        self.keeping = self.local is not None
        """Whether fetched chunks are still copied to ``local``: off after the first local write fails."""
        self.served = {"local": 0, "store": 0}
        """Chunks served so far from the local copy and from the store (told at the end of a read)."""

    def local_count(self, keys: Iterable[str]) -> int:
        """How many of ``keys`` the local copy already holds."""
        return 0 if self.local is None else sum((self.local / k).is_file() for k in keys)

    def has_local(self, keys: Iterable[str]) -> bool:
        """Whether every key has a local copy (then many threads can read them, no fetch needed)."""
        return self.local is not None and all((self.local / k).is_file() for k in keys)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The bytes of every key; local copies first, the rest in one concurrent fetch."""
        keys = list(keys)
        out: dict[str, bytes] = {}
        missing = []
        for k in keys:
            if self.local is not None and (self.local / k).is_file():
                out[k] = (self.local / k).read_bytes()
            else:
                missing.append(k)
        self.served["local"] += len(keys) - len(missing)  # a stray miscount from two threads is harmless
        self.served["store"] += len(missing)
        if missing:
            retrying(lambda: self._fetch([k for k in missing if k not in out], out),
                     f"fetching {len(missing)} chunk(s) of {self.protocol}://{self.root}")
            for k in missing:  # after the fetch: a local disk's error is not the store's to retry
                if self.keeping and crc_ok(out[k]):  # a damaged chunk is not kept past the store's repair
                    self._keep(k, out[k])
        return out

    def _fetch(self, keys: list[str], out: dict[str, bytes]) -> None:
        """Fetch ``keys`` concurrently into ``out``; raise one error of those that failed (one that is
        not transient first, so a missing object fails at once), keeping what arrived for a retry."""
        paths = [f"{self.root}/{k}" for k in keys]
        got = self.fs.cat(paths, on_error="return")
        errors = []
        for k, p in zip(keys, paths):
            b = got.get(p)
            if isinstance(b, bytes):
                out[k] = b
            else:
                errors.append(b if isinstance(b, Exception) else OSError(f"cannot read {p}: {b!r}"))
        if errors:
            raise min(errors, key=transient)  # False sorts first

    def _keep(self, key: str, data: bytes) -> None:
        """Copy a fetched chunk to ``local`` (atomic: a reader killed mid-write never leaves a torn chunk).
        A local disk that fills up (or is read-only, or over quota) stops the copying, not the run: the
        chunk is in memory already, and the store still serves every other."""
        try:
            write_atomic(self.local / key, data)
        except OSError as e:
            self.keeping = False
            log.warning("local_cache_dir %s: cannot keep copies of chunks (%s); reading them from the store "
                        "from now on", self.local, f"{type(e).__name__}: {e}")
