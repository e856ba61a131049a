"""Running tasks on Ray: one ``ray.remote`` task per item with ``num_cpus=1``, at most ``workers`` in flight
(default: the cluster's CPUs), cancelled on an interruption. Ray is optional (``pip install 'mergelab[ray]'``)
and imported only here, when a run asks for it."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mergelab.errors import MergeLabError
from mergelab.experiments.recorder import Recorder, next_claimed
from mergelab.experiments.task import Task
from mergelab.experiments.worker import execute


@contextlib.contextmanager
def ray_session(address: str | None = None, init_kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ray initialised for the block: a running session is reused and left running; one started here (local,
    or joining ``address``) is shut down at the end."""
    try:
        # deferred: ray is optional (pip install 'mergelab[ray]')
        import ray
    except ImportError as exc:
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


def run_ray(todo: Sequence[Task], rec: Recorder, workers: int | None, art: str,
             address: str | None, init_kwargs: dict[str, Any]) -> None:
    with ray_session(address, init_kwargs):
        # deferred: ray is optional (pip install 'mergelab[ray]')
        import ray

        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(execute)
        queue: deque[Task] = deque(todo)
        in_flight: dict[Any, Task] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    task = next_claimed(queue, rec)
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
