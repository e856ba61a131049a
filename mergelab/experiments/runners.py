"""Run a list of tasks on a local process pool or on Ray, recording every result in a :class:`ResultsStore`.

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
import datetime as _dt
import importlib
import inspect
import logging
import os
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.experiments.store import ResultsStore, key_of, owner_id, to_jsonable

log = logging.getLogger(__name__)

#: How many trailing traceback lines a failure records.
TRACEBACK_LINES = 25


# ---------------------------------------------------------------------------------------------------------
# Tasks


def fn_path(fn: Callable[..., Any] | str) -> str:
    """The import path ``"module:qualname"`` of a module-level function (or ``fn`` itself if a string).

    Raises ``ValueError`` for lambdas, nested functions and other callables worker processes cannot import.
    """
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"a task function path must look like 'package.module:function', got {fn!r}")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"task function {fn!r} cannot be sent to worker processes: use a module-level function "
            f"(not a lambda or a nested function), or its import path 'package.module:function'")
    return f"{module}:{qualname}"


def resolve_fn(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """The callable behind ``ref`` (``"module:function"`` or ``"module:Class.method"``), imported."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(spec)`` recorded under ``key_of(kind, spec)`` in ``study``.

    ``spec`` may be a mapping or a pydantic model (an :class:`~mergelab.training.ExpertSpec` is keyed by its
    canonical dict); it is stored as canonical JSON. ``fn`` is a module-level function or ``"module:func"``.
    """

    kind: str
    spec: Any
    fn: Callable[..., Any] | str
    study: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", to_jsonable(self.spec))
        fn_path(self.fn)  # fail early on a lambda or nested function
        object.__setattr__(self, "_key", key_of(self.kind, self.spec))

    @property
    def key(self) -> str:
        return self._key  # type: ignore[attr-defined]

    @property
    def fn_ref(self) -> str:
        return fn_path(self.fn)


@dataclasses.dataclass
class TaskOutput:
    """What a task function may return instead of a plain metrics dict: metrics plus named artifacts."""

    metrics: dict[str, Any]
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunSummary:
    """What :func:`run_tasks` did: keys done now, skipped (already done, or running under another live
    driver), failed (after all retries) and put back to pending by an interruption."""

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    interrupted: list[str] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "interrupted": len(self.interrupted)}

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def __str__(self) -> str:
        c = self.counts
        text = f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
        if c["interrupted"]:
            text += f", {c['interrupted']} interrupted"
        return f"{text} in {self.wall_s:.1f} s"


# ---------------------------------------------------------------------------------------------------------
# Worker side (runs in a pool process or a Ray worker; never touches the store)


def _init_worker() -> None:
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


def _init_pool_worker(driver_pid: int) -> None:
    """Process-pool initializer: :func:`_init_worker`; Ctrl-C is left to the driver (which stops the pool),
    so workers do not each print a KeyboardInterrupt traceback; and the worker exits when the driver
    ``driver_pid`` dies, however it dies (:func:`~mergelab.worker_lifetime.exit_with_parent`)."""
    import signal

    from mergelab.worker_lifetime import exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(driver_pid)
    _init_worker()


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
            from mergelab.provenance import environment

            versions = dict(environment())
        else:
            import platform
            from importlib.metadata import PackageNotFoundError, version

            from mergelab import __version__

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
        _init_worker()
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


# ---------------------------------------------------------------------------------------------------------
# Driver side


class _Recorder:
    """Driver-side bookkeeping: claims rows, records outcomes, requeues retries, tracks what is running."""

    def __init__(self, store: ResultsStore, retries: int, summary: RunSummary, bar: Any,
                 on_result: Callable[[Task, Any], None] | None):
        self.store, self.retries, self.summary, self.bar = store, retries, summary, bar
        self.on_result = on_result
        self.owner = owner_id()
        self.running: set[str] = set()
        self.tries: dict[str, int] = {}

    def claim(self, task: Task) -> bool:
        if not self.store.claim(task.key, owner=self.owner):
            return False
        self.running.add(task.key)
        self.tries[task.key] = self.tries.get(task.key, 0) + 1
        return True

    def record(self, task: Task, outcome: Mapping[str, Any]) -> bool:
        """Store ``outcome``; returns True when the task should be tried again."""
        key = task.key
        self.running.discard(key)
        if outcome.get("interrupted"):
            self.store.mark_pending([key])
            self.summary.interrupted.append(key)
            log.warning("task %s %s was interrupted in its worker; left pending", task.kind, key[:12])
        elif outcome.get("ok"):
            self.store.mark_done(key, metrics=outcome.get("metrics"), timings=outcome.get("timings"),
                                 versions=outcome.get("versions"), artifacts=outcome.get("artifacts") or None)
            self.summary.done.append(key)
        else:
            error = str(outcome.get("error") or "unknown error")
            if self.tries.get(key, 0) <= self.retries:
                log.warning("task %s %s failed (try %d of %d), retrying: %s", task.kind, key[:12],
                            self.tries[key], self.retries + 1, error.splitlines()[0])
                self.store.mark_pending([key])
                return True
            self.store.mark_failed(key, error, timings=outcome.get("timings"), versions=outcome.get("versions"))
            self.summary.failed.append(key)
            log.warning("task %s %s failed: %s", task.kind, key[:12], error.splitlines()[0])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(done=len(self.summary.done), failed=len(self.summary.failed), refresh=False)
        if self.on_result is not None:
            self.on_result(task, self.store.get(key))
        return False

    def release(self) -> int:
        """Put every row this run still has running back to pending."""
        keys = list(self.running)
        self.running.clear()
        self.summary.interrupted.extend(keys)
        return self.store.mark_pending(keys)


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
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{backend} tasks", unit="task", dynamic_ncols=True)
        rec = _Recorder(store, retries, summary, bar, on_result)
        try:
            if backend == "local":
                _run_local(todo, rec, workers or os.cpu_count() or 1, str(art))
            else:
                _run_ray(todo, rec, workers, str(art), ray_address, dict(ray_init_kwargs or {}))
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


def _next_claimed(queue: deque[Task], rec: _Recorder) -> Task | None:
    """Pop tasks until one can be claimed (others are done meanwhile or owned by a live driver: skipped)."""
    while queue:
        task = queue.popleft()
        if rec.claim(task):
            return task
        rec.summary.skipped.append(task.key)
        if rec.bar is not None:
            rec.bar.update(1)
    return None


def _run_local(todo: Sequence[Task], rec: _Recorder, workers: int, art: str) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue: deque[Task] = deque(todo)
    workers = max(1, min(workers, len(todo)))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited OpenMP pools or locks

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(os.getpid(),))

    pool = new_pool()
    in_flight: dict[Any, Task] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < workers:  # at most `workers` submitted: submitted == running
                task = _next_claimed(queue, rec)
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
        _kill_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)


def _kill_pool(pool: Any) -> None:
    """Stop a process pool now: cancel queued work and terminate the worker processes (their running tasks
    are lost; the driver puts them back to pending)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)


@contextlib.contextmanager
def ray_session(address: str | None = None, init_kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ray initialised for the block: a running session is reused and left running; one started here (local,
    or joining ``address``) is shut down at the end."""
    try:
        import ray
    except ImportError as exc:
        from mergelab.errors import MergeLabError

        raise MergeLabError("backend 'ray' needs Ray: pip install 'mergelab[ray]' (or pip install ray)") from exc
    if ray.is_initialized():
        yield
        return
    kwargs = {"include_dashboard": False, "log_to_driver": True, **dict(init_kwargs or {})}
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _run_ray(todo: Sequence[Task], rec: _Recorder, workers: int | None, art: str,
             address: str | None, init_kwargs: dict[str, Any]) -> None:
    with ray_session(address, init_kwargs):
        import ray

        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(execute)
        queue: deque[Task] = deque(todo)
        in_flight: dict[Any, Task] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    task = _next_claimed(queue, rec)
                    if task is None:
                        break
                    ref = remote.remote(task.key, task.kind, task.spec, task.fn_ref, art, True)
                    in_flight[ref] = task
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    task = in_flight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # a worker died, or the task could not be deserialised
                        outcome = {"ok": False, "error": f"Ray task failed: {type(exc).__name__}: {exc}"[-4000:]}
                    if rec.record(task, outcome):
                        queue.append(task)
        except BaseException:
            for ref in in_flight:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # pragma: no cover - best effort
                    pass
            raise


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
        from mergelab.experiments.store import default_db_path

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

