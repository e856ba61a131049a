"""What a comparison merges and evaluates: the pool of experts, one head per task and the pretrained base,
resolved from the zoo (its default experts for the tasks) or an explicit pool of expert folders, and checked
(known tasks, one architecture, every task with an expert, every expert fine-tuned from the cache's base)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import MergeLabError, SpecError
from mergelab.experiments.comparison_rows import DEFAULT_TASKS

PathLike = str | os.PathLike[str]


@dataclass
class ComparisonSetup:
    """The experts of one comparison: ``pool`` in merge order, ``heads`` one per task of ``tasks`` (its head and
    reference accuracy; :class:`~mergelab.training.result.ExpertResult`), ``base`` the pretrained backbone."""

    arch: str
    tasks: list[str]
    pool: list[Any]
    heads: list[Any]
    base: Path


def resolve_setup(arch: str, tasks: Sequence[str] | None, pool: Sequence[PathLike] | None,
                  cache_dir: PathLike | None) -> ComparisonSetup:
    """The experts for ``tasks`` (default :data:`~mergelab.experiments.comparison_rows.DEFAULT_TASKS`, or the
    pool's tasks) from ``pool`` or the zoo in ``cache_dir``; a :class:`SpecError` says what is missing or
    inconsistent."""
    # deferred: torch (evaluation, models, tasks, training); the comparison modules import torch-free
    from mergelab.evaluation import default_experts
    from mergelab.models.pretraining import read_pretrained
    from mergelab.tasks import task_spec
    from mergelab.training.result import load_expert

    if tasks is not None:
        tasks = list(tasks)
        if not tasks:
            raise SpecError("tasks: empty list of tasks")
        for t in tasks:
            task_spec(t)  # unknown names: a clear error listing the valid ones
        if len(set(tasks)) != len(tasks):
            raise SpecError(f"tasks: a task is listed twice: {tasks}")
    if pool is None:
        tasks = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
        experts = default_experts(arch, tasks, cache_dir)
    else:
        if len(pool) == 0:
            raise SpecError("pool: empty list of experts")
        experts = []
        for p in pool:
            try:
                experts.append(load_expert(p))
            except MergeLabError as exc:
                raise SpecError(f"pool: {exc}") from None
        archs = {e.arch for e in experts}
        if archs != {arch}:
            raise SpecError(f"pool: the experts are {', '.join(sorted(archs))}, the comparison is for {arch}")
        own = list(dict.fromkeys(e.task for e in experts))
        tasks = list(tasks) if tasks is not None else own
        missing = [t for t in tasks if t not in own]
        if missing:
            raise SpecError(f"tasks: no expert in the pool for {', '.join(missing)} (its head is needed); "
                            f"the pool's tasks are: {', '.join(own)}")
    heads = [next(e for e in experts if e.task == t) for t in tasks]
    pre = read_pretrained(arch, cache_dir)
    if pre is None:
        raise SpecError(f"no pretrained {arch} backbone in the cache; build the zoo with `mergelab zoo --arch {arch}`")
    stale = [e.path for e in experts if e.pretrained_id != pre.pretrained_id]
    if stale:
        raise SpecError(f"expert(s) {', '.join(map(str, stale))} were fine-tuned from another pretrained {arch} "
                        f"backbone than the cache's ({pre.pretrained_id}); rebuild them with `mergelab zoo --arch {arch}`")
    return ComparisonSetup(arch, tasks, experts, heads, Path(pre.path))


__all__ = ["ComparisonSetup", "resolve_setup"]
