"""Caches on object storage: one place that knows a cache may be an fsspec URL rather than a directory.

A cache path is a local directory or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file://...``);
credentials and endpoints come from the storage library's usual environment (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for a non-AWS server). zarr reads and writes such URLs
through its ``FsspecStore``; this module adds what zarr does not: listing, sizes, removal, and fetching the
chunks of a reader's block in one concurrent request, since object storage is bound by latency, not bandwidth.

The optional local read-through copy (``local_cache_dir``) keeps every fetched chunk that passes its
crc32c check under ``<dir>/<fingerprint>-<tokens>x<chunk tokens>/<key>``. Committed chunks never change;
the fingerprint names the rows a cache holds, and the layout says which rows each chunk holds (caches of
one fingerprint may differ in token count or chunk size: a harvest extended under another ``--cache``), so
a copy can never be stale; each is still checked by its crc32c when it is decoded.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable

import fsspec

from ..files import write_atomic
from .format import crc_ok
from .retry import log, retrying, transient


def is_url(path: str | Path) -> bool:
    """An fsspec URL of object storage; a ``file://`` URL is a local path (see :func:`local_path`)."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | Path) -> str | Path:
    """``file:///x`` as the path ``/x``, anything else as it is: a local cache gets ``flock``, renamed
    commits and created directories whichever way it is named."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else path


def filesystem(url: str) -> tuple[Any, str]:
    """The (synchronous) fsspec filesystem of ``url`` and the path inside it."""
    return fsspec.core.url_to_fs(url)


def join(root: str | Path, *parts: str) -> str | Path:
    """``root / parts`` for a directory, ``root/parts`` for a URL (``Path`` would fold its ``//``)."""
    if not is_url(root):
        return Path(root).joinpath(*parts)
    return "/".join([str(root).rstrip("/"), *parts])


def exists(url: str, key: str = "") -> bool:
    """Whether ``key`` exists under ``url`` (no key: whether anything does)."""
    fs, root = filesystem(url)
    fs.invalidate_cache()
    return fs.exists(f"{root.rstrip('/')}/{key}" if key else root)


def total_bytes(url: str) -> int:
    """Stored bytes of every object under ``url``."""
    fs, root = filesystem(url)
    fs.invalidate_cache()
    return int(fs.du(root, total=True))


def entries(path: str | Path) -> list[str]:
    """The names directly under a directory or URL prefix (none if nothing is there)."""
    if not is_url(path):
        return [p.name for p in Path(path).iterdir()] if Path(path).is_dir() else []
    fs, root = filesystem(str(path))
    fs.invalidate_cache()
    root = root.rstrip("/")
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []


def listing(path: str | Path) -> dict[str, int]:
    """Every object (file) under a cache path or URL: relative key -> size in bytes."""
    if not is_url(path):
        root = Path(path)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    fs, root = filesystem(str(path))
    fs.invalidate_cache()
    root = root.rstrip("/")
    return {p[len(root) + 1:]: int(info["size"]) for p, info in fs.find(root, detail=True).items()}


def read_object(path: str | Path, key: str) -> bytes:
    if not is_url(path):
        return (Path(path) / key).read_bytes()
    fs, root = filesystem(str(path))
    return retrying(lambda: fs.cat_file(f"{root.rstrip('/')}/{key}"), f"reading {path}/{key}")


def write_object(path: str | Path, key: str, data: bytes) -> None:
    """Write one object whole: a PUT on object storage, a temporary file renamed into place on disk (with
    the mode the user's umask gives a new file: :mod:`matryoshka.files`), so a writer killed midway never
    leaves a torn object."""
    if is_url(path):
        fs, root = filesystem(str(path))
        retrying(lambda: fs.pipe_file(f"{root.rstrip('/')}/{key}", data), f"writing {path}/{key}")
        return
    write_atomic(Path(path) / key, data)


def remove_object(path: str | Path, key: str) -> None:
    """Delete one object (file) under a cache path or URL."""
    if not is_url(path):
        (Path(path) / key).unlink()
        return
    fs, root = filesystem(str(path))
    retrying(lambda: fs.rm_file(f"{root.rstrip('/')}/{key}"), f"removing {path}/{key}")


def remove(path: str | Path) -> None:
    """Remove a directory tree or everything under a URL (nothing there: nothing to do)."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, root = filesystem(str(path))
    fs.invalidate_cache()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def created_by_us(path: str | Path) -> str | Path | None:
    """What a writer about to create ``path`` should remove if it leaves nothing worth keeping: the
    topmost missing directory of a local path, the URL itself if nothing is there yet, else None."""
    if is_url(path):
        return None if exists(str(path)) else path
    missing, p = None, Path(path)
    while not p.exists():
        missing, p = p, p.parent
    return missing


def check_writable(url: str) -> None:
    """The bucket (the URL's first component) must exist: a typo should fail before the LM loads."""
    from .store import CacheError

    try:
        check_bucket(url, "cache: cannot write to")
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        raise CacheError(f"cache: cannot reach {url!r} ({describe_error(e)}); {STORE_HINT}") from None


def check_bucket(url: str, doing: str) -> None:
    """The URL's bucket exists and these credentials may use it: else one line saying which it is (no such
    bucket, access denied, or a store that cannot be reached), ``doing`` first. Listing alone cannot tell:
    a missing bucket or a refused listing look like an empty prefix to some filesystems. A store that cannot
    be reached raises its own error (the caller's to word)."""
    from .store import CacheError

    bucket = url.split("://", 1)[-1].strip("/").split("/")[0]
    fs, _ = filesystem(url)
    fs.invalidate_cache()
    try:
        if "file" not in fs.protocol:
            fs.info(bucket)  # not exists(): that answers False for a store it cannot reach, too
    except FileNotFoundError:
        raise CacheError(f"{doing} {url!r}: bucket {bucket!r} does not exist") from None
    except PermissionError as e:
        raise CacheError(f"{doing} {url!r}: access to bucket {bucket!r} was denied ({describe_error(e)}); check the "
                         f"credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)") from None


STORE_HINT = "check the URL, the endpoint (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), the network and credentials"


def describe_error(e: BaseException) -> str:
    """An error of a storage library in one short line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


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


def find_caches(url: str, max_depth: int = 4) -> list[str]:
    """URLs of the caches under ``url``: prefixes whose ``zarr.json`` carries a matryoshka manifest, and damaged
    ones (see :func:`.store.cache_or_wreck`)."""
    from .store import cache_or_wreck

    check_bucket(url, "cache ls:")
    fs, root = filesystem(url)
    fs.invalidate_cache()
    root = root.rstrip("/")
    listed = set(fs.find(root, maxdepth=max_depth + 2))
    metas = sorted(p for p in listed if p.endswith("/zarr.json") or p == "zarr.json")
    blobs = fs.cat(metas) if metas else {}
    # a folder is a candidate if it has a zarr.json, or a cache's arrays under a missing one
    prefixes = {p[: -len("/zarr.json")] for p in metas} | {p[: -len("/tokens/zarr.json")] for p in metas
                                                            if p.endswith("/tokens/zarr.json")}
    found: list[str] = []
    for prefix in sorted(prefixes):
        if any(prefix.startswith(f + "/") for f in found):
            continue  # an array's zarr.json inside a cache already found
        arrays = f"{prefix}/acts/zarr.json" in listed and f"{prefix}/tokens/zarr.json" in listed
        if cache_or_wreck(blobs.get(f"{prefix}/zarr.json"), arrays):
            found.append(prefix)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [f"{protocol}://{p}" for p in sorted(found)]


class ChunkSource:
    """Stored chunk bytes of one remote cache: many keys fetched concurrently, optionally kept locally."""

    def __init__(self, url: str, name: str, local_cache_dir: str | Path | None = None) -> None:
        """``name``: the folder of this cache's copies under ``local_cache_dir`` (see the module docstring)."""
        self.fs, root = filesystem(url)
        self.root = root.rstrip("/")
        self.protocol = url.split("://", 1)[0]
        self.local = Path(local_path(local_cache_dir)).expanduser() / name if local_cache_dir else None
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
            write_object(self.local, key, data)
        except OSError as e:
            self.keeping = False
            log.warning("local_cache_dir %s: cannot keep copies of chunks (%s); reading them from the store "
                        "from now on", self.local, f"{type(e).__name__}: {e}")
