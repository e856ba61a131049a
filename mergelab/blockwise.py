"""Splitting element-wise work on independent blocks over threads, without torch.

Used by the torch methods that work in cache-sized blocks (:mod:`mergelab.ops.blocks`) and by the numpy
engine (:mod:`mergelab.numpy_engine`): their kernels (torch's, numpy's ufuncs, ``pread``) release the GIL,
so the chunks of one tensor run on all cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
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
    global _pool
    workers = compute_workers() if workers is None else workers
    workers = max(1, min(workers, blocks))
    if workers == 1:
        if blocks:
            work(0, blocks)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers - 1:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="mergelab-compute")
        pool = _pool
    bounds = [blocks * w // workers for w in range(workers + 1)]
    futures = [pool.submit(work, bounds[w], bounds[w + 1]) for w in range(1, workers)]
    error: BaseException | None = None
    try:
        work(bounds[0], bounds[1])
    except BaseException as exc:  # still wait for the other chunks: they write into shared outputs
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
