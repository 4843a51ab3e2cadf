"""No asyncio noise after a storage error's one line.

zarr and fsspec run their requests as coroutines on background event loops. When a command stops on a
storage error (a wrong endpoint, say), requests still in flight are abandoned, and the interpreter
finalizes them at exit; aiobotocore's context manager then fails in each one ("Exception ignored in:
<coroutine object FsspecStore.get>", a ValueError about a ContextVar token), about a hundred lines after
the error the user needs. Those coroutines belong to a command that has already failed and said why, so
after a failure their finalization errors are dropped; any other unraisable error is still printed.
"""
from __future__ import annotations

import inspect
import sys


def _drop_abandoned_coroutines(unraisable: sys.UnraisableHookArgs) -> None:
    if inspect.iscoroutine(unraisable.object) or inspect.isasyncgen(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


def quiet_abandoned_coroutines() -> None:
    """From now on, a coroutine left unfinished by a failed command is finalized silently."""
    sys.unraisablehook = _drop_abandoned_coroutines
