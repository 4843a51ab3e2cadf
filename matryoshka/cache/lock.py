"""One writer per cache: ``flock`` on a local disk, a lock object with a heartbeat on object storage.

Local paths keep ``flock`` on ``<cache>/.writer.lock``: the kernel releases it on any exit, SIGKILL
included, so a killed harvest never leaves a stale lock and ``--resume`` just works. A lock object
cannot promise that (a dead writer's object stays behind), so it is used only where ``flock`` does not
exist: object storage.

On object storage the lock is the object ``<cache>/.writer.lock``, JSON with the owner's host, pid, a
random id, and a heartbeat timestamp that a background thread rewrites every ``heartbeat_s`` seconds.

* Acquiring creates it only if absent (S3 ``If-None-Match: *``, through fsspec's ``mode="create"``), so
  of two writers starting at once exactly one wins; the other is refused with the owner and the age
  of its heartbeat.
* A lock whose heartbeat is older than ``stale_s`` belongs to a writer that died (or stalled), and so
  does one whose holder ran on this host under a pid that no longer exists (stale at once): it is
  refused too, unless ``--break-lock`` is given, which replaces it only if it is still that very object
  (S3 ``If-Match`` on its ETag), so two writers breaking one stale lock cannot both win. A live lock is
  never broken.
* Heartbeats overwrite the lock only if it is still the object this writer wrote last (``If-Match``),
  and the writer checks that before every commit, so a writer whose lock was broken stops before its
  next commit. The race window is the time between that check and the commit's single PUT
  (milliseconds); staleness compares the owner's clock with the reader's, so clocks must agree to well
  within ``stale_s`` (NTP).

The same two locks guard a run folder while it is trained or evaluated (``what="run"``): whoever holds
it records what it is doing (``doing``, e.g. "trained"), and a second writer is refused with that, the
holder's pid and host.

Stores without conditional writes (fsspec backends other than S3) fall back to check-then-write,
re-reading the object after writing it; two writers starting within one round trip of each other could
then both proceed. Google Cloud Storage is in between: its create-if-absent (``ifGenerationMatch=0``,
fsspec's ``mode="create"`` in gcsfs) makes acquiring race-free, but gcsfs offers no write conditional on
an object's generation, so breaking a stale lock and heartbeats check, write and re-read
(docs/remote.md, "One writer at a time", says so to users).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import MatryoshkaError
from .location import Location
from .retry import retrying

LOCK_NAME = ".writer.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class CacheLockedError(MatryoshkaError, RuntimeError):
    pass


class ConditionFailed(RuntimeError):
    """A conditional write of the lock object lost: another writer's object is there, or changed under us."""


def holder_gone(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder certainly died: it ran on this host and its pid no longer exists. Such a lock
    is stale at once, whatever its heartbeat's age (a holder elsewhere is judged by its heartbeat alone)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


class WriterLock:
    """``flock`` on a local directory, a cache or a run (released by the kernel when its holder dies).
    ``what`` names the directory's kind in messages; ``doing`` is what the holder does, told to the refused."""

    def __init__(self, root: Path, what: str = "cache", doing: str = "written") -> None:
        self.path = Path(root) / LOCK_NAME
        self.what, self.doing = what, doing
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "{}"
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
                doing = h.get("doing", "written")
            except ValueError:
                who, doing = "another process", "written"
            raise CacheLockedError(f"{self.what} {self.path.parent} is being {doing} by {who}; "
                                   f"wait for it to finish (one writer per {self.what})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "doing": self.doing}).encode())
        self._fd = fd
        return self

    def check(self) -> None:
        """A kernel lock cannot be taken away from a live holder."""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLock:
    """A lock object with an owner and a heartbeat, for caches on object storage (module docstring)."""

    def __init__(self, url: str | Location, break_lock: bool = False, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, what: str = "cache", doing: str = "written") -> None:
        where = Location.of(url)
        self.url = str(where).rstrip("/")
        self.fs = where.fs
        self.key = f"{where.root}/{LOCK_NAME}"
        self.break_lock, self.heartbeat_s, self.stale_s = break_lock, heartbeat_s, stale_s
        self.what = what
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
                      "since": time.time(), "doing": doing}
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conditional = "s3" in self.fs.protocol
        self._creates = self._conditional or "gs" in self.fs.protocol  # create-if-absent, at least

    # -- the object ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _read(self) -> tuple[dict[str, Any], str | None] | None:
        """The lock's content and ETag (ETag first: a change in between then fails the If-Match)."""
        self.fs.invalidate_cache(self.key)
        etag = None
        try:
            etag = self.fs.info(self.key).get("ETag") if self._conditional else None
            return json.loads(self.fs.cat_file(self.key)), etag
        except FileNotFoundError:
            return None
        except ValueError:
            return {}, etag

    def _put(self, if_absent: bool = False, if_match: str | None = None) -> None:
        """Write the lock: only if absent, only over the object with ETag ``if_match``, or plainly.
        Raises FileExistsError / ConditionFailed when the condition fails (a PermissionError is the store
        refusing this account's write: not a lost race, and not turned into one)."""
        body = self._body()
        if self._conditional:
            kw: dict[str, Any] = {"mode": "create"} if if_absent else ({"IfMatch": if_match} if if_match else {})
            try:
                out = self.fs.pipe_file(self.key, body, **kw)
            except FileExistsError:
                raise
            except OSError as e:
                if "condition" in str(e).lower():  # 412 PreconditionFailed, 409 ConditionalRequestConflict
                    raise ConditionFailed(str(e)) from None
                raise
            self._etag = (out or {}).get("ETag")
            return
        if if_absent and self.fs.exists(self.key):
            raise FileExistsError(self.key)
        self.fs.pipe_file(self.key, body, **({"mode": "create"} if if_absent and self._creates else {}))
        time.sleep(0.05)  # then read it back: a store (or an emulator) may ignore the condition
        mine = self._read()
        if mine is None or mine[0].get("id") != self.owner["id"]:
            raise FileExistsError(self.key)

    def _describe(self, h: dict[str, Any]) -> tuple[str, float]:
        age = time.time() - float(h.get("heartbeat", 0))
        who = f"pid {h.get('pid')} on {h.get('host')} (lock {str(h.get('id', '?'))[:8]})"
        return who, age

    # -- protocol ------------------------------------------------------------------------------------
    def acquire(self) -> ObjectLock:
        try:
            self._put(if_absent=True)
        except (FileExistsError, ConditionFailed):  # exists, or a concurrent create won
            self._take_over()
        self._thread = threading.Thread(target=self._beat, name="cache-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> None:
        """The lock exists: refuse, naming its owner, unless it is stale and --break-lock was given."""
        found = self._read()
        if found is None:  # released between our attempt and now: one more try
            try:
                return self._put(if_absent=True)
            except (FileExistsError, ConditionFailed):
                found = self._read()
            if found is None:
                raise CacheLockedError(f"{self.what} {self.url}: another writer is taking the lock right now; "
                                       f"try again (one writer per {self.what})")
        h, etag = found
        who, age = self._describe(h)
        gone = holder_gone(h)
        if age <= self.stale_s and not gone:
            raise CacheLockedError(f"{self.what} {self.url} is being {h.get('doing', 'written')} by {who}, last "
                                   f"heartbeat {age:.0f}s ago; wait for it to finish (one writer per {self.what})")
        if not self.break_lock:
            then = " (and --resume to continue)" if self.what == "cache" else ""  # a run resumes by itself
            if gone:
                raise CacheLockedError(f"{self.what} {self.url} has a stale writer lock of {who}: that process no "
                                       "longer runs on this host, so the writer died; pass --break-lock to take "
                                       f"the lock over{then}")
            raise CacheLockedError(f"{self.what} {self.url} has a stale writer lock of {who}: last heartbeat "
                                   f"{age:.0f}s "
                                   f"ago (stale after {self.stale_s:.0f}s), so that writer died or hung; if it is "
                                   f"gone, pass --break-lock to take the lock over{then}")
        try:
            if self._conditional:
                if etag is None:
                    raise ConditionFailed("no ETag to break the lock conditionally")
                self._put(if_match=etag)
            else:
                self.fs.rm_file(self.key)
                self._put(if_absent=True)
        except (FileExistsError, ConditionFailed):
            raise CacheLockedError(f"{self.what} {self.url}: another writer broke the stale lock of {who} "
                                   "first") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._conditional:
                    self._put(if_match=self._etag)
                else:
                    self.check()
                    self.fs.pipe_file(self.key, self._body())
            except (ConditionFailed, CacheLockedError):
                self._lost = "its lock was broken by another writer"
                return
            except Exception:  # noqa: BLE001 - a failed heartbeat is retried; check() tells the writer
                continue

    def check(self) -> None:
        """Raise if this writer no longer holds the lock (called before every commit)."""
        if self._lost is None:
            try:  # through a brief outage (cache/retry.py); a lock broken meanwhile is seen once it is read
                found = retrying(self._read, f"reading the writer lock of {self.url}")
            except OSError as e:  # not knowing is not holding: stop, resumable, rather than risk a commit
                raise CacheLockedError(f"{self.what} {self.url}: cannot read this writer's lock before a commit "
                                       f"({e}); nothing more was committed: resume with --resume") from None
            h = found[0] if found else {}
            if h.get("id") != self.owner["id"]:
                who = self._describe(h)[0] if h else "nobody"
                self._lost = f"its lock is now held by {who}"
        if self._lost is not None:
            raise CacheLockedError(f"{self.what} {self.url}: this writer stopped because {self._lost} "
                                   "(--break-lock elsewhere); nothing more was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            found = self._read()
            if found is not None and found[0].get("id") == self.owner["id"]:
                self.fs.rm_file(self.key)

    def __enter__(self) -> ObjectLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_lock(path: str | Path | Location, break_lock: bool = False, what: str = "cache",
                doing: str = "written") -> WriterLock | ObjectLock:
    """The lock for a cache or run path: ``flock`` for a local folder (``file://`` URLs included), a lock
    object on object storage, where ``flock`` does not exist."""
    where = Location.of(path)
    if where.remote:
        return ObjectLock(where, break_lock=break_lock, what=what, doing=doing)
    return WriterLock(Path(str(where)), what=what, doing=doing)
