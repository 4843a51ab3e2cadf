"""Where a cache lives, as one object: a folder on local disk, or a prefix on object storage.

A path or URL is turned into a :class:`Location` once, where it comes in (a command's argument, a
config's ``cache``): :meth:`Location.of`. Below that, code calls the location's methods and does not ask
which kind it is. An fsspec URL (``s3://bucket/prefix``, ``gs://...``) is object storage, reached through
the filesystem and root that fsspec's ``url_to_fs`` gives (credentials and endpoints from the storage
library's usual environment: for S3 ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
A ``file://`` URL is a local path: a local cache gets ``flock``, renamed commits and created directories
whichever way it is named.

The two kinds differ where the medium does: a local object is written to a temporary file and renamed
(an object PUT is all or nothing already), only a local disk has free space to check, a killed local write
leaves ``*.partial`` files, and a store's reads are retried through brief outages (cache/retry.py).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec

from ..errors import ConfigError
from ..files import write_atomic
from .errors import CacheError
from .retry import retrying

STORE_HINT = "check the URL, the endpoint (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), the network and credentials"

IsCache = Callable[[bytes | None, bool], bool]
"""Whether a folder is a cache, from its root ``zarr.json`` (None: none) and whether it holds a cache's arrays."""


def describe_error(e: BaseException) -> str:
    """An error of a storage library in one short line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def is_partial(name: str) -> bool:
    """A killed writer's temporary file: ours (``.part-*``) or zarr's (``*.partial``)."""
    return name.startswith(".part-") or name.endswith(".partial")


class Location:
    """A cache's place: made by :meth:`of`, one of :class:`Folder` (local disk) or :class:`Prefix`
    (object storage). ``remote`` says whether reads are bound by latency (fetch many chunks per request)."""

    remote: bool

    @staticmethod
    def of(where: str | Path | Location) -> Location:
        """The location of a local path, a ``file://`` URL (a local path too) or an fsspec URL."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if text.startswith("file://"):
            return Folder(Path(text[len("file://"):]))
        return Prefix(text) if "://" in text else Folder(Path(where).expanduser())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and type(other) is type(self) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    # each kind implements these
    @property
    def pathlike(self) -> Path | str:
        """What public functions hand back: a ``Path`` for a folder, the URL string for a prefix."""
        raise NotImplementedError

    def join(self, *parts: str) -> Location:
        raise NotImplementedError

    @property
    def parent(self) -> Location:
        """The folder or prefix this one is in (a folder's, with its path made absolute and links resolved,
        so two spellings of one folder have one parent)."""
        raise NotImplementedError


class Folder(Location):
    """A local directory."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    @property
    def pathlike(self) -> Path:
        return self.path

    def join(self, *parts: str) -> Folder:
        return Folder(self.path.joinpath(*parts))

    @property
    def parent(self) -> Folder:
        return Folder(self.path.resolve().parent)

    def same_place(self, other: Location) -> bool:
        return isinstance(other, Folder) and self.path.resolve() == other.path.resolve()

    def exists(self, key: str = "") -> bool:
        """Whether ``key`` exists here (no key: whether the folder does)."""
        return (self.path / key).exists() if key else self.path.exists()

    def entries(self) -> list[str]:
        """The names directly in the folder (none if it is not there)."""
        return [p.name for p in self.path.iterdir()] if self.path.is_dir() else []

    def listing(self) -> dict[str, int]:
        """Every file under the folder: relative key -> size in bytes."""
        return {p.relative_to(self.path).as_posix(): p.stat().st_size for p in self.path.rglob("*") if p.is_file()}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def read_tail(self, key: str, size: int, n: int = 4) -> bytes:
        """The last ``n`` bytes of the ``size``-byte file ``key``, read alone."""
        with open(self.path / key, "rb") as f:
            f.seek(size - n)
            return f.read(n)

    def write(self, key: str, data: bytes) -> None:
        """Write one file whole: a temporary file renamed into place, so a writer killed midway never
        leaves a torn one, with the mode the user's umask gives a new file (:mod:`matryoshka.files`)."""
        write_atomic(self.path / key, data)

    def remove_object(self, key: str) -> None:
        (self.path / key).unlink()

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written, in seconds since the epoch (None: it is not there)."""
        path = self.path / key
        return path.stat().st_mtime if path.exists() else None

    def remove(self, strict: bool = False) -> None:
        """Remove the folder and everything in it (``strict``: an error raises rather than leaving the rest)."""
        if strict or self.path.exists():
            shutil.rmtree(self.path, ignore_errors=not strict)

    def created_by_us(self) -> Folder | None:
        """What a writer about to create this folder removes if it leaves nothing worth keeping: its
        topmost missing directory (None: the folder exists)."""
        missing, p = None, self.path
        while not p.exists():
            missing, p = p, p.parent
        return Folder(missing) if missing is not None else None

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def _existing_ancestor(self) -> Path:
        p = self.path
        while not p.exists():
            p = p.parent
        return p

    def check_writable(self, what: str = "cache") -> None:
        probe = self._existing_ancestor()
        if not os.access(probe, os.W_OK) or not probe.is_dir():
            raise ConfigError(f"{what}: cannot write to {str(self.path)!r} ({str(probe)!r} is not a writable "
                              "directory)")

    def free_space(self) -> tuple[int, str] | None:
        """Free bytes on the disk this folder is (or will be) on, and the folder that was asked."""
        probe = self._existing_ancestor()
        return shutil.disk_usage(probe).free, str(probe)

    def remove_partials(self, chunks: range | None = None) -> None:
        """Delete the half-written files (zarr's ``*.partial``, never renamed) a killed writer left, of every
        chunk or only of ``chunks`` (a shard's own, while other shards may be writing theirs)."""
        for stray in self.path.rglob("*.partial"):
            parts = stray.relative_to(self.path).parts
            if chunks is None:
                stray.unlink(missing_ok=True)
            elif "c" in parts[:-1]:
                head = parts[parts.index("c") + 1].split(".")[0]
                if head.isdigit() and int(head) in chunks:
                    stray.unlink(missing_ok=True)

    def symlink_target(self) -> str | None:
        """Where the folder points, if it is a symbolic link."""
        return str(self.path.resolve()) if self.path.is_symlink() else None

    def remove_if_empty(self, leftover: str) -> None:
        """After a cache's removal: delete ``leftover`` (its lock file), then the folder if nothing else is there."""
        (self.path / leftover).unlink(missing_ok=True)
        if not any(self.path.iterdir()):
            self.path.rmdir()

    def find_caches(self, is_cache: IsCache, max_depth: int) -> list[Path]:
        """The caches under this folder, ``max_depth`` levels deep at most (see :data:`IsCache`)."""
        if not self.path.is_dir():
            raise CacheError(f"cache ls: {str(self.path)!r} " + (
                "is not a directory" if self.path.exists() else "does not exist (no cache has been harvested there)"))
        found, base = [], len(self.path.parts)
        for dirpath, dirnames, _ in os.walk(self.path):
            p = Path(dirpath)
            meta = p / "zarr.json"
            arrays = (p / "acts" / "zarr.json").is_file() and (p / "tokens" / "zarr.json").is_file()
            if is_cache(meta.read_bytes() if meta.is_file() else None, arrays):
                dirnames.clear()
                found.append(p)
            elif len(p.parts) - base >= max_depth:
                dirnames.clear()
            dirnames.sort()
        return found


class Prefix(Location):
    """A prefix on object storage: an fsspec filesystem and the root path inside it."""

    remote = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.protocol = url.split("://", 1)[0]

    def __str__(self) -> str:
        return self.url

    @property
    def pathlike(self) -> str:
        return self.url

    def join(self, *parts: str) -> Prefix:
        return Prefix("/".join([self.url.rstrip("/"), *parts]))  # (``Path`` would fold the URL's ``//``)

    @property
    def parent(self) -> Prefix:
        return Prefix(self.url.rstrip("/").rsplit("/", 1)[0])

    def same_place(self, other: Location) -> bool:
        return isinstance(other, Prefix) and self.url.rstrip("/") == other.url.rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}"

    def exists(self, key: str = "") -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._key(key) if key else self.root)

    def entries(self) -> list[str]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]

    def listing(self) -> dict[str, int]:
        self.fs.invalidate_cache()
        return {p[len(self.root) + 1:]: int(info["size"]) for p, info in self.fs.find(self.root, detail=True).items()}

    def total_bytes(self) -> int:
        self.fs.invalidate_cache()
        return int(self.fs.du(self.root, total=True))

    def read(self, key: str) -> bytes:
        return retrying(lambda: self.fs.cat_file(self._key(key)), f"reading {self.url}/{key}")

    def read_tail(self, key: str, size: int, n: int = 4) -> bytes:
        return retrying(lambda: self.fs.cat_file(self._key(key), start=size - n, end=size), f"reading {self.url}/{key}")

    def write(self, key: str, data: bytes) -> None:
        """One PUT: an object is written whole or not at all."""
        retrying(lambda: self.fs.pipe_file(self._key(key), data), f"writing {self.url}/{key}")

    def remove_object(self, key: str) -> None:
        retrying(lambda: self.fs.rm_file(self._key(key)), f"removing {self.url}/{key}")

    def upload(self, key: str, source: Path) -> None:
        """Put the local file ``source`` at ``key`` (one PUT, or a multipart upload that lands whole)."""
        retrying(lambda: self.fs.put_file(str(source), self._key(key)), f"writing {self.url}/{key}")

    def download(self, key: str, dest: Path) -> None:
        """Get ``key`` into the local file ``dest`` (its folder is created)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda: self.fs.get_file(self._key(key), str(dest)), f"reading {self.url}/{key}")

    def copy(self, source: str, dest: str) -> None:
        """Copy the object ``source`` to ``dest`` on the store itself (no bytes through this machine)."""
        retrying(lambda: self.fs.copy(self._key(source), self._key(dest)), f"copying {self.url}/{source}")

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written, in seconds since the epoch (None: it is not there)."""
        self.fs.invalidate_cache()
        try:
            info = self.fs.info(self._key(key))
        except FileNotFoundError:
            return None
        when = info.get("LastModified") or info.get("mtime") or info.get("updated")  # S3, local, GCS
        if isinstance(when, str):
            when = datetime.fromisoformat(when.replace("Z", "+00:00"))
        return when.timestamp() if isinstance(when, datetime) else float(when)

    def remove(self, strict: bool = False) -> None:
        """Remove everything under the prefix (nothing there: nothing to do); errors always raise."""
        self.fs.invalidate_cache()
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def created_by_us(self) -> Prefix | None:
        """The prefix itself if nothing is there yet (a writer removes it again if it leaves nothing worth keeping)."""
        return None if self.exists() else self

    def make(self) -> None:
        """Nothing to create: an object's prefix exists once an object is written under it."""

    def check_writable(self, what: str = "cache") -> None:
        """The bucket (the URL's first component) must exist: a typo should fail before the LM loads."""
        try:
            self.check_bucket(f"{what}: cannot write to")
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
            raise CacheError(f"{what}: cannot reach {self.url!r} ({describe_error(e)}); {STORE_HINT}") from None

    def check_bucket(self, doing: str) -> None:
        """The URL's bucket exists and these credentials may use it: else one line saying which (no such
        bucket, or access denied), ``doing`` first. Listing alone cannot tell: a missing bucket or a refused
        listing look like an empty prefix to some filesystems. A store that cannot be reached raises its own
        error (the caller's to word)."""
        bucket = self.url.split("://", 1)[-1].strip("/").split("/")[0]
        self.fs.invalidate_cache()
        try:
            if "file" not in self.fs.protocol:
                self.fs.info(bucket)  # not exists(): that answers False for a store it cannot reach, too
        except FileNotFoundError:
            raise CacheError(f"{doing} {self.url!r}: bucket {bucket!r} does not exist") from None
        except PermissionError as e:
            raise CacheError(f"{doing} {self.url!r}: access to bucket {bucket!r} was denied ({describe_error(e)}); "
                             "check the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
                             ) from None

    def free_space(self) -> None:
        """A bucket has no free space to check."""

    def remove_partials(self, chunks: range | None = None) -> None:
        """An object PUT is all or nothing: a killed writer leaves no partial objects."""

    def symlink_target(self) -> None:
        """Object storage has no links."""

    def remove_if_empty(self, leftover: str) -> None:
        """A prefix with no objects is gone already (and an object lock deletes itself on release)."""

    def find_caches(self, is_cache: IsCache, max_depth: int) -> list[str]:
        """URLs of the caches under this prefix (see :data:`IsCache`), reading every ``zarr.json`` in one request;
        a missing bucket or refused credentials are one line each, not an empty listing."""
        self.check_bucket("cache ls:")
        self.fs.invalidate_cache()
        listed = set(self.fs.find(self.root, maxdepth=max_depth + 2))
        metas = sorted(p for p in listed if p.endswith("/zarr.json") or p == "zarr.json")
        blobs: dict[str, Any] = self.fs.cat(metas) if metas else {}
        # a folder is a candidate if it has a zarr.json, or a cache's arrays under a missing one
        prefixes = {p[: -len("/zarr.json")] for p in metas} | {p[: -len("/tokens/zarr.json")] for p in metas
                                                                if p.endswith("/tokens/zarr.json")}
        found: list[str] = []
        for prefix in sorted(prefixes):
            if any(prefix.startswith(f + "/") for f in found):
                continue  # an array's zarr.json inside a cache already found
            arrays = f"{prefix}/acts/zarr.json" in listed and f"{prefix}/tokens/zarr.json" in listed
            if is_cache(blobs.get(f"{prefix}/zarr.json"), arrays):
                found.append(prefix)
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return [f"{protocol}://{p}" for p in sorted(found)]
