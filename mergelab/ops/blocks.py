"""Cache-sized blocks: element-wise merging done a block of entries at a time.

Converting a bf16 tensor of tens of millions of entries to float32, then subtracting, then accumulating,
makes every step a pass over main memory (and a fresh float32 temporary per step). Done on blocks of
``BLOCK`` entries (1 MiB of float32) the working set of a method stays in the L2/L3 cache: each input is
read from memory once, converted into a reused block buffer, and the float32 temporaries never leave the
cache. Measured on the benchmark's 65M-entry embedding with 4 experts: task arithmetic 2.2 s whole-tensor,
0.4 s in blocks of 2**18, bit-identical results (the same operations in the same order, entry by entry).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

BLOCK = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def block_size() -> int:
    """The block size in entries (``BLOCK``, read at call time so tests can make it small)."""
    return BLOCK


def block_ranges(numel: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of at most ``block`` (default ``BLOCK``) entries covering
    ``range(numel)``."""
    block = BLOCK if block is None else block
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    for start in range(0, numel, block):
        yield start, min(numel, start + block)


class BlockBuffers:
    """``count`` reusable 1-D buffers of ``block`` entries of ``dtype``; :meth:`get` returns views of
    length ``m`` (the last block of a tensor is shorter)."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 block: int | None = None) -> None:
        size = max(1, min(BLOCK if block is None else block, numel))
        self._buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(count)]

    def get(self, m: int) -> list[torch.Tensor]:
        return [b[:m] for b in self._buffers]


def block_count(numel: int, block: int | None = None) -> int:
    """Number of blocks :func:`block_ranges` yields."""
    return -(-numel // (BLOCK if block is None else block))


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

    torch kernels release the GIL, so chunks of single-threaded kernels on cache-sized blocks run in
    parallel; each chunk allocates its own block buffers. Used when the blocks are independent.
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
