"""Opening a cache for writing: the one entry point that a harvest, a shard of one and a repair go through.

``with open_writer(location, manifest, resume=..., break_lock=...) as session:`` checks that the place can
be written and is not someone else's folder, creates it, takes the cache's writer lock, refuses a cache
that cannot continue (another fingerprint, other settings, unfinished without ``--resume``), checks the
free space, then creates the store or resumes it (deleting a killed writer's partial files) and yields a
:class:`WriteSession`, whose :meth:`WriteSession.writer` makes the :class:`.writer.CacheWriter` that writes
chunks. On the way out, on success or error alike, every writer is aborted (committed chunks stay) and the
lock released; after an error, a folder this session created is removed again if nothing in it is worth
resuming (nothing committed, or ``session.discard`` set).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from ..errors import ConfigError
from .errors import CacheError
from .format import row_bytes
from .location import Location, is_partial
from .lock import LOCK_NAME, CacheLockedError, ObjectLock, WriterLock, writer_lock
from .manifest import identity_difference
from .store import Cache
from .writer import CacheWriter, create_arrays

CACHE_ENTRIES = {"zarr.json", "acts", "tokens", "shards", "ground_truth", LOCK_NAME}
"""What a cache folder holds (a killed writer's temporary files aside)."""


def check_not_foreign(where: Location) -> None:
    """A folder that is not a cache must be new or empty: the cache would be written among someone's files,
    and ``cache rm`` would be asked to delete it with them. A cache whose root zarr.json was deleted is refused
    too: a new root over its old arrays fails half-way and leaves an empty "partial" cache."""
    names = where.entries()
    if "zarr.json" not in names and ("acts" in names or "tokens" in names):
        raise CacheError(f"cache: {str(where)!r} holds a cache's arrays but no root zarr.json (deleted, or a "
                         "`cache copy` interrupted before its last step); nothing was written: run the copy again, "
                         "restore the zarr.json, or delete the folder (or give another --cache) and harvest again")
    foreign = [n for n in names if n not in CACHE_ENTRIES and not is_partial(n)]
    if foreign and "zarr.json" not in names:
        raise ConfigError(f"cache: {str(where)!r} is a folder that is not a cache and holds {len(foreign)} other "
                          f"entr{'y' if len(foreign) == 1 else 'ies'} ({', '.join(sorted(foreign)[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); give --cache a new or empty folder")


def check_space(where: Location, manifest: dict[str, Any], start_row: int) -> None:
    """Enough free disk for the rows from ``start_row`` on, uncompressed (object storage: nothing to check)."""
    free = where.free_space()
    if free is None:
        return
    dtype = manifest["storage"]["dtype"]
    per_token = sum(row_bytes(a["width"], dtype) for a in manifest["arrays"].values()) + 4
    need = (manifest["n_tokens"] - start_row) * per_token
    if need > free[0]:
        raise ConfigError(f"cache: {need / 1e9:.2f} GB needed (uncompressed) but only {free[0] / 1e9:.2f} GB free "
                          f"at {free[1]!r}; lower --tokens or choose another --cache")


def _refuse_other_settings(path: str, old: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A complete cache's settings outside the fingerprint (codec, held-out split, chunk size) must not be
    dropped silently; a larger cache's chunking and split follow from its own token count; the split is named
    before the chunk size, which follows from it (config.holdout_layout)."""
    if old["n_tokens"] < manifest["n_tokens"]:
        raise CacheError(f"cache: {path!r} is complete with {old['n_tokens']} tokens; extending it "
                         f"to {manifest['n_tokens']} is not supported yet: harvest to another --cache")
    same_size = old["n_tokens"] == manifest["n_tokens"]
    for key, was, now in [("codec", old["storage"]["codec"], manifest["storage"]["codec"]),
                          *([("held-out split", old["split"]["heldout"], manifest["split"]["heldout"]),
                             ("chunk_tokens", old["storage"]["chunk_tokens"], manifest["storage"]["chunk_tokens"])]
                            if same_size else [])]:
        if was != now:
            raise CacheError(f"cache: {path!r} is complete with {key} {was!r}, not the {now!r} this "
                             "harvest asks for; harvest to another --cache, or leave the setting as it was")


def existing_progress(where: Location, manifest: dict[str, Any], resume: bool,
                      sharded: bool = False) -> dict[str, Any] | None:
    """The progress of a cache already at ``where`` (None if there is none; ``{"complete": True}`` for a
    complete one), refusing what cannot continue."""
    if not where.exists("zarr.json"):
        return None
    path = str(where)
    there = Cache(where)  # refuses another zarr group, and damaged metadata (root or array zarr.json), in one line
    attrs, old = there.group.attrs.asdict(), there.manifest
    if old["fingerprint"] != manifest["fingerprint"]:
        raise CacheError(f"cache: {path!r} holds fingerprint {old['fingerprint']}, this harvest is "
                         f"{manifest['fingerprint']} ({identity_difference(manifest, old)}); choose another "
                         "--cache (the default path never collides)")
    if "shards" in there.group and not attrs.get("complete") and not sharded:
        raise CacheError(f"cache: {path!r} is being harvested in shards; continue it with --shard I/N "
                         "(or torchrun), as it was started")
    if attrs.get("complete"):
        _refuse_other_settings(path, old, manifest)
        return {"complete": True}
    progress = attrs.get("progress", {"chunks": 0})
    if not resume:
        raise CacheError(f"cache: {path!r} is an unfinished harvest ({progress['chunks']} chunks "
                         "committed); pass --resume to continue it")
    for key in ("n_tokens", "storage", "split", "batch_size"):
        if old[key] != manifest[key]:
            raise CacheError(f"cache: --resume with a different {key} ({manifest[key]!r}) than the unfinished "
                             f"harvest at {path!r} ({old[key]!r}); resume with the same settings")
    return progress


@contextmanager
def locked(where: Location, break_lock: bool = False, wait_s: float = 0.0,
           label: str = "") -> Iterator[WriterLock | ObjectLock]:
    """The writer lock of ``where``, waited for up to ``wait_s`` seconds (shards hold the cache's lock only
    for a moment), released on the way out. ``label`` starts the refusal's line (``shard 1/2``)."""
    lock = writer_lock(where, break_lock)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except CacheLockedError as e:
            if time.monotonic() > deadline:
                if label:
                    raise CacheLockedError(f"{label}: {e}") from None
                raise
            time.sleep(0.2)
    try:
        yield lock
    finally:
        lock.release()


@dataclass
class WriteSession:
    """A cache opened for writing, under its writer lock (see :func:`open_writer`)."""

    location: Location
    manifest: dict[str, Any]
    group: zarr.Group
    state: dict[str, Any]
    """The committed progress to continue from; ``{"complete": True}`` for a complete cache."""
    lock: WriterLock | ObjectLock
    created: bool
    """Whether this session created the cache's folder (removed again if it leaves nothing worth resuming)."""
    discard: bool = False
    """Set when what was written can never be finished (the dataset ran out): an error then removes what this
    session created even with chunks committed."""
    writers: list[CacheWriter] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.state.get("complete"))

    def writer(self, progress: dict[str, Any], threads: int, batch_seqs: int, **kw: Any) -> CacheWriter:
        """A writer from ``progress`` (keywords as :class:`CacheWriter`'s) that asks this session's lock
        before every commit, and is aborted when the session ends."""
        w = CacheWriter(self.group, self.manifest, progress, threads=threads, batch_seqs=batch_seqs, **kw)
        w.guard = self.lock.check
        self.writers.append(w)
        return w


@contextmanager
def open_writer(location: str | Path | Location, manifest: dict[str, Any], *, resume: bool = False,
                break_lock: bool = False, sharded: bool = False, wait_s: float = 0.0,
                on_create: Callable[[zarr.Group], None] | None = None) -> Iterator[WriteSession]:
    """Open the cache at ``location`` for writing the harvest ``manifest`` describes (module docstring).

    ``sharded``: only create or check the store of a multi-worker harvest (its shards write their chunk
    ranges under their own locks: harvest/shards.py), so neither free space nor partial files are this
    session's, and nothing is removed. ``wait_s``: how long to wait for the lock. ``on_create``: called with
    the new group after its arrays are created (a sharded harvest records its shards there)."""
    where = Location.of(location)
    where.check_writable()
    check_not_foreign(where)
    created = None if sharded else where.created_by_us()
    where.make()
    session: WriteSession | None = None
    held = ok = False  # only a writer that held the lock may remove what it created
    try:
        with locked(where, break_lock, wait_s) as lock:
            held = True
            try:
                session = _open(where, manifest, lock, resume, sharded, on_create, created is not None)
                yield session
                ok = True
            finally:
                for w in session.writers if session is not None else []:
                    w.abort()
    finally:
        if not ok and held and created is not None and (
                session is None or session.discard or not any(w.committed for w in session.writers)):
            created.remove()


@contextmanager
def open_part_writer(location: str | Path | Location, part: str, manifest: dict[str, Any], *,
                     break_lock: bool = False, label: str = "") -> Iterator[WriteSession]:
    """Write a part of a cache that :func:`open_writer` created (a shard's chunk range) under the part's own
    lock, ``<cache>/<part>/.writer.lock``, so that parts never wait on one another; the part's writers are
    aborted on the way out (what they committed stays)."""
    where = Location.of(location)
    with locked(where.join(*part.split("/")), break_lock, label=label) as lock:
        session = WriteSession(where, manifest, zarr.open_group(str(where), mode="r+"), {}, lock, created=False)
        try:
            yield session
        finally:
            for w in session.writers:
                w.abort()


def _open(where: Location, manifest: dict[str, Any], lock: WriterLock | ObjectLock, resume: bool, sharded: bool,
          on_create: Callable[[zarr.Group], None] | None, created: bool) -> WriteSession:
    """Under the lock: check what is there, then create the store or open it to continue."""
    state = existing_progress(where, manifest, resume, sharded)
    if state is None or not state.get("complete"):
        if not sharded:
            check_space(where, manifest, (state or {"chunks": 0})["chunks"] * manifest["storage"]["chunk_tokens"])
    if state is None:
        group = zarr.create_group(str(where), attributes={"manifest": manifest, "progress": {"chunks": 0}})
        create_arrays(group, manifest)
        if on_create is not None:
            on_create(group)
        state = {"chunks": 0}
    else:
        if not sharded and not state.get("complete"):
            where.remove_partials()  # a killed local write (never renamed); an object PUT is all or nothing
        group = zarr.open_group(str(where), mode="r+")
    return WriteSession(where, manifest, group, state, lock, created)
