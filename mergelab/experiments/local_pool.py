"""Running tasks on a local process pool: ``spawn``ed workers with one torch thread each, at most ``workers``
tasks submitted at a time (so submitted == running), a broken pool replaced and its tasks retried or failed,
and the workers terminated on an interruption. Workers exit when the driver dies, even by ``kill -9``
(:mod:`mergelab.worker_lifetime`)."""

from __future__ import annotations

import os
import traceback
from collections import deque
from collections.abc import Sequence
from typing import Any

from mergelab.experiments.recorder import Recorder, next_claimed
from mergelab.experiments.task import Task
from mergelab.experiments.worker import execute, init_pool_worker


def run_local(todo: Sequence[Task], rec: Recorder, workers: int, art: str) -> None:
    # deferred: the process-pool machinery (6 ms) stays off the 'mergelab --help' path (runners is imported there)
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue: deque[Task] = deque(todo)
    workers = max(1, min(workers, len(todo)))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited OpenMP pools or locks

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_pool_worker,
                                   initargs=(os.getpid(),))

    pool = new_pool()
    in_flight: dict[Any, Task] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:  # at most `workers` submitted: submitted == running
                task = next_claimed(queue, rec)
                if task is None:
                    break
                fut = pool.submit(execute, task.key, task.kind, task.spec, task.fn_ref, art)
                in_flight[fut] = task
            if not in_flight:
                break
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                task = in_flight.pop(fut)
                try:
                    outcome = fut.result()
                except BrokenProcessPool as exc:
                    broken = True
                    outcome = {"ok": False, "error": f"worker process died abruptly (killed, out of memory or "
                                                     f"crashed) while this or a concurrent task ran: {exc}"}
                except BaseException as exc:  # e.g. the arguments could not be pickled
                    outcome = {"ok": False, "error": "".join(traceback.format_exception_only(type(exc), exc))}
                if rec.record(task, outcome):
                    queue.append(task)
            if broken:
                for fut, task in list(in_flight.items()):  # the pool is gone: its other tasks too
                    in_flight.pop(fut)
                    if rec.record(task, {"ok": False, "error": "worker pool broke while this task ran"}):
                        queue.append(task)
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        kill_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)


def kill_pool(pool: Any) -> None:
    """Stop a process pool now: cancel queued work and terminate the worker processes (their running tasks
    are lost; the driver puts them back to pending)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
