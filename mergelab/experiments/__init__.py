"""Experiment infrastructure: a results database and task runners (local process pool or Ray).

Public API::

    ResultsStore, Row, key_of, to_csv, default_db_path, StoreError   the SQLite results store (store.py)
    Task, TaskOutput, RunSummary                                      the task model             (task.py)
    run_tasks                                                         the runners                (runners.py: the
                                                                      driver; worker.py, recorder.py, local_pool.py,
                                                                      ray_pool.py)

Every fine-tune, merge or evaluation of a study is a row keyed by ``sha256`` of its canonical ``(kind,
spec)``; :func:`run_tasks` skips finished rows, so a rerun costs nothing and an interrupted study resumes.
"""

from __future__ import annotations

from mergelab.experiments.runners import run_tasks
from mergelab.experiments.store import (
    SCHEMA_VERSION,
    STATUSES,
    ResultsStore,
    Row,
    StoreError,
    canonical_json,
    default_db_path,
    key_of,
    to_csv,
)
from mergelab.experiments.task import RunSummary, Task, TaskOutput

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "ResultsStore",
    "Row",
    "RunSummary",
    "StoreError",
    "Task",
    "TaskOutput",
    "canonical_json",
    "default_db_path",
    "key_of",
    "run_tasks",
    "to_csv",
]
