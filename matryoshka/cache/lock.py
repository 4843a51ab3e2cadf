"""One writer per cache: an advisory lock the kernel releases when its holder dies.

``flock`` on ``<cache>/.writer.lock`` is released by the kernel on any exit, SIGKILL included, so a
killed harvest never leaves a stale lock behind on a local disk.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".writer.lock"


class CacheLockedError(RuntimeError):
    pass


class WriterLock:
    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "{}"
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
            except ValueError:
                who = "another process"
            raise CacheLockedError(f"cache {self.path.parent} is being written by {who}; "
                                   "wait for it to finish (one writer per cache)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
