"""Pool scaling (FW-Merging, Chen et al. ICCV 2025, Table 3) on the zoo: accuracy as the pool of experts grows.

Two protocols, each a series of :func:`mergelab.experiments.compare.run_comparison` calls with a growing
``pool``:

* ``irrelevant``: evaluate on a fixed group of ``tasks`` (default the comparison's 4-task group); the pool
  holds their experts plus ``n - len(tasks)`` experts of *other* tasks, for ``n`` in ``sizes`` (default 4,
  8, 12, 16, 20). Data-informed methods get data of the evaluated tasks only. Question: do irrelevant
  experts hurt? (The paper: data-free methods degrade, FW stays flat.)
* ``relevant``: the pool is the first ``n`` tasks' experts and the evaluation covers all ``n`` tasks (data
  of all of them). Question: does a method profit from more relevant experts? (The paper: FW improves.)

Order: the extra tasks (irrelevant) or all tasks (relevant) are drawn in a seeded random order
(``seed``, default 0) from the tasks that have a cached default expert; pools are nested (the pool of size n
is a prefix of the pool of size n + 4). Methods (default :data:`POOL_SCALING_METHODS`): task arithmetic,
TIES, DARE, AdaMerging, FW-soft and FW-hard with the settings of
:data:`mergelab.experiments.comparison_rows.CATALOG`, except the FW rows' objective (``fw_objective``):

* ``entropy`` (default): the FW rows minimise the prediction entropy on unlabelled test examples, the
  objective of the paper's pool-scaling experiments, where FW-Merging is compared with AdaMerging: both
  data-informed rows then use the same unlabelled data and the same objective (AdaMerging's);
* ``ce``: labelled cross-entropy on training examples (the FW methods' own default, as in ``mergelab compare``).

The choice is recorded as ``fw_objective`` in the result's ``meta`` (the run's config); ``overrides`` given
for an FW row take precedence over it.

Verdicts on the paper's claims (:func:`mergelab.report.convert.pool_scaling_verdicts`, printed by
:func:`mergelab.report.text.pool_scaling_text` and in the report) use the 95% interval of a method's change in
average accuracy between the smallest and largest pool: a paired test on the same examples (irrelevant: the
same evaluated tasks), independent samples when the evaluated tasks differ (relevant), from the tables'
per-example results.

Paper reference (:data:`mergelab.experiments.paper_results.PAPER_TABLE3`, ViT-B/32 CLIP experts, average
accuracy %): with irrelevant models joining (4 -> 20 models, 4 evaluated tasks) task arithmetic falls 70.3 -> 21.2 while FW-soft stays
74.1 -> 74.2; with relevant models joining FW-soft rises 59.2 -> 68.3. Only these endpoints are quoted here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergelab.atomic_files import write_csv_atomic, write_text_atomic
from mergelab.errors import SpecError
from mergelab.experiments.compare import run_comparison
from mergelab.experiments.comparison_rows import DEFAULT_TASKS
from mergelab.experiments.comparison_table import ComparisonTable
from mergelab.experiments.paper_results import PAPER_TABLE3

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Mode = Literal["irrelevant", "relevant"]
POOL_SCALING_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare", "adamerging", "fw_soft", "fw_hard")
#: The FW-Merging rows, whose objective the protocol sets (``fw_objective``).
FW_METHODS: tuple[str, ...] = ("fw_soft", "fw_hard")
FWObjective = Literal["entropy", "ce"]
DEFAULT_SIZES: tuple[int, ...] = (4, 8, 12, 16, 20)



@dataclass
class PoolScalingResult:
    """One comparison table per pool size; ``pools[n]`` the pool's tasks, ``eval_tasks[n]`` the evaluated ones."""

    mode: str
    arch: str
    sizes: list[int]
    methods: list[str]
    pools: dict[int, list[str]]
    eval_tasks: dict[int, list[str]]
    tables: dict[int, ComparisonTable]
    meta: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, method: str, size: int) -> float:
        """Average accuracy (over the evaluated tasks) of ``method`` with a pool of ``size`` experts."""
        return self.tables[size].row(method).average

    def normalized(self, method: str, size: int) -> float:
        return self.tables[size].row(method).normalized

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "arch": self.arch, "sizes": self.sizes, "methods": self.methods,
                "pools": {str(n): p for n, p in self.pools.items()},
                "eval_tasks": {str(n): t for n, t in self.eval_tasks.items()},
                "tables": {str(n): t.to_dict() for n, t in self.tables.items()},
                "paper": {m: {str(n): v for n, v in d.items()} for m, d in PAPER_TABLE3.get(self.mode, {}).items()},
                "meta": self.meta}

    def to_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def to_csv(self, path: PathLike) -> Path:
        """Long format: one line per (pool size, method)."""
        def cell(v: float) -> Any:
            return "" if not math.isfinite(v) else v

        header = ["mode", "pool_size", "method", "average", "normalized", "wall_s", "peak_mb", "error", "eval_tasks",
                  "pool_tasks", "per_task"]
        return write_csv_atomic(path, header, (
            [self.mode, n, r.method, cell(r.average), cell(r.normalized), cell(r.wall_s), cell(r.peak_mb),
             r.error or "", " ".join(self.eval_tasks[n]), " ".join(self.pools[n]), json.dumps(r.per_task, sort_keys=True)]
            for n in self.sizes if n in self.tables for r in self.tables[n].rows))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolScalingResult:
        return cls(data["mode"], data["arch"], list(data["sizes"]), list(data["methods"]),
                   {int(n): p for n, p in data["pools"].items()}, {int(n): t for n, t in data["eval_tasks"].items()},
                   {int(n): ComparisonTable.from_dict(t) for n, t in data["tables"].items()}, dict(data.get("meta") or {}))


def plan_pools(mode: Mode, available: Sequence[str], tasks: Sequence[str] | None, sizes: Sequence[int],
               seed: int = 0) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """``(pools, eval_tasks)`` for each size: nested pools in a seeded order (see the module docstring)."""
    if mode not in ("irrelevant", "relevant"):
        raise SpecError(f"pool scaling mode must be 'irrelevant' or 'relevant', got {mode!r}")
    sizes = sorted(set(int(n) for n in sizes))
    if not sizes or sizes[0] < 1:
        raise SpecError(f"sizes must be positive pool sizes, got {list(sizes)}")
    rng = random.Random(seed)
    if mode == "irrelevant":
        fixed = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
        missing = [t for t in fixed if t not in available]
        if missing:
            raise SpecError(f"no cached default expert for evaluated task(s) {', '.join(missing)}; build them with "
                            "`mergelab zoo`")
        others = [t for t in available if t not in fixed]
        rng.shuffle(others)
        order = fixed + others
        if sizes[0] < len(fixed):
            raise SpecError(f"irrelevant mode: the smallest pool ({sizes[0]}) must hold the {len(fixed)} evaluated tasks")
    else:
        fixed = []
        if tasks is not None:
            order = list(tasks)
            bad = [t for t in order if t not in available]
            if bad:
                raise SpecError(f"no cached default expert for task(s) {', '.join(bad)}; build them with `mergelab zoo`")
        else:
            order = list(available)
            rng.shuffle(order)
    if sizes[-1] > len(order):
        raise SpecError(f"pool size {sizes[-1]} needs {sizes[-1]} experts, the zoo has {len(order)} usable "
                        f"({', '.join(order)})")
    pools = {n: order[:n] for n in sizes}
    evals = {n: (list(fixed) if mode == "irrelevant" else order[:n]) for n in sizes}
    return pools, evals


def run_pool_scaling(
    mode: Mode,
    arch: str = "resnet_s",
    *,
    tasks: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    methods: Sequence[str] | None = None,
    samples_per_task: int = 100,
    cache_dir: PathLike | None = None,
    workdir: PathLike | None = None,
    progress: bool = True,
    quick: bool = False,
    seed: int = 0,
    isolate: bool | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    bn: str | bool | None = None,
    select: str = "validation",
    reset_bn: bool | None = None,
    on_table: Callable[[int, ComparisonTable], None] | None = None,
    fw_objective: FWObjective = "entropy",
) -> PoolScalingResult:
    """Run the pool-scaling protocol ``mode``; see the module docstring.

    ``tasks``: the evaluated group (irrelevant mode; default the comparison's 4-task group) or the task
    order (relevant mode; default a seeded shuffle of the zoo). ``on_table(n, table)`` is called after each
    pool size (e.g. to save partial results). ``fw_objective``: the FW rows' objective (``entropy``, the
    paper's, or ``ce``; an ``objective`` in ``overrides`` wins). Other arguments as for :func:`run_comparison`.
    """
    # deferred: torch (evaluation); the comparison modules import torch-free (the report path reads their types)
    from mergelab.evaluation import default_experts

    if fw_objective not in ("entropy", "ce"):
        raise SpecError(f"fw_objective must be 'entropy' or 'ce', got {fw_objective!r}")
    experts = {e.task: e for e in default_experts(arch, None, cache_dir, required=False)}
    pools, evals = plan_pools(mode, list(experts), tasks, sizes, seed)
    methods = list(methods) if methods is not None else list(POOL_SCALING_METHODS)
    overrides = {m: dict(p) for m, p in (overrides or {}).items()}
    for m in FW_METHODS:
        if m in methods:
            overrides[m] = {"objective": fw_objective, **overrides.get(m, {})}
    fw_objectives = {m: overrides[m]["objective"] for m in FW_METHODS if m in methods}
    started = time.perf_counter()
    tables: dict[int, ComparisonTable] = {}
    for n in sorted(pools):
        log.info("pool scaling (%s): %d experts, evaluating %d tasks", mode, n, len(evals[n]))
        table = run_comparison(
            arch, evals[n], methods, pool=[experts[t].path for t in pools[n]], samples_per_task=samples_per_task,
            cache_dir=cache_dir, workdir=None if workdir is None else Path(workdir) / f"{mode}_{n}",
            progress=progress, quick=quick, isolate=isolate, overrides=overrides, bn=bn if bn is not None else reset_bn,
            select=select)
        tables[n] = table
        if on_table is not None:
            on_table(n, table)
    return PoolScalingResult(mode, arch, sorted(pools), methods, pools, evals, tables,
                             {"seed": seed, "samples_per_task": samples_per_task, "quick": quick,
                              "bn": next(iter(tables.values())).meta.get("bn") if tables else None, "select": select,
                              "fw_objective": fw_objective, "fw_objectives": fw_objectives,
                              "seconds": round(time.perf_counter() - started, 1)})


__all__ = ["DEFAULT_SIZES", "FW_METHODS", "POOL_SCALING_METHODS", "PoolScalingResult", "plan_pools",
           "run_pool_scaling"]
