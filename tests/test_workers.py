"""The reader's worker pool: urgent tasks first, a task runs once on whichever thread claims it."""
from __future__ import annotations

import threading
from concurrent.futures import wait

from matryoshka.cache.workers import LATER, URGENT, PriorityPool


def test_urgent_tasks_jump_the_queue_and_the_submitter_may_run_a_queued_task_itself():
    pool = PriorityPool(1, "test")
    gate, ran = threading.Event(), []
    blocker = pool.submit(gate.wait)  # the only worker is busy until the gate opens
    tasks = {name: pool.submit(ran.append, name, priority=p)
             for name, p in [("a", LATER), ("b", LATER), ("c", URGENT), ("d", LATER), ("e", URGENT)]}
    assert tasks["d"].run_here() and ran == ["d"]  # run on this thread, now
    assert tasks["b"].cancel() and tasks["b"].future.cancelled()
    gate.set()
    wait([blocker.future] + [t.future for t in tasks.values()], timeout=10)  # a cancelled one counts as done
    pool.shutdown()
    assert ran == ["d", "c", "e", "a"]  # urgent first, then in the order submitted; d and b not again
    assert not tasks["d"].run_here() and not tasks["d"].cancel()  # a task that ran cannot be claimed again


def test_an_error_reaches_whoever_waits_and_the_task_lets_go_of_its_arguments():
    pool = PriorityPool(2, "test")
    task = pool.submit(lambda x: 1 / x, 0)
    try:
        task.future.result(timeout=10)
        raise AssertionError("no error")
    except ZeroDivisionError:
        pass
    big = [0] * 10
    done = pool.submit(len, big)
    assert done.future.result(timeout=10) == 10 and done.args is None and done.fn is None
    pool.shutdown()


def test_an_abandoned_pool_stops_its_threads():
    import gc

    pool = PriorityPool(2, "abandoned")
    threads = list(pool._threads)
    assert pool.submit(sum, [1, 2]).future.result(timeout=10) == 3
    del pool
    gc.collect()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
