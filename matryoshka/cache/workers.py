"""Worker threads that run the most urgent task first, and tasks the caller may run itself.

The reader's threads decompress blocks and, on the CPU, gather the next batches. A batch's gather is
urgent (the consumer waits for it) and a decompression is not (the next block is needed later), so
gathers jump the queue; and a consumer that finds its batch still queued gathers it on its own thread
rather than wait for a worker to finish decompressing a chunk.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

URGENT, LATER = 0, 1


class Task:
    """A call and the future of its result; it runs once, on whichever thread claims it first."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args, self.future = fn, args, Future()
        self._claim = threading.Lock()

    def run_here(self) -> bool:
        """Run on this thread unless another thread has claimed the task; True if it ran here."""
        if not self._claim.acquire(blocking=False):
            return False
        self.future.set_running_or_notify_cancel()
        fn, args = self.fn, self.args
        self.fn = self.args = None  # let go of its arrays before the waiter hears that it is done
        try:
            result = fn(*args)
        except BaseException as e:  # handed to whoever waits on the future
            del fn, args
            self.future.set_exception(e)
            return True
        del fn, args
        self.future.set_result(result)
        return True

    def cancel(self) -> bool:
        """Keep the task from running, unless it has begun; True if it will not run."""
        if not self._claim.acquire(blocking=False):
            return False
        self.future.cancel()
        self.future.set_running_or_notify_cancel()  # else concurrent.futures.wait() never counts it done
        self.fn = self.args = None
        return True


class PriorityPool:
    """``workers`` threads taking tasks by priority (``URGENT`` first), then in the order submitted."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = LATER) -> Task:
        task = Task(fn, args)
        self._queue.put((priority, next(self._order), task))
        return task

    def _work(self) -> None:
        while True:
            task = self._queue.get()[2]
            if task is None:
                return
            task.run_here()
            del task  # not held while waiting for the next one: its arrays may be reused

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads."""
        for _ in self._threads:
            self._queue.put((LATER + 1, next(self._order), None))
        for t in self._threads:
            t.join()
