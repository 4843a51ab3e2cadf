"""Run folders where the team finds them: a local folder, or a prefix on object storage.

``runs_dir`` is a local folder or an fsspec URL (``s3://team/runs``), like a cache root. A run folder holds
the same files either way::

    RUNS_DIR/<cache fingerprint>/<run>/  config.json  metrics.jsonl  checkpoint/  saelens/  eval.json  eval.npz
    RUNS_DIR/<cache fingerprint>/        report.md  report/*.png

so a run copied off a bucket with any tool (``aws s3 cp --recursive``) is a run folder every command reads.

Training, evaluation and the report read and write plain local files. A folder on object storage is worked
on through a local copy (:class:`Workspace`: a temporary folder, removed when the command ends): fetched
before the work, and published object by object at each commit point (a checkpoint, an export, an
``eval.json``, a report). A local folder is its own copy: fetching and publishing do nothing.

A checkpoint is three objects, and object storage renames nothing, so a checkpoint is *whole* when its
``config.json`` (written last, deleted first) is there, and a new one replaces the old the way the local
swap does (``train/trainer.py``), with copies for renames: upload to ``checkpoint.tmp/``; copy ``checkpoint/``
to ``checkpoint.old/`` and delete it; copy ``checkpoint.tmp/`` to ``checkpoint/``; delete the other two. At
every moment ``checkpoint/`` or ``checkpoint.old/`` is whole (:func:`whole_checkpoint` picks it), so a
writer killed anywhere leaves a checkpoint to resume from, and a reader that holds no lock (a teammate
evaluating into their own folder) reads the whole one, again if it changed meanwhile.

One writer per run folder: :meth:`RunFolder.lock` is the cache's writer lock (``cache/lock.py``): ``flock``
locally, the lock object with a heartbeat on object storage, checked before every publish so a writer
whose lock was broken stops before it overwrites anything.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .cache.errors import CacheError
from .cache.location import Location, describe_error
from .cache.lock import LOCK_NAME, ObjectLock, WriterLock, writer_lock
from .errors import MatryoshkaError

CHECKPOINTS = ("checkpoint", "checkpoint.old")
"""Where a whole checkpoint may be, in the order it is looked for (``checkpoint.tmp`` never counts)."""

STATE = "state.pt"
"""The optimiser, schedule and reader state: needed to resume, not to use a run (fetched only for training)."""

EVAL_FILES = ("eval.json", "eval.npz", "metrics.jsonl")
"""What the report reads of each run."""


def whole_checkpoint(exists: Callable[[str], bool]) -> str | None:
    """The name of the run folder's whole checkpoint (``exists``: whether a key is in the folder), or None."""
    return next((name for name in CHECKPOINTS if exists(f"{name}/config.json")), None)


def is_trained(home: Location) -> bool:
    """Whether the run folder ``home`` holds a whole checkpoint with weights."""
    ck = whole_checkpoint(home.exists)
    return ck is not None and home.exists(f"{ck}/model.safetensors")


def last_trained(runs: list[Location]) -> Location:
    """The run of ``runs`` whose checkpoint was written last."""
    return max(runs, key=lambda home: home.modified(f"{whole_checkpoint(home.exists)}/model.safetensors") or 0.0)


class Place:
    """A folder where the team finds it (``home``) and where this process reads and writes it (``work``)."""

    def __init__(self, home: Location, work: Path) -> None:
        self.home, self.work = home, work
        self._lock: WriterLock | ObjectLock | None = None

    def __str__(self) -> str:
        return str(self.home)

    @property
    def name(self) -> str:
        return str(self.home).rstrip("/").rsplit("/", 1)[-1]

    def exists(self, key: str) -> bool:
        return self.home.exists(key)

    def read_json(self, key: str) -> Any | None:
        """``key`` parsed, read from home (None: missing or not JSON: being written, or cut short)."""
        try:
            return json.loads(self.home.read(key))
        except (OSError, ValueError):
            return None

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written at home (seconds since the epoch; None: it is not there)."""
        return self.home.modified(key)

    def fetch(self, keep: Callable[[str], bool] = lambda key: True) -> None:
        """Copy the objects at home that ``keep`` accepts into the local copy (a local folder: nothing to do)."""
        if self.home.remote:
            for key in self.home.listing():
                if keep(key) and not key.endswith(LOCK_NAME):
                    self.home.download(key, self.work / key)

    def publish(self, *names: str) -> None:
        """Copy files or folders of the local copy home, in the order given (a local folder: nothing to do).
        Under a lock object, first check that this process still holds it."""
        if not self.home.remote:
            return
        if self._lock is not None:
            self._lock.check()
        for name in names:
            path = self.work / name
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                self.home.upload(f.relative_to(self.work).as_posix(), f)


class RunFolder(Place):
    """One run's folder (the module docstring): its checkpoint, its lock, its local copy."""

    @contextmanager
    def lock(self, doing: str, break_lock: bool = False) -> Iterator[WriterLock | ObjectLock]:
        """Hold the folder's writer lock: refused (exit 2), naming the holder's pid and host, while another
        process trains or evaluates the run, and in one line when this account may not write the folder
        (evaluating a teammate's runs: the line names ``--results-dir``). Publishing checks the lock."""
        hint = "; to evaluate runs you cannot write, give --results-dir DIR" if doing == "evaluated" else ""
        try:  # a missing bucket or a folder of someone else's: one line, before any work
            self.home.check_writable(what="run")
        except MatryoshkaError as e:
            raise type(e)(f"{e}{hint}") from None
        self.home.make()
        self.work.mkdir(parents=True, exist_ok=True)
        lock = writer_lock(self.home, what="run", doing=doing, break_lock=break_lock)
        try:
            lock.acquire()
        except PermissionError as e:  # the store or the disk refuses this account's write
            raise CacheError(f"run {self.home}: cannot write its lock, permission denied "
                             f"({describe_error(e)}){hint}") from None
        self._lock = lock
        try:
            yield lock
        finally:
            self._lock = None
            lock.release()

    def checkpoint(self) -> str | None:
        """The name of the whole checkpoint at home (None: the run has none)."""
        return whole_checkpoint(self.home.exists)

    def trained(self) -> bool:
        return is_trained(self.home)

    def saved_config(self) -> dict[str, Any] | None:
        """The config.json of the whole checkpoint at home (None: there is none)."""
        ck = self.checkpoint()
        return None if ck is None else self.read_json(f"{ck}/config.json")

    def fetch(self, keep: Callable[[str], bool] = lambda key: True, state: bool = True) -> None:
        """The run into its local copy, its whole checkpoint as ``checkpoint/`` (``state``: with the optimiser
        state, which only training needs). A checkpoint replaced while it was read, or an object gone between the
        listing and its read, is read again."""
        if not self.home.remote:
            return
        for _ in range(5):
            ck = self.checkpoint()
            try:
                before = self.home.read(f"{ck}/config.json") if ck else None
                self._download(ck, keep, state)
            except FileNotFoundError:  # an object listed, then replaced or removed by the run's writer
                continue
            if ck is None or (self.home.exists(f"{ck}/config.json") and self.home.read(f"{ck}/config.json") == before):
                return
        raise CacheError(f"run {self.home}: its checkpoint kept changing while it was read; try again when its "
                         "training has stopped")

    def _download(self, ck: str | None, keep: Callable[[str], bool], state: bool) -> None:
        """One pass of :meth:`fetch`: the local copy made afresh, the checkpoint ``ck`` as ``checkpoint/``."""
        shutil.rmtree(self.work, ignore_errors=True)
        for key in self.home.listing():
            top, _, rest = key.partition("/")
            if key.endswith(LOCK_NAME) or not keep(key) or (top == "checkpoint.tmp"):
                continue
            if top in CHECKPOINTS:
                if top != ck or (rest == STATE and not state):
                    continue
                key_here = f"checkpoint/{rest}"
            else:
                key_here = key
            self.home.download(key, self.work / key_here)

    def publish_checkpoint(self) -> None:
        """The local ``checkpoint/`` home, replacing the checkpoint there (module docstring: at every moment
        one whole checkpoint is at home)."""
        if not self.home.remote:
            return
        if self._lock is not None:
            self._lock.check()
        local = self.work / "checkpoint"
        names = sorted((p.name for p in local.iterdir()), key=lambda n: n == "config.json")  # config.json last
        keys = set(self.home.listing())  # listed once: under the run's lock only this writer changes the folder
        self._remove(keys, "checkpoint.tmp")
        for n in names:
            self.home.upload(f"checkpoint.tmp/{n}", local / n)
            keys.add(f"checkpoint.tmp/{n}")
        if whole_checkpoint(lambda key: key in keys) == "checkpoint":
            self._remove(keys, "checkpoint.old")
            self._move(keys, "checkpoint", "checkpoint.old", names)
        else:  # a kill left ``checkpoint/`` part-written (``checkpoint.old/`` is whole): clear it
            self._remove(keys, "checkpoint")
        self._move(keys, "checkpoint.tmp", "checkpoint", names)
        self._remove(keys, "checkpoint.old")

    def _move(self, keys: set[str], source: str, dest: str, names: list[str]) -> None:
        """Copy ``source/`` to ``dest/`` config.json last, then delete ``source/`` config.json first."""
        for n in names:
            self.home.copy(f"{source}/{n}", f"{dest}/{n}")
            keys.add(f"{dest}/{n}")
        self._remove(keys, source)

    def _remove(self, keys: set[str], folder: str) -> None:
        """Delete the objects of ``folder/`` (of ``keys``, the folder's, kept current), config.json first (it is
        no longer whole from the first delete)."""
        inside = sorted((k for k in keys if k.startswith(folder + "/")), key=lambda k: not k.endswith("/config.json"))
        for key in inside:
            self.home.remove_object(key)
            keys.discard(key)


class Workspace:
    """Where one command works on run folders: in place for local ones; for ones on object storage, a
    temporary local folder (removed by :meth:`close`) in which each URL's path is mirrored, so a run's copy
    sits in its cache folder's copy as the run sits in the cache folder."""

    def __init__(self) -> None:
        self._scratch: Path | None = None

    def _work(self, home: Location) -> Path:
        if not home.remote:
            return Path(str(home))
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="matryoshka-runs-"))
        protocol, _, path = str(home).partition("://")
        return self._scratch / protocol / path.strip("/")

    def place(self, where: str | Path | Location) -> Place:
        home = Location.of(where)
        return Place(home, self._work(home))

    def run(self, where: str | Path | Location) -> RunFolder:
        home = Location.of(where)
        return RunFolder(home, self._work(home))

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def trained_runs(root: str | Path | Location) -> list[Location]:
    """Every trained run folder under ``root`` (a runs folder, or one cache's folder in it), by path."""
    where = Location.of(root)
    if not where.exists():
        return []
    keys = set(where.listing())
    runs = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3 and parts[-1] == "model.safetensors" and parts[-2] in CHECKPOINTS:
            run = "/".join(parts[:-2])
            if whole_checkpoint(lambda k, run=run: f"{run}/{k}" in keys) == parts[-2]:
                runs.add(run)
    return [where.join(*run.split("/")) for run in sorted(runs)]
