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
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

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


def _work(tasks: queue.PriorityQueue) -> None:
    while True:
        task = tasks.get()[2]
        if task is None:
            return
        task.run_here()
        del task  # not held while waiting for the next one: its arrays may be reused


def _stop(tasks: queue.PriorityQueue, threads: int, order: Iterator[int]) -> None:
    """Let ``threads`` workers go once what is queued has run."""
    for _ in range(threads):
        tasks.put((LATER + 1, next(order), None))  # a distinct order: tuples never compare their tasks


class PriorityPool:
    """``workers`` threads taking tasks by priority (``URGENT`` first), then in the order submitted.
    Its threads end with :meth:`shutdown`, or once the pool is garbage (a reader nobody closed).
    Hand-written because it pays (concurrent.futures' pool is first-in first-out and cannot hand a queued
    task to the thread waiting for it): docs/benchmarks.md, "Reader"."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        # the threads hold the queue, not the pool, so an abandoned pool is collected and stops them
        self._threads = [threading.Thread(target=_work, args=(self._queue,), name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        self._stop = weakref.finalize(self, _stop, self._queue, workers, self._order)

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = LATER) -> Task:
        task = Task(fn, args)
        self._queue.put((priority, next(self._order), task))
        return task

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads."""
        self._stop()
        for t in self._threads:
            t.join()
