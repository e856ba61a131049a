"""The driver side of the runners, shared by every pool: claim a task's row before it runs, record each outcome
(done, failed after its retries, or back to pending when interrupted), and release what is still running
when a run stops."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from mergelab.experiments.store import ResultsStore, owner_id
from mergelab.experiments.task import RunSummary, Task

log = logging.getLogger(__name__)


class Recorder:
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


def next_claimed(queue: deque[Task], rec: Recorder) -> Task | None:
    """Pop tasks until one can be claimed (others are done meanwhile or owned by a live driver: skipped)."""
    while queue:
        task = queue.popleft()
        if rec.claim(task):
            return task
        rec.summary.skipped.append(task.key)
        if rec.bar is not None:
            rec.bar.update(1)
    return None
