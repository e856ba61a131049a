"""Look up, build and cache tasks by name.

``get_task(name)`` returns the cached :class:`~mergelab.tasks.base.TaskData` if a file of the current
version exists, and otherwise builds the task (deterministically), caches it and returns it.
"""

from __future__ import annotations

import difflib
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from mergelab.errors import SpecError
from mergelab.tasks import cache
from mergelab.tasks.base import TaskData, TaskSpec, finalize
from mergelab.tasks.pool import POOL_NAME, POOL_VERSION, build_pool
from mergelab.tasks.suite import EXPERT_TASKS

log = logging.getLogger(__name__)

_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in EXPERT_TASKS}
if len(_SPECS) != len(EXPERT_TASKS):  # pragma: no cover - guards against editing mistakes
    raise RuntimeError("duplicate expert task names")


def list_tasks() -> list[str]:
    """Names of the expert tasks, in their fixed registry order."""
    return [spec.name for spec in EXPERT_TASKS]


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` (classes, description, family, version) of a task, without building it.

    Raises :class:`~mergelab.errors.SpecError` for an unknown name.
    """
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise SpecError(_unknown_message(name)) from None


def _unknown_message(name: object) -> str:
    valid = list_tasks()
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.5)
    ordered = close + [v for v in valid if v not in close]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown task {name!r}.{hint} Valid tasks ({len(valid)}): {', '.join(ordered)}"
            f" (the pretraining pool is pretraining_pool(), not a task name)")


def build_task(name: str) -> TaskData:
    """Build a task from its sources without touching the cache."""
    spec = task_spec(name)
    start = time.perf_counter()
    data = finalize(spec.name, spec.num_classes, spec.description, spec.builder(), spec.class_names)
    log.info("built task %s in %.2fs", name, time.perf_counter() - start)
    return data


def get_task(name: str, cache_dir: str | Path | None = None) -> TaskData:
    """Load task ``name`` from the cache, building and caching it first if needed.

    ``cache_dir`` overrides the cache location (see :mod:`mergelab.tasks.cache`). Unknown names raise
    :class:`~mergelab.errors.SpecError` listing the valid names, closest matches first.
    """
    spec = task_spec(name)
    return _cached(name, spec.version, lambda: build_task(name), cache_dir)


def pretraining_pool(cache_dir: str | Path | None = None) -> TaskData:
    """The pretraining pool (see :mod:`mergelab.tasks.pool`) as one labelled dataset, cached like a task."""
    return _cached(POOL_NAME, POOL_VERSION, build_pool, cache_dir)


def _cached(name: str, version: str, build, cache_dir: str | Path | None) -> TaskData:
    directory = cache.resolve_cache_dir(cache_dir)
    path = cache.cache_path(directory, name, version)
    key = cache.cache_key(version)
    data = cache.load_task(path, name, key)
    if data is None:
        data = build()
        try:
            cache.save_task(data, path, key)
        except OSError as exc:  # a read-only or full disk should not stop an experiment
            log.warning("could not write task cache %s: %s", path, exc)
    return data


def build_all(cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, TaskData]:
    """Build (or load) and cache every expert task and the pretraining pool.

    Returns the expert tasks only, ``{name: TaskData}`` in :func:`list_tasks` order; the pool is cached as
    a side effect (fetch it with :func:`pretraining_pool`). ``progress`` shows a tqdm bar.
    """
    out: dict[str, TaskData] = {}
    names = list_tasks()
    with tqdm(total=len(names) + 1, desc="tasks", disable=not progress, unit="task") as bar:
        for name in names:
            bar.set_postfix_str(name)
            out[name] = get_task(name, cache_dir)
            bar.update()
        bar.set_postfix_str(POOL_NAME)
        pretraining_pool(cache_dir)
        bar.update()
    return out
