"""A comparison's merge (or multi-task training) as a measured job: in a fresh spawned process, or in this one.

**Wall time and peak memory.** With ``isolate=True`` the job runs in a fresh process started with
``multiprocessing``'s *spawn* method; the child times the job (:func:`time.perf_counter` around
:func:`~mergelab.merging.merge`, reading inputs and writing the output included, evaluation excluded) and
reads its resident-set high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` right after it:
``peak_mb`` is that mark (Python, torch and mergelab loaded included), ``base_mb`` the child's resident set
just before the job, after loading the merge modules and one warm-up forward pass of the architecture (so
torch's CPU kernels are resident), so ``peak_mb - base_mb`` is roughly what the job itself added (task data
of data-informed methods included). (``tracemalloc`` sees Python allocations only, not torch's tensors, and a
long-lived process's high-water mark is set by whatever ran before; psutil is not a dependency.) With
``isolate=False`` the job runs in this process and peak memory is this process's high-water mark after
resetting it through ``/proc/self/clear_refs`` (Linux), i.e. it includes whatever the process already held;
NaN where that is unavailable.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mergelab.merging import merge
from mergelab.worker_lifetime import exit_with_parent

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; NaN where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def _reset_hwm() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------------------------- jobs


def _job_merge(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    result = merge(spec, out_dir, overwrite=True, progress=False, hash_inputs=False)
    return {"seconds": result.seconds, "out_dir": str(result.out_dir)}


def _job_multitask(spec: dict[str, Any], cache_dir: str | None, experts: list[str]) -> dict[str, Any]:
    # deferred: torch (training); the comparison modules import torch-free (the report path reads their types)
    from mergelab.training.multitask import train_multitask

    r = train_multitask(spec, cache_dir, experts=experts)
    return {"path": r.path, "cached": r.cached, "wall_time_s": r.wall_time_s, "peak_rss_mb": r.peak_rss_mb}


_JOBS: dict[str, Callable[..., dict[str, Any]]] = {"merge": _job_merge, "multitask": _job_multitask}


def _warm_up(arch: str | None) -> None:
    """Load what every merge loads anyway (modules, torch's CPU kernels) before the baseline is taken."""
    # deferred: loading these modules in the child is the warm-up itself (the parent never needs them)
    import torch

    import mergelab.checkpoints  # noqa: F401
    import mergelab.evaluation.task_suite  # noqa: F401
    import mergelab.merging.torch_backend  # noqa: F401
    from mergelab.methods.data_informed import registry
    from mergelab.models import build_backbone

    registry()
    if arch:
        try:
            with torch.no_grad():
                build_backbone(arch).eval()(torch.zeros(2, 1, 28, 28))  # the task suite's image shape
        except Exception:  # noqa: BLE001 - a warm-up only
            log.debug("warm-up forward pass failed", exc_info=True)


def _child(job: str, kwargs: dict[str, Any], threads: int, log_level: int, arch: str | None) -> dict[str, Any]:
    """Entry point of a spawned child: run ``job``, measure wall time and the RSS high-water mark."""
    # deferred: torch, only in the child (see _job_multitask)
    import torch

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _warm_up(arch)
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    out = _JOBS[job](**kwargs)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = _maxrss_mb()
    out["base_mb"] = base
    return out


def run_job(job: str, kwargs: dict[str, Any], isolate: bool, arch: str | None = None) -> dict[str, Any]:
    """Run ``job`` (``merge``: ``spec``, ``out_dir``; ``multitask``: ``spec``, ``cache_dir``, ``experts``) and
    return its result with ``wall_s``, ``peak_mb`` and ``base_mb`` (see the module docstring); ``arch``: the
    architecture whose forward pass warms an isolated child up."""
    if isolate:
        # deferred: torch (see _job_multitask); only its thread count is read here, for the child
        import torch

        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        # the child exits if this process is killed (it would otherwise finish the job and wait forever)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            return pool.submit(_child, job, kwargs, torch.get_num_threads(), level, arch).result()
    base = _status_mb("VmRSS")
    measured = _reset_hwm()
    t0 = time.perf_counter()
    out = _JOBS[job](**kwargs)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = _status_mb("VmHWM") if measured else math.nan
    out["base_mb"] = base if measured else math.nan
    return out


__all__ = ["run_job"]
