"""Process-wide runtime settings for CPU-heavy commands.

:func:`reuse_freed_memory` tunes glibc's allocator for the merge engines, :func:`freeze_imported_objects`
keeps the garbage collector off the imported modules' objects (see their docstrings).

:func:`prefer_passive_omp` lets idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``)
unless the user chose a policy. On a 2-core machine that other processes also use, torch's spinning intra-op
threads are descheduled mid-region and every parallel region waits for them: a resnet_s training step
measured 1.0-1.9 s with 2 threads under the default policy against 0.07-0.16 s with 2 passive threads, on the
same loaded machine. OpenMP reads the variable once, when torch loads it, so this must run before torch is
imported; the training and evaluation commands call it first thing (the merge engine sets its own threads).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys


def prefer_passive_omp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if it is unset and torch is not imported yet; return whether it took."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def freeze_imported_objects() -> None:
    """Move every object alive now (the imported modules' functions, classes and constants: about 180k once
    torch is imported) to the garbage collector's permanent generation (``gc.freeze``, after one
    ``gc.collect`` so no cyclic garbage is frozen with them), so that the collections a merge triggers by
    allocating do not traverse them again: they took 3-4% of an Arcee Fusion merge's CPU time on the
    benchmark model (``perf``: ``gc_collect_main``), 1.7% after. Objects created later are collected as
    usual. Process-wide; applied once, by an engine, after its imports."""
    if getattr(freeze_imported_objects, "_done", False):
        return
    freeze_imported_objects._done = True  # type: ignore[attr-defined]
    gc.collect()
    gc.freeze()


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    Merging allocates and frees tensors of tens of MB per tensor; by default each such allocation is a
    fresh ``mmap`` whose pages fault in on first touch, which made element-wise work 3-4x slower than the
    arithmetic itself (measured in ``bench/merge_throughput.py``). Setting ``M_MMAP_MAX = 0`` and a large
    ``M_TRIM_THRESHOLD`` makes freed blocks reusable; peak RSS is unchanged (it is the peak either way).
    ``M_ARENA_MAX = 1`` makes the engine's reader thread allocate from that same (main) arena: in a
    per-thread arena, whose heaps are capped at 64 MiB, a tensor buffer could not be reused and faulted in
    afresh (reading the benchmark's inputs on a thread: 205k page faults and 1.5 s of system time, against
    none and 1.0 s). A no-op where glibc's ``mallopt`` is unavailable. Process-wide, so it is applied once,
    by an engine, before it starts its threads.
    """
    if getattr(reuse_freed_memory, "_done", False):
        return
    reuse_freed_memory._done = True  # type: ignore[attr-defined]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass



#: Intra-op threads every training run uses unless its spec or config says otherwise (pretraining, fine-tuning,
#: branches, multi-task; see :mod:`mergelab.training.threads`): a fixed count makes the weights bit-identical for
#: one spec and seed on any machine of the same kind, whatever its core count or load.
TRAINING_THREADS = 1
