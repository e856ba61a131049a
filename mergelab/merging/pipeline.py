"""The merge pipeline's scheduling, shared by every back-end and free of torch.

Three stages run one tensor apart on three threads, in the one streaming loop every back-end runs
(:func:`stream_tensors`, parameterised by the back-end's ``read`` and ``compute``): a read-ahead thread
reads tensor k+1 (:func:`read_ahead`) while the main thread merges tensor k and a write-behind thread writes
tensor k-1 (:class:`mergelab.checkpoints.write_behind.WriteBehind`); small tensors queue deeper, up to
``PIPELINE_BYTES`` of inputs read ahead and of outputs waiting to be written, so a stall of one stage does
not stop the others at once. A back-end whose kernels read their blocks straight from the files (the numpy
back-end's linear methods) gives no ``read``: the loop then hands ``compute`` the name alone. Within a tensor, kernels work on cache-sized blocks, split over the cores by :func:`run_in_chunks`
(fixed contiguous chunks) or :func:`run_blocks` (blocks handed out one at a time): their kernels (torch's,
numpy's ufuncs, ``pread``) release the GIL, so the blocks of one tensor run on all cores.
"""

from __future__ import annotations

import itertools
import os
import threading
import collections
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from mergelab.checkpoints.write_behind import WriteBehind
from mergelab.checkpoints.writer import CheckpointWriter
from mergelab.errors import MethodError

T = TypeVar("T")

# Bytes that may wait in each pipeline queue beyond the one tensor always allowed: the inputs read ahead
# and the outputs waiting to be written. Small tensors then queue several deep, so a stall of one stage
# (a write blocked by the disk, a read by another process) does not stop the others at once.
PIPELINE_BYTES = 256 * 1024**2

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


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype`` (anything with ``itemsize``)."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def read_ahead(
    io: Executor, names: Sequence[str], read: Callable[[str], T], size: Callable[[str], int], budget: int
) -> Iterator[tuple[str, T]]:
    """Yield ``(name, read(name))`` for each name in order, reading ahead on the executor ``io`` while the
    caller works on the current one: the next name always, further ones while the reads in flight hold
    at most ``budget`` bytes (``size(name)`` each), so memory stays bounded by two items plus that and a
    stall of one stage (a read held up by the disk) does not stop the caller at once."""
    pending: collections.deque[tuple[Future[T], int]] = collections.deque()
    queued = 0
    ahead = 0  # next index to submit

    def submit() -> None:
        nonlocal queued, ahead
        nbytes_ = size(names[ahead])
        pending.append((io.submit(read, names[ahead]), nbytes_))
        queued += nbytes_
        ahead += 1

    for name in names:
        while ahead < len(names) and (not pending or queued + size(names[ahead]) <= budget):
            submit()
        future, nbytes_ = pending.popleft()
        queued -= nbytes_
        value = future.result()
        if ahead < len(names) and not pending:  # the next read starts before the caller works on this one
            submit()
        yield name, value


def stream_tensors(
    names: Sequence[str],
    compute: Callable[[str, Any], tuple[Any, int]],
    writer: CheckpointWriter,
    progress: Any,
    *,
    read: Callable[[str], T] | None = None,
    input_bytes: Callable[[str], int] | None = None,
    io: Executor | None = None,
) -> None:
    """The streaming loop of a merge, the same for every back-end: for each name in order, ``compute(name,
    inputs)`` returns the output tensor and its size in bytes, which go to a write-behind thread (at most
    ``PIPELINE_BYTES`` waiting beyond one tensor) and to the progress bar (``progress.update(size)``).
    ``inputs`` is ``read(name)``, read ahead on the executor ``io`` (:func:`read_ahead`, ``input_bytes(name)``
    each, at most ``PIPELINE_BYTES`` beyond the next tensor), or None without ``read``. Memory: about three
    tensors' worth (the current one's inputs and output, the next one's inputs) plus the two budgets."""
    if read is not None:
        if io is None or input_bytes is None:
            raise ValueError("stream_tensors: reading ahead needs an executor (io) and input_bytes")
        items: Iterator[tuple[str, Any]] = read_ahead(io, names, read, input_bytes, PIPELINE_BYTES)
    else:
        items = ((name, None) for name in names)
    with WriteBehind(writer, PIPELINE_BYTES) as writes:
        for name, inputs in items:
            try:
                out, size = compute(name, inputs)
            except MethodError as exc:
                raise MethodError(f"tensor '{name}': {exc}") from exc
            del inputs
            writes.put(name, out, size)
            progress.update(size)
            del out
