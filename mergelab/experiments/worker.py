"""The worker side of the runners: :func:`execute` runs one task in a pool process or a Ray worker and returns
its outcome as a plain dict (metrics or the error, timings, versions, artifacts). Workers never open the
results store; the driver records outcomes (:mod:`mergelab.experiments.recorder`)."""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import platform
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mergelab import __version__
from mergelab.experiments.store import to_jsonable
from mergelab.experiments.task import TaskOutput, resolve_fn

#: How many trailing traceback lines a failure records.
TRACEBACK_LINES = 25


def init_worker() -> None:
    """Worker initializer: one torch thread per worker (workers x threads must not oversubscribe the cores).

    Sets ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, which torch reads when a task first imports it (so
    ``torch.get_num_threads() == 1`` there), and calls ``torch.set_num_threads(1)`` if torch is loaded
    already. Torch is not imported here: that costs about 2 s of CPU per worker, which tasks that never use
    torch (and short test runs) should not pay; :func:`execute` repeats the call once the task's module is
    imported.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    _one_torch_thread()


def init_pool_worker(driver_pid: int) -> None:
    """Process-pool initializer: :func:`init_worker`; Ctrl-C is left to the driver (which stops the pool),
    so workers do not each print a KeyboardInterrupt traceback; and the worker exits when the driver
    ``driver_pid`` dies, however it dies (:func:`~mergelab.worker_lifetime.exit_with_parent`)."""
    # deferred: ctypes/prctl only in pool workers, off the 'mergelab --help' path, which imports worker
    from mergelab.worker_lifetime import exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(driver_pid)
    init_worker()


def _one_torch_thread() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _accepts_artifacts_dir(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "artifacts_dir" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _versions(fn_ref: str) -> dict[str, Any]:
    """:func:`mergelab.provenance.environment` of this worker plus the task function's path. When the task
    did not load torch, its version is read from the package metadata instead of importing it (seconds)."""
    try:
        if "torch" in sys.modules:
            # deferred: provenance (20 ms) only when the task loaded torch, whose version environment() reads
            from mergelab.provenance import environment

            versions = dict(environment())
        else:
            try:
                torch_version = version("torch")
            except PackageNotFoundError:  # pragma: no cover
                torch_version = None
            versions = {"mergelab": __version__, "torch": torch_version, "python": platform.python_version()}
    except Exception as exc:  # pragma: no cover - provenance must never fail a task
        versions = {"error": repr(exc)}
    versions["fn"] = fn_ref
    return versions


def _list_artifacts(folder: Path | None) -> dict[str, str]:
    if folder is None or not folder.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(folder.iterdir())}


def execute(key: str, kind: str, spec: Any, fn_ref: str, artifacts_dir: str | None,
            init_threads: bool = False) -> dict[str, Any]:
    """Run one task and return its outcome as a plain dict (``ok``, ``metrics`` or ``error``, ``timings``,
    ``versions``, ``artifacts``). Catches every exception, so a failing task never breaks a pool."""
    if init_threads:
        init_worker()
    t0_wall, t0 = time.time(), time.perf_counter()
    c0 = time.process_time()
    folder = Path(artifacts_dir) / f"{kind}-{key[:16]}" if artifacts_dir else None
    outcome: dict[str, Any] = {"key": key}
    try:
        fn = resolve_fn(fn_ref)
        _one_torch_thread()  # the task's module may have imported torch
        kwargs = {"artifacts_dir": folder} if folder is not None and _accepts_artifacts_dir(fn) else {}
        result = fn(spec, **kwargs)
        artifacts = _list_artifacts(folder)
        if isinstance(result, TaskOutput):
            artifacts.update({k: str(v) for k, v in result.artifacts.items()})
            result = result.metrics
        if result is None:
            result = {}
        if not isinstance(result, Mapping):
            raise TypeError(f"task function {fn_ref} returned {type(result).__name__}; expected a dict of metrics")
        outcome.update(ok=True, metrics=to_jsonable(result), artifacts=artifacts)
    except KeyboardInterrupt:
        outcome.update(ok=False, interrupted=True, error="KeyboardInterrupt")
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a task is a failure too
        tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
        lines = "".join(tail).rstrip().splitlines()
        text = "\n".join(lines[-TRACEBACK_LINES:])
        outcome.update(ok=False, error=f"{type(exc).__name__}: {exc}\n{text}")
    t1 = time.perf_counter()
    outcome["timings"] = {
        "wall_s": round(t1 - t0, 6),
        "cpu_s": round(time.process_time() - c0, 6),
        "started": _iso(t0_wall),
        "finished": _iso(time.time()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    outcome["versions"] = _versions(fn_ref)
    return outcome
