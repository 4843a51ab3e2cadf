"""Riding out object storage's transient failures: a dropped connection, a timeout, throttling, a 5xx.

A training run that streams a cache from a bucket for hours, or a harvest that writes one, meets these. The
storage libraries retry only a few times, within seconds, so a brief outage, or S3 answering ``503 SlowDown``
to a team's GPUs all reading one prefix, would otherwise end the run. Here a read or write of chunks is tried
again with exponential backoff (0.5 s, doubling, at most 15 s apart) for up to ``MATRYOSHKA_STORE_RETRY_S``
seconds (default 120), with a warning (one every 5 s at most). A missing object or a refused permission is not
transient and fails at once. Chunk writes are safe to repeat: a chunk is one whole object, and writing it
again writes the same bytes.

The loop, its backoff and its deadline are tenacity's; this module says which errors are transient,
throttles the warnings across threads and words the final error.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_before_delay, wait_exponential

T = TypeVar("T")
log = logging.getLogger("matryoshka.cache")

DEFAULT_RETRY_S = 120.0
WARN_EVERY_S = 5.0
"""At most one retry warning this often, whichever thread retries."""
_last_warning = [-WARN_EVERY_S]
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# s3fs raises S3's error codes as OSError with an errno (s3fs/errors.py): these say the request itself is wrong
# (a bad argument or bucket name, a key too long, the wrong region, a method the store lacks), and asking
# again cannot help; its 5xx, SlowDown, timeouts and unknown codes (EIO) are transient
_PERMANENT_ERRNOS = {errno.EINVAL, errno.EPERM, errno.ENOTEMPTY, errno.EMSGSIZE, errno.ENAMETOOLONG, errno.ENOSYS,
                     errno.EREMCHG}
# transient errors the storage libraries raise outside OSError (botocore's and aiohttp's own classes)
_TRANSIENT_NAMES = {"ConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectionError",
                    "ClientPayloadError"}


class StoreUnavailable(OSError):
    """A store kept failing transiently for the whole retry budget."""


def retry_seconds() -> float:
    """How long a failing read or write of a store is retried (``MATRYOSHKA_STORE_RETRY_S``)."""
    value = os.environ.get("MATRYOSHKA_STORE_RETRY_S", "")
    try:
        return float(value) if value else DEFAULT_RETRY_S
    except ValueError:
        raise ValueError(f"MATRYOSHKA_STORE_RETRY_S: {value!r} is not a number of seconds") from None


def transient(e: BaseException) -> bool:
    """Whether a store's error may pass if the call is tried again: a lost or refused connection, a
    timeout, throttling or a server error (s3fs raises those as OSError; gcsfs as an error with an HTTP
    ``code``); not a missing object, an existing one, a refused permission or a request the store calls
    malformed (a bad bucket name, a key too long, the wrong region)."""
    if isinstance(e, (*_PERMANENT, StoreUnavailable)):
        return False
    if isinstance(e, OSError):
        return e.errno not in _PERMANENT_ERRNOS
    if _TRANSIENT_NAMES & {c.__name__ for c in type(e).__mro__}:
        return True
    code = getattr(e, "code", None)
    return isinstance(code, int) and (code == 429 or code >= 500)


def _warn(what: str, budget: float) -> Callable[[RetryCallState], None]:
    """tenacity's ``before_sleep``: a warning, unless one was logged (by any thread) in the last
    ``WARN_EVERY_S``: 16 writer threads in one outage log a line, not 16. Kept by hand: tenacity's
    ``before_sleep_log`` logs every retry of every thread."""
    def warn(state: RetryCallState) -> None:
        now = time.monotonic()
        if now - _last_warning[0] < WARN_EVERY_S:
            return
        _last_warning[0] = now
        e = state.outcome.exception()
        log.warning("%s failed (%s: %s); retrying in %.1f s (%.0f of %.0f s spent)",
                    what, type(e).__name__, e, state.upcoming_sleep, state.seconds_since_start, budget)
    return warn


def _give_up(what: str) -> Callable[[RetryCallState], NoReturn]:
    """tenacity's ``retry_error_callback``: the budget is spent, and the last error becomes one line."""
    def give_up(state: RetryCallState) -> NoReturn:
        e = state.outcome.exception()
        raise StoreUnavailable(f"{what}: the store kept failing for {state.seconds_since_start:.0f} s "
                               f"({type(e).__name__}: {e}); it may be down or throttling: try again later "
                               "(MATRYOSHKA_STORE_RETRY_S sets how long to retry)") from e
    return give_up


def retrying(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again while it fails transiently, for up to :func:`retry_seconds`; then
    :class:`StoreUnavailable` says so (an error that is not transient is raised at once, as it is).
    ``what`` names the operation in the warnings and the error."""
    budget = retry_seconds()
    return Retrying(retry=retry_if_exception(transient), wait=wait_exponential(multiplier=0.5, max=15.0),
                    stop=stop_before_delay(budget), before_sleep=_warn(what, budget),
                    retry_error_callback=_give_up(what))(call)
