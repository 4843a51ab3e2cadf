"""Files teammates can read: everything this tool writes gets the mode the user's umask gives a new file.

``open()`` creates a file with mode ``0o666 & ~umask``; a temporary file (``tempfile.mkstemp``) and some
libraries (safetensors) create it ``0o600`` instead, and renaming such a file into place would leave a
cache copy, a kept chunk or a checkpoint readable by its writer alone. Every file written through a
temporary name therefore goes through :func:`write_atomic`, and a file a library wrote goes through
:func:`shareable`, so a shared folder works for the whole team exactly as its umask says.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``); elsewhere
    set and restored at once, under a lock so threads of this module never see the 0 in between."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def shareable(path: str | Path) -> None:
    """Give ``path`` (a file this process just wrote) the mode ``open()`` would have given it."""
    os.chmod(path, new_file_mode())


def write_atomic(dest: str | Path, data: bytes) -> None:
    """Write ``dest`` whole through a temporary file renamed into place (a writer killed midway never
    leaves a torn file), with the mode ``open()`` would give it; its folder is created if missing."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:  # a full disk, a kill: no half-written temporary file left behind
        Path(tmp).unlink(missing_ok=True)
        raise


def permission_line(e: PermissionError) -> str:
    """A read's permission error in one line naming the file and saying it is a permission problem, not damage."""
    name = e.filename or "a file"
    try:
        st = os.stat(name)
        owner = f" (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
    except OSError:
        owner = ""
    return (f"permission denied: cannot read {name}{owner}: a permission problem, not a damaged cache; ask "
            "its owner to make it readable (chmod a+r, or a shared umask such as 002) or use a folder of your own")
