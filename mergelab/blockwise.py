"""Splitting element-wise work on independent blocks over threads, without torch.

Used by the torch methods that work in cache-sized blocks (:mod:`mergelab.ops.blocks`) and by the numpy
engine (:mod:`mergelab.numpy_engine`): their kernels (torch's, numpy's ufuncs, ``pread``) release the GIL,
so the chunks of one tensor run on all cores.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def compute_workers() -> int:
    """Threads that work on the blocks of one tensor: ``$MERGELAB_COMPUTE_THREADS``, else the number of
    CPUs available to this process (at most 8)."""
    value = os.environ.get("MERGELAB_COMPUTE_THREADS")
    if value:
        return max(1, int(value))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def run_in_chunks(blocks: int, work: Callable[[int, int], None], workers: int | None = None) -> None:
    """Call ``work(first, stop)`` on contiguous chunks of ``range(blocks)``, one chunk per worker thread
    (the calling thread takes the first one), and wait for all; the first error is re-raised.

    torch kernels and numpy ufuncs release the GIL, so chunks of single-threaded kernels on cache-sized
    blocks run in parallel; each chunk allocates its own block buffers. Used when the blocks are
    independent.
    """
    if blocks <= 0:
        return
    workers = compute_workers() if workers is None else workers
    workers = max(1, min(workers, blocks))
    bounds = [blocks * w // workers for w in range(workers + 1)]
    _on_threads([lambda w=w: work(bounds[w], bounds[w + 1]) for w in range(workers)])


def run_blocks(blocks: int, work: Callable[[Iterator[int]], None], workers: int | None = None) -> None:
    """Call ``work(indices)`` on each worker thread (the calling thread is one), where ``indices`` hands
    out the block numbers ``0 .. blocks-1`` one at a time, shared by all workers: a thread slowed down by
    others (the reader and writer threads, another process) simply takes fewer blocks, where the fixed
    halves of :func:`run_in_chunks` leave the faster thread waiting. ``work`` allocates its buffers once
    and loops over ``indices``."""
    if blocks <= 0:
        return
    workers = compute_workers() if workers is None else workers
    workers = max(1, min(workers, blocks))
    counter = itertools.count()

    def indices() -> Iterator[int]:
        while (j := next(counter)) < blocks:  # next() on a count is atomic under the GIL
            yield j

    _on_threads([lambda: work(indices()) for _ in range(workers)])


def _on_threads(calls: list[Callable[[], None]]) -> None:
    """Run the calls on the compute pool (the first on this thread) and wait for all; re-raise the first
    error (after every call ended: they write into shared outputs)."""
    global _pool
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < len(calls) - 1:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=len(calls) - 1, thread_name_prefix="mergelab-compute")
        pool = _pool
    futures = [pool.submit(call) for call in calls[1:]]
    error: BaseException | None = None
    try:
        calls[0]()
    except BaseException as exc:
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
