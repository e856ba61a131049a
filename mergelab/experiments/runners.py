"""Run a list of tasks on a local process pool or on Ray, recording every result in a :class:`ResultsStore`.

:func:`run_tasks` (here) is the driver; the task model is :mod:`~mergelab.experiments.task`, one task's
execution in a worker :mod:`~mergelab.experiments.worker`, the recording of outcomes
:mod:`~mergelab.experiments.recorder`, and the two pools :mod:`~mergelab.experiments.local_pool` and
:mod:`~mergelab.experiments.ray_pool`.

A :class:`Task` is ``(kind, spec, fn, study)``; its key is :func:`~mergelab.experiments.store.key_of`
``(kind, spec)``. :func:`run_tasks` skips the tasks whose rows are done, runs the others and records each
outcome from the *driver* (workers never open the database, so the database may stay on the driver's local
disk while workers run anywhere -- see the store's module docstring about network file systems)::

    from mergelab.experiments import ResultsStore, Task, run_tasks

    def train(spec):                       # module-level, so worker processes can import it
        return {"accuracy": ...}

    tasks = [Task("finetune", {"lr": lr, "task": "digits"}, train, study="noise") for lr in (0.01, 0.1)]
    summary = run_tasks(tasks, ResultsStore("results.sqlite"), workers=2)   # rerun: everything skipped

The task function
    ``fn(spec) -> dict`` of metrics, given as a module-level callable or its import path
    ``"package.module:function"``. If ``fn`` accepts an ``artifacts_dir`` argument it is passed
    ``<artifacts_dir>/<kind>-<key[:16]>`` (a :class:`~pathlib.Path`, not yet created) to write files into;
    files there are recorded as the row's artifacts. It may also return a :class:`TaskOutput` to name
    artifacts explicitly. Values are converted to JSON (numpy/torch scalars become numbers).

What is recorded per task
    ``metrics`` (what ``fn`` returned), ``timings`` (``wall_s``, ``cpu_s``, ``started``, ``finished``,
    ``host``, ``pid``), ``versions`` (:func:`mergelab.provenance.environment` in the worker, plus the task
    function's import path), ``artifacts`` (name -> path); a failure records the exception and the tail of
    its traceback as ``error``. A failing task never stops the others; with ``retries=n`` it is tried up to
    ``n + 1`` times before it is recorded as failed.

Interruption
    On ``KeyboardInterrupt`` (Ctrl-C, or raised by ``on_result``) the runner stops the workers, keeps every
    finished row done, puts rows it had marked running back to pending, and re-raises. Running the same
    tasks again resumes. Rows left running by a driver that was killed (``kill -9``, power loss) are taken
    over by the next run on the same host once that driver's process is gone -- owners are identified by PID
    and process start time, so a PID reused by an unrelated process does not keep them (:meth:`ResultsStore.
    claim`, :func:`~mergelab.experiments.store.owner_state`); :meth:`ResultsStore.reset_running` releases
    them by hand.

Backends
    ``local``: a ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start method and one torch
    thread per worker. Workers exit when the driver dies, even by ``kill -9``
    (:mod:`~mergelab.worker_lifetime`), and with them multiprocessing's resource tracker.
    ``ray``: ``ray.init(address=ray_address)`` (``None`` starts a local instance; a running session is
    reused and left running), one ``ray.remote`` task per item with ``num_cpus=1``. On a
    multi-node cluster every node must be able to import mergelab and the task function (same environment),
    and ``artifacts_dir`` must be a path that every node and the driver see (a shared file system). Ray is
    optional: ``pip install 'mergelab[ray]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mergelab.experiments.local_pool import run_local
from mergelab.experiments.ray_pool import ray_session, run_ray
from mergelab.experiments.recorder import Recorder
from mergelab.experiments.store import ResultsStore, default_db_path
from mergelab.experiments.task import RunSummary, Task

log = logging.getLogger(__name__)


def _dedupe(tasks: Iterable[Task]) -> list[Task]:
    seen: dict[str, Task] = {}
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"run_tasks expects Task objects, got {type(t).__name__}")
        if t.key in seen:
            log.warning("duplicate task %s %s ignored", t.kind, t.key[:12])
            continue
        seen[t.key] = t
    return list(seen.values())


def run_tasks(
    tasks: Iterable[Task],
    store: ResultsStore | str | os.PathLike,
    backend: str = "local",
    workers: int | None = 2,
    ray_address: str | None = None,
    artifacts_dir: str | os.PathLike | None = None,
    progress: bool = True,
    retries: int = 0,
    *,
    on_result: Callable[[Task, Any], None] | None = None,
    ray_init_kwargs: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Run the tasks that are not done yet and record their outcomes in ``store``; see the module docstring.

    Args:
        tasks: :class:`Task` objects (duplicates by key are run once).
        store: a :class:`ResultsStore` or the path of its database.
        backend: ``"local"`` (process pool) or ``"ray"``.
        workers: tasks running at once. ``None``: ``os.cpu_count()`` locally, the cluster's CPUs on Ray.
        ray_address: ``ray.init(address=...)``; ``None`` starts a local Ray instance (or reuses a running
            session), ``"auto"`` joins the cluster this machine belongs to.
        artifacts_dir: folder where each task gets ``<kind>-<key[:16]>/`` for its files (default: an
            ``artifacts`` folder beside the database). With Ray on several nodes: a shared path.
        progress: a tqdm bar over the tasks to run.
        retries: extra tries for a failing task before it is recorded as failed.
        on_result: called in the driver as ``on_result(task, row)`` after each recorded outcome (not after
            retried failures); an exception it raises stops the run like an interruption.
        ray_init_kwargs: extra keyword arguments for ``ray.init`` (e.g. ``num_cpus``, ``include_dashboard``).

    Returns:
        a :class:`RunSummary`. Raises ``KeyboardInterrupt`` (after releasing running rows) when interrupted.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not isinstance(store, ResultsStore):
        store = ResultsStore(store)
    t_start = time.perf_counter()
    tasks = _dedupe(tasks)
    summary = RunSummary()
    done = store.done_keys(t.key for t in tasks)
    todo = [t for t in tasks if t.key not in done]
    summary.skipped.extend(t.key for t in tasks if t.key in done)
    store.ensure_many((t.kind, t.spec, t.study) for t in todo)
    if summary.skipped:
        log.info("%d of %d tasks already done; skipped", len(summary.skipped), len(tasks))
    art = Path(artifacts_dir) if artifacts_dir is not None else store.path.parent / "artifacts"
    art = art.expanduser().absolute()
    if todo:
        bar = None
        if progress:
            # deferred: tqdm.auto (20 ms) stays off the 'mergelab --help' path, which imports runners
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{backend} tasks", unit="task", dynamic_ncols=True)
        rec = Recorder(store, retries, summary, bar, on_result)
        try:
            if backend == "local":
                run_local(todo, rec, workers or os.cpu_count() or 1, str(art))
            else:
                run_ray(todo, rec, workers, str(art), ray_address, dict(ray_init_kwargs or {}))
        except BaseException:
            n = rec.release()
            summary.wall_s = time.perf_counter() - t_start
            log.warning("run interrupted: %s; %d running task(s) back to pending; run again to resume",
                        summary, n)
            raise
        finally:
            if bar is not None:
                bar.close()
    summary.wall_s = time.perf_counter() - t_start
    log.info("tasks: %s", summary)
    return summary


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a study runs its tasks: the results ``store`` (a :class:`ResultsStore`, a path, or ``None`` for the
    default database), the runner (``backend``, ``workers``, ``ray_address``), the expert ``cache_dir`` every
    worker shares, a ``progress`` bar, and ``say`` for stage messages (default: the study's logger)."""

    store: Any = None
    backend: str = "local"
    workers: int | None = 2
    ray_address: str | None = None
    cache_dir: str | os.PathLike | None = None
    progress: bool = True
    say: Callable[[str], None] | None = None

    def open_store(self) -> ResultsStore:
        return self.store if isinstance(self.store, ResultsStore) else ResultsStore(self.store or default_db_path())

    def cache(self) -> str | None:
        """The cache root as an absolute path string (``None``: the default), as task specs record it."""
        return None if self.cache_dir is None else str(Path(self.cache_dir).expanduser().absolute())

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Keep one Ray session for all of a study's phases (a no-op for the local backend)."""
        return ray_session(self.ray_address) if self.backend == "ray" else contextlib.nullcontext()

    def run(self, tasks: Iterable[Task], store: ResultsStore) -> RunSummary:
        """:func:`run_tasks` with these options; duplicate tasks (same key) run once, without a warning."""
        unique = list({t.key: t for t in tasks}.values())
        return run_tasks(unique, store, backend=self.backend, workers=self.workers, ray_address=self.ray_address,
                         progress=self.progress)
