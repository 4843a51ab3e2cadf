"""Stop training on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before they kill a job).

A signal only sets a flag; the training loop looks at it after each step, writes every unfinished run's
checkpoint at that step (with the reader's cursor, as a periodic checkpoint), and raises
:class:`Interrupted`, which the CLI turns into one line and exit status 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM). A resume then continues from that step bit-identically, because the
checkpoint is the same kind the loop writes every ``checkpoint_every`` steps.

A second signal is not waited for: it gets the handler there was before (SIGINT: KeyboardInterrupt;
SIGTERM: the process ends), without a checkpoint.

Handlers can be installed only from the main thread: training started from another thread keeps
Python's default behaviour.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

from ..errors import MatryoshkaError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(MatryoshkaError):
    """Training stopped at a signal after writing its checkpoints; ``exit_code`` is 128 + the signal. Not a
    failure: its line has no ``error:`` prefix."""

    prefix = ""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """While entered: SIGINT and SIGTERM are recorded (the first one in ``received``), not acted on."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        """The first signal is recorded; a second one (Ctrl-C again: training is stuck, e.g. on a reader
        waiting for an unreachable store) gets the handler there was before, at once."""
        if self.received is None:
            self.received = signum
            return
        self.__exit__()
        signal.raise_signal(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._saved[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved.clear()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
