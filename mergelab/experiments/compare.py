"""Method comparison on a task group: every merging method against the usual reference points, one table.

``run_comparison(arch, tasks, methods)`` takes the zoo's experts for ``tasks`` (or an explicit ``pool`` of
expert folders, which may hold more experts than tasks), and produces one :class:`MethodRow` per method:
per-task test accuracy and loss, their average, normalized accuracy (mean over tasks of
``acc_t / acc(expert_t on t)``, THEORY.md section 2), wall time and peak memory.

Rows (``methods``; default :data:`DEFAULT_METHODS`, settings in :data:`CATALOG`):

* ``pretrained``: the pretrained backbone theta_0 read through each task's expert head (the floor).
* ``individual``: each task's own expert on its own task (the ceiling; normalized accuracy 1 by definition).
  Its wall time is the summed fine-tuning time of the experts (from their sidecars).
* ``multitask``: traditional multi-task learning, one backbone fine-tuned jointly on all the tasks' training
  data from theta_0, each task through its own (jointly trained) head (:mod:`mergelab.training.multitask`,
  cached by spec hash like an expert). Its wall time is its training time.
* merges, each written to disk by :func:`mergelab.merging.merge` and evaluated with
  :func:`mergelab.evaluation.evaluate` through the experts' heads under **one declared protocol**
  (:mod:`mergelab.evaluation.protocol`): ``bn`` says how BatchNorm statistics are obtained for the
  pretrained row and every merge alike (default ``joint``: re-estimated on the group's unlabelled training
  images; ``merged``: kept as merged; ``per_task``), recorded in every row and in ``meta``. BN running
  statistics are never trimmed, dropped or scaled by lambda: data-free merges take the experts' weighted mean
  for them (per-tensor overrides, :func:`~mergelab.evaluation.protocol.statistics_overrides`). A merge whose
  logits are non-finite, or whose ``running_var`` has negative entries under ``bn: merged``, is **invalid**
  (``MethodRow.invalid`` says why): no accuracy is reported for it and no verdict counts it.

  **Scales chosen on validation data** (``select="validation"``, default): a row with a ``grid`` (task
  arithmetic, TIES, DARE: lambda) is merged at every grid value, each merge is scored on the validation split
  of the training data (:func:`mergelab.tasks.validation_split`, under the same BN protocol; never the test
  split) and the best mean validation accuracy is kept, as Ilharco et al. 2023 (lambda in 0.05..1 on held-out
  validation data) and Yadav et al. 2023 (lambda on validation, app. C) do. The row records the grid, the
  validation accuracies and the chosen value. ``select="fixed"`` uses the no-validation defaults below.

  ==================  ========================================================================================
  weight_average      plain average of the experts (Wortsman et al. 2022, model soups)
  task_arithmetic     lambda from the grid 0.05 .. 1.0 on validation; fixed: 0.3, the common default for many
                      tasks when no validation set is used (Ilharco et al. 2023 pick lambda on validation data,
                      0.3-0.4 for 8 ViT tasks; AdaMerging (Yang et al. 2024), TIES and FusionBench's 8-task
                      baselines report task arithmetic at 0.3)
  ties                density 0.2 (top 20 %), mass sign election, disjoint mean; lambda from the grid 0.05 .. 1.3
                      (task arithmetic's plus 1.3) and the trim scope (whole model, the paper's, or per tensor,
                      mergekit's) on validation (Yadav et al. 2023 search lambda on validation); fixed: lambda 1,
                      whole-model trim, the TIES paper's recommended setting without a validation set (sec. 7.4 /
                      app. C: k = 20 %, lambda 1)
  dare                DARE + task arithmetic: drop with density 0.5 and rescale by 1/0.5 (Yu et al. 2024; 0.5
                      is a neutral middle for a small model), then task arithmetic with lambda chosen as for
                      task arithmetic (fixed: 0.3)
  tsv_merge           TSV-Merge (Gargiulo et al. 2025): per layer, each task's top r/T singular components,
                      decorrelated (orthogonalised U and V), summed; iso_c / iso_cts (Marczak et al. 2025): the
                      TA sum's singular vectors (plus task-specific ones, 80 % common) with a flat spectrum.
                      lambda from the grid 0.1 .. 3 on validation (the authors search 0.1 .. 3.0); fixed: 1
                      (FusionBench). Convolutions are merged as (out, in*kh*kw) matrices (``conv_as_matrix``):
                      the papers average non-2-D tensors, which on resnet_s (no 2-D weight) would make all three
                      task arithmetic at lambda / T. Other tensors: the task vectors' mean times lambda
  fisher              Fisher merging, exact diagonal Fisher (Matena & Raffel 2022)
  regmean             RegMean, alpha 0.9, Linear and Conv2d layers (Jin et al. 2023)
  adamerging          layer-wise AdaMerging, 500 Adam steps, init 0.3 (Yang et al. 2024); with a BatchNorm
                      protocol other than ``merged`` it optimises with batch statistics (``bn: batch``)
  adamerging_surgery  representation surgery (rank 16, 1,000 steps per task; Yang et al. 2024b) on the
                      AdaMerging model; wall time and peak memory include AdaMerging's
  fw_hard / fw_soft   FW-Merging (Chen et al. 2025): hard, 3 iterations from task arithmetic (0.3) with line
                      search; soft, 15 iterations from theta_0, k = number of tasks
  ==================  ========================================================================================

  Data-informed methods use ``samples_per_task`` examples of each evaluated task (default 100, the
  FW-Merging paper's budget; also given to Fisher and RegMean, whose own defaults are 256) from the split each
  method defaults to (labelled train for FW/Fisher/RegMean, unlabelled test for AdaMerging and surgery, as
  their papers do). Any other registered method name (``breadcrumbs``, ``model_stock`` ...) runs with its
  defaults.

**Wall time and peak memory.** Each merge (and the multi-task training) runs in a fresh process started with
``multiprocessing``'s *spawn* method; the child times the merge (:func:`time.perf_counter` around
:func:`~mergelab.merging.merge`, reading inputs and writing the output included, evaluation excluded) and
reads its resident-set high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` right after it:
``peak_mb`` is that mark (Python, torch and mergelab loaded included), ``base_mb`` the child's resident set
just before the merge, after loading the merge modules and one warm-up forward pass of the architecture (so
torch's CPU kernels are resident), so ``peak_mb - base_mb`` is roughly what the merge itself added (task data
of data-informed methods included). (``tracemalloc`` sees
Python allocations only, not torch's tensors, and a long-lived process's high-water mark is set by whatever
ran before; psutil is not a dependency.) With ``isolate=False`` methods run in this process and peak memory
is this process's high-water mark after resetting it through ``/proc/self/clear_refs`` (Linux), i.e. it
includes whatever the process already held; NaN where that is unavailable. ``quick=True`` runs in-process.

**Paired tests between rows** (:meth:`ComparisonTable.paired_comparisons`). Every row is scored on the same
test examples and keeps its per-example correctness (``MethodRow.per_task_correct``, bit-packed), so every
merge is compared with each row of :data:`PAIRED_REFERENCES` (the pretrained floor and task arithmetic, the
data-free baseline the papers' claims are stated against; fixed in advance, not the best row of this table,
which would be chosen on the very examples it is tested on) by
:func:`mergelab.analysis.statistics.paired_accuracy_test`: the difference of task-averaged accuracy, its 95%
interval (stratified by task) and McNemar's exact p-value. The p-values are Holm-adjusted over all the table's
comparisons (one family per table, also used by the report's paper claims), so the chance that a table with no
real difference shows *any* significant one is at most 5%; an adjusted p >= 0.05 is *undecided*. Tables written
before per-example results were kept load and print without the paired block.

``quick=True``: few samples and steps everywhere (tests, CI, smoke runs); the numbers mean little.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mergelab.errors import MergeLabError, SpecError
from mergelab.methods import catalog
from mergelab.output_paths import refuse_overlap

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: The default 4-task group of ``mergelab compare`` (tasks with different inputs and label spaces).
DEFAULT_TASKS: tuple[str, ...] = ("mnist", "mnist_rot90", "digits", "shapes")
REFERENCE_ROWS = ("pretrained", "individual", "multitask")
#: The rows every merge is tested against on the same examples (:meth:`ComparisonTable.paired_comparisons`).
PAIRED_REFERENCES: tuple[str, ...] = ("pretrained", "task_arithmetic")


@dataclass(frozen=True)
class MethodConfig:
    """One row of the comparison: the mergelab method it runs and with which parameters (and why)."""

    name: str
    method: str | None  # None for the reference rows
    params: Mapping[str, Any] = field(default_factory=dict)
    quick_params: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    #: {parameter: candidate values} searched on validation data when ``select="validation"``.
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def parameters(self, quick: bool) -> dict[str, Any]:
        return {**self.params, **(self.quick_params if quick else {})}


_TA_LAMBDA = 0.3
#: TSV-Merge / Iso-C / Iso-CTS rows: lambda 1 without validation (FusionBench's default), and convolutions merged as
#: (out, in x kh x kw) matrices. The authors' code and FusionBench average every tensor that is not 2-D; resnet_s's
#: backbone has no 2-D weight (convolutions and BatchNorm only), so there all three would be the experts' average
#: scaled by lambda, i.e. task arithmetic at lambda / T, a row already. On vit_s only the patch embedding is 4-D.
_SPECTRAL: dict[str, Any] = {"lambda": 1.0, "conv_as_matrix": True}
#: lambda grids searched on validation data (``select="validation"``): the catalog's (``Method.validation_grid``).
TA_LAMBDA_GRID, TIES_LAMBDA_GRID, TIES_SCOPE_GRID = catalog.TA_LAMBDA_GRID, catalog.TIES_LAMBDA_GRID, catalog.TIES_SCOPE_GRID


def _grid(method: str) -> dict[str, tuple[Any, ...]]:
    """The hyperparameters a data-free ``method``'s paper chooses on validation data (the catalog's
    ``validation_grid``; none for a data-informed method)."""
    m = catalog.METHODS.get(method)
    return dict(m.validation_grid) if m is not None else {}


CATALOG: dict[str, MethodConfig] = {c.name: c for c in (
    MethodConfig("pretrained", None, source="theta_0 with the experts' heads"),
    MethodConfig("individual", None, source="each expert on its own task"),
    MethodConfig("multitask", None, {"steps": 200, "batch_size": 32}, {"steps": 4, "batch_size": 8},
                 "joint fine-tuning on all tasks (mergelab.training.multitask defaults)"),
    MethodConfig("weight_average", "weight_average", source="Wortsman et al. 2022"),
    MethodConfig("task_arithmetic", "task_arithmetic", {"lambda": _TA_LAMBDA},
                 source="lambda on validation (Ilharco et al. 2023); fixed: 0.3, the common no-validation default",
                 grid=_grid("task_arithmetic")),
    MethodConfig("ties", "ties", {"lambda": 1.0, "density": 0.2},
                 source="k 20%, lambda on validation (Yadav et al. 2023); fixed: lambda 1, the paper's "
                        "no-validation setting", grid=_grid("ties")),
    MethodConfig("dare", "dare_linear", {"density": 0.5, "lambda": _TA_LAMBDA},
                 source="DARE drop 0.5 + task arithmetic, lambda on validation (Yu et al. 2024); fixed: 0.3",
                 grid=_grid("dare_linear")),
    MethodConfig("tsv_merge", "tsv_merge", _SPECTRAL,
                 source="task singular vectors, k = r/T per task, lambda on validation (Gargiulo et al. 2025); "
                        "fixed: 1 (FusionBench); convolutions as (out, in*kh*kw) matrices", grid=_grid("tsv_merge")),
    MethodConfig("iso_c", "iso_c", _SPECTRAL,
                 source="isotropic spectrum of the TA sum, lambda on validation (Marczak et al. 2025); fixed: 1 "
                        "(FusionBench); convolutions as matrices", grid=_grid("iso_c")),
    MethodConfig("iso_cts", "iso_cts", {**_SPECTRAL, "common_space_fraction": 0.8},
                 source="common subspace 80 % + task-specific subspaces, isotropic, lambda on validation (Marczak "
                        "et al. 2025); fixed: 1 (FusionBench); convolutions as matrices", grid=_grid("iso_cts")),
    MethodConfig("fisher", "fisher", {}, source="exact diagonal Fisher (Matena & Raffel 2022)"),
    MethodConfig("regmean", "regmean", {}, source="alpha 0.9 (Jin et al. 2023)"),
    MethodConfig("adamerging", "adamerging", {}, {"steps": 3},
                 source="layer-wise, 500 steps, init 0.3 (Yang et al. 2024)"),
    MethodConfig("adamerging_surgery", "surgery", {}, {"steps": 10},
                 source="surgery rank 16, 1000 steps/task on AdaMerging (Yang et al. 2024b)"),
    MethodConfig("fw_hard", "fw_hard", {}, {"iterations": 1, "line_search_steps": 1},
                 source="3 iterations from TA 0.3, line search (Chen et al. 2025)"),
    MethodConfig("fw_soft", "fw_soft", {}, {"iterations": 2, "pgd_steps": 3},
                 source="15 iterations from theta_0, k = #tasks (Chen et al. 2025)"),
)}
#: Methods that take the BN protocol as a parameter: {method: {protocol: parameters}}.
BN_PARAMETERS: dict[str, dict[str, dict[str, Any]]] = {
    "adamerging": {"joint": {"bn": "batch"}, "per_task": {"bn": "batch"}},
    # FW's bn: batch normalises each task's batch by itself: the per_task protocol. Under joint it measured
    # worse than merged-statistics FW on the resnet_s zoo (fw_soft 71.5 vs 78.1, fw_hard 72.5 vs 74.7).
    "fw_hard": {"per_task": {"bn": "batch"}},
    "fw_soft": {"per_task": {"bn": "batch"}},
}
DEFAULT_METHODS: tuple[str, ...] = tuple(CATALOG)
QUICK_SAMPLES = 16


@dataclass
class MethodRow:
    """One method's results. Accuracies in [0, 1]; ``wall_s`` seconds; ``peak_mb`` MiB (NaN: not measured)."""

    method: str
    per_task: dict[str, float]
    per_task_loss: dict[str, float]
    average: float
    normalized: float
    wall_s: float
    peak_mb: float
    params: dict
    base_mb: float = math.nan
    error: str | None = None
    #: The evaluation protocol of this row (:mod:`mergelab.evaluation.protocol`): BN statistics and heads.
    bn: str = ""
    head: str = "expert"
    #: Why the merge is invalid (non-finite logits, negative BN variances), or None.
    invalid: str | None = None
    #: ``{task: bit-packed per-example correctness}`` on the test split (``TaskEvaluation.correct``), for the
    #: paired tests between rows (:meth:`ComparisonTable.paired_test`); empty for tables written before it.
    per_task_correct: dict[str, str] = field(default_factory=dict)
    #: ``{task: number of test examples}`` (the length of each ``per_task_correct`` entry).
    per_task_n: dict[str, int] = field(default_factory=dict)

    def outcomes(self) -> dict[str, Any] | None:
        """``{task: per-example correctness}`` (numpy booleans), or None when not every task's was kept."""
        from mergelab.analysis.statistics import unpack_outcomes

        if not self.per_task or any(t not in self.per_task_correct or t not in self.per_task_n for t in self.per_task):
            return None
        return {t: unpack_outcomes(self.per_task_correct[t], self.per_task_n[t]) for t in self.per_task}

    @property
    def usable(self) -> bool:
        """Ran without error and is a valid model: its numbers may be compared."""
        return self.error is None and self.invalid is None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items()}


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_number(x) for k, x in v.items()}
    return v


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


@dataclass(frozen=True)
class PairedComparison:
    """Row ``method`` against row ``reference`` on the same test examples: the paired ``test``
    (:class:`~mergelab.analysis.statistics.PairedTest`) and its p-value Holm-adjusted over the table's
    ``family`` comparisons."""

    method: str
    reference: str
    test: Any
    p_adjusted: float
    family: int

    @property
    def verdict(self) -> bool | None:
        """True: ``method`` more accurate than ``reference``; False: less; None: undecided (adjusted p >= alpha)."""
        from mergelab.analysis.statistics import ALPHA

        return None if not self.p_adjusted < ALPHA else self.test.difference > 0

    @property
    def label(self) -> str:
        return {True: "better", False: "worse", None: "undecided"}[self.verdict]


@dataclass
class ComparisonTable:
    """Rows of a comparison on ``tasks``; ``meta`` says how it was measured."""

    arch: str
    tasks: list[str]
    rows: list[MethodRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> MethodRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no row {method!r}; rows: {', '.join(r.method for r in self.rows)}")

    def paired_test(self, a: str, b: str) -> Any:
        """The paired test of row ``a`` against row ``b`` on the same test examples
        (:func:`mergelab.analysis.statistics.paired_accuracy_test`: difference of task-averaged accuracy, its
        interval, McNemar's exact p-value), or None when either row is unusable or has no per-example results."""
        from mergelab.analysis.statistics import paired_accuracy_test

        rows = [next((r for r in self.rows if r.method == m and r.usable), None) for m in (a, b)]
        outs = [r.outcomes() if r is not None else None for r in rows]
        if outs[0] is None or outs[1] is None:
            return None
        return paired_accuracy_test({t: outs[0][t] for t in self.tasks}, {t: outs[1][t] for t in self.tasks})

    def paired_comparisons(self, references: Sequence[str] = PAIRED_REFERENCES) -> list[PairedComparison]:
        """Every usable merge row (not one of :data:`REFERENCE_ROWS`) against every row of ``references`` (itself
        excluded), by :meth:`paired_test`, with p-values Holm-adjusted over all the comparisons made (the family:
        pairs where both rows are usable and kept per-example results). Empty for tables without them."""
        from mergelab.analysis.statistics import holm

        pairs = [(r.method, ref) for ref in references for r in self.rows
                 if r.method not in REFERENCE_ROWS and r.method != ref]
        tested = [(a, b, t) for a, b in pairs if (t := self.paired_test(a, b)) is not None]
        adjusted = holm([t.p_value for _, _, t in tested])
        return [PairedComparison(a, b, t, p, len(tested)) for (a, b, t), p in zip(tested, adjusted)]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "tasks": list(self.tasks), "rows": [r.to_dict() for r in self.rows],
                "meta": _json_number(dict(self.meta))}

    def to_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        from mergelab.atomic_files import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def to_csv(self, path: PathLike) -> Path:
        """One line per method: accuracy and loss per task, average, normalized, wall_s, peak_mb, base_mb."""
        from mergelab.atomic_files import write_csv_atomic

        cols = (["method"] + [f"acc:{t}" for t in self.tasks] + [f"loss:{t}" for t in self.tasks]
                + ["average", "normalized", "wall_s", "peak_mb", "base_mb", "bn", "head", "invalid", "error", "params"])

        def cell(v: Any) -> Any:
            return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

        return write_csv_atomic(path, cols, (
            [r.method] + [cell(r.per_task.get(t)) for t in self.tasks] + [cell(r.per_task_loss.get(t)) for t in self.tasks]
            + [cell(r.average), cell(r.normalized), cell(r.wall_s), cell(r.peak_mb), cell(r.base_mb), r.bn, r.head,
               r.invalid or "", r.error or "",
               json.dumps(r.params, sort_keys=True, default=str)]
            for r in self.rows))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonTable:
        rows = [MethodRow(**{k: (_num(v) if k in ("average", "normalized", "wall_s", "peak_mb", "base_mb") else v)
                             for k, v in r.items()}) for r in data["rows"]]
        return cls(data["arch"], list(data["tasks"]), rows, dict(data.get("meta") or {}))


# ---------------------------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    """This process's current resident set (MiB), from /proc; NaN where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def _hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
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


# ------------------------------------------------------------------------------------------ child jobs


def _job_merge(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    from mergelab.merging import merge

    result = merge(spec, out_dir, overwrite=True, progress=False, hash_inputs=False)
    return {"seconds": result.seconds, "out_dir": str(result.out_dir)}


def _job_multitask(spec: dict[str, Any], cache_dir: str | None, experts: list[str]) -> dict[str, Any]:
    from mergelab.training.multitask import train_multitask

    r = train_multitask(spec, cache_dir, experts=experts)
    return {"path": r.path, "cached": r.cached, "wall_time_s": r.wall_time_s, "peak_rss_mb": r.peak_rss_mb}


_JOBS: dict[str, Callable[..., dict[str, Any]]] = {"merge": _job_merge, "multitask": _job_multitask}


def _warm_up(arch: str | None) -> None:
    """Load what every merge loads anyway (modules, torch's CPU kernels) before the baseline is taken."""
    import torch

    import mergelab.checkpoints  # noqa: F401
    import mergelab.merging.torch_backend  # noqa: F401
    import mergelab.evaluation.task_suite  # noqa: F401
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
    import torch

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _warm_up(arch)
    base = _rss_mb()
    t0 = time.perf_counter()
    out = _JOBS[job](**kwargs)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = _maxrss_mb()
    out["base_mb"] = base
    return out


def _run_job(job: str, kwargs: dict[str, Any], isolate: bool, arch: str | None = None) -> dict[str, Any]:
    import torch

    if isolate:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        from mergelab.worker_lifetime import exit_with_parent

        # the child exits if this process is killed (it would otherwise finish the job and wait forever)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            return pool.submit(_child, job, kwargs, torch.get_num_threads(), level, arch).result()
    base = _rss_mb()
    measured = _reset_hwm()
    t0 = time.perf_counter()
    out = _JOBS[job](**kwargs)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = _hwm_mb() if measured else math.nan
    out["base_mb"] = base if measured else math.nan
    return out


# ----------------------------------------------------------------------------------------- resolution


@dataclass
class _Setup:
    arch: str
    tasks: list[str]
    pool: list[Any]  # ExpertResults, merge order
    heads: list[Any]  # one ExpertResult per task (its head and reference accuracy)
    base: Path


def _resolve(arch: str, tasks: Sequence[str] | None, pool: Sequence[PathLike] | None, cache_dir: PathLike | None) -> _Setup:
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
    return _Setup(arch, tasks, experts, heads, Path(pre.path))


def method_configs(methods: Sequence[str] | None) -> list[MethodConfig]:
    """The rows to compare for ``methods`` (``None``: :data:`DEFAULT_METHODS`): a :data:`CATALOG` row by its
    name, any other data-free or data-informed method with its defaults and its catalog validation grid;
    an unknown or repeated method is a :class:`SpecError` naming the known ones."""
    from mergelab.methods import METHODS as DATA_FREE
    from mergelab.methods.data_informed import registry

    if methods is None:
        return [CATALOG[m] for m in DEFAULT_METHODS]
    out = []
    informed = registry()
    for m in methods:
        if m in CATALOG:
            out.append(CATALOG[m])
        elif m in DATA_FREE or m in informed:
            out.append(MethodConfig(m, m, source="method defaults", grid=_grid(m)))
        else:
            known = list(CATALOG) + sorted((set(DATA_FREE) | set(informed)) - {c.method for c in CATALOG.values()})
            raise SpecError(f"unknown method {m!r}; known: {', '.join(known)}")
    if len({c.name for c in out}) != len(out):
        raise SpecError(f"methods: a method is listed twice: {list(methods)}")
    return out


# -------------------------------------------------------------------------------------------- rows


def _row_from_eval(name: str, result: Any, tasks: Sequence[str], wall: float, peak: float, base: float,
                   params: dict) -> MethodRow:
    by = result.by_task()
    acc = {t: by[t].accuracy for t in tasks}
    loss = {t: by[t].loss for t in tasks}
    norms = [by[t].normalized_accuracy for t in tasks]
    return MethodRow(method=name, per_task=acc, per_task_loss=loss, average=sum(acc.values()) / len(acc),
                     normalized=(sum(norms) / len(norms)) if all(n is not None for n in norms) else math.nan,
                     wall_s=wall, peak_mb=peak, params=params, base_mb=base,
                     per_task_correct={t: by[t].correct for t in tasks if by[t].correct},
                     per_task_n={t: by[t].n_test for t in tasks})


def _negative_variances(path: PathLike) -> int:
    """Number of negative BatchNorm ``running_var`` entries in a merged backbone (they make features NaN)."""
    from mergelab.models import read_backbone_state

    return int(sum((t < 0).sum().item() for n, t in read_backbone_state(path).items() if n.endswith("running_var")))


def _failed(name: str, error: str, params: dict) -> MethodRow:
    nan = math.nan
    return MethodRow(name, {}, {}, nan, nan, nan, nan, params, nan, error)


def run_comparison(
    arch: str = "resnet_s",
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    *,
    pool: Sequence[str | Path] | None = None,
    samples_per_task: int = 100,
    cache_dir: PathLike | None = None,
    workdir: PathLike | None = None,
    progress: bool = True,
    quick: bool = False,
    isolate: bool | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    bn: str | bool | None = None,
    select: str = "validation",
    reset_bn: bool | str | None = None,
) -> ComparisonTable:
    """Compare ``methods`` on ``tasks``; see the module docstring.

    Args:
        arch: architecture of the zoo. tasks: tasks to evaluate (default :data:`DEFAULT_TASKS`, or the
            pool's tasks). methods: row names of :data:`CATALOG` or any registered method (default: all of
            :data:`DEFAULT_METHODS`).
        pool: expert folders to merge (default: the zoo's default experts for ``tasks``); every task needs
            an expert in the pool, extra experts are merged too (pool-scaling studies).
        samples_per_task: examples per task for data-informed methods.
        cache_dir: zoo cache root. workdir: where merged models are written (kept); default a temporary
            folder, removed at the end.
        quick: tiny budgets everywhere (tests). isolate: run each merge in a fresh spawned process to
            measure its peak memory (default: True, False when ``quick``).
        overrides: ``{row name: {parameter: value}}`` replacing the catalog's settings.
        bn: the BatchNorm protocol of the pretrained row and every merge (:mod:`mergelab.evaluation.protocol`):
            ``joint`` (default for BN architectures), ``per_task`` or ``merged``; ``none`` is recorded for
            architectures without BatchNorm. Not applied to the individual and multi-task rows (their
            statistics are their own) nor to surgery (trained on the features of its merged backbone, whose
            statistics AdaMerging already re-estimated under ``joint``/``per_task``).
        select: ``validation`` (default): rows with a ``grid`` choose their scale on the validation split;
            ``fixed``: the catalog's no-validation defaults.
        reset_bn: older name of ``bn`` (``True`` = ``joint``, ``False`` = ``merged``).

    Raises :class:`~mergelab.errors.SpecError` for unknown tasks/methods, tasks without experts, an empty or
    inconsistent pool. A method that fails while running gives a row with ``error`` set (the others go on).
    """
    from mergelab.evaluation import evaluate

    if samples_per_task < 1:
        raise SpecError(f"samples_per_task must be >= 1, got {samples_per_task}")
    from mergelab.evaluation.protocol import describe, evaluation_reset, resolve_bn

    isolate = (not quick) if isolate is None else isolate
    if select not in ("validation", "fixed"):
        raise SpecError(f"select must be 'validation' or 'fixed', got {select!r}")
    if bn is None and reset_bn is not None:
        bn = reset_bn
    setup = _resolve(arch, tasks, pool, cache_dir)
    if workdir is not None:  # merged models go into sub-folders (each merge refuses its own inputs too)
        refuse_overlap(workdir, [setup.base, *(e.path for e in setup.pool)], what="workdir", replaces=False)
    protocol = resolve_bn(bn, setup.arch)
    configs = method_configs(methods)
    overrides = dict(overrides or {})
    unknown = set(overrides) - {c.name for c in configs}
    if unknown:
        raise SpecError(f"overrides: for method(s) not compared: {', '.join(sorted(unknown))}")
    samples = min(samples_per_task, QUICK_SAMPLES) if quick else samples_per_task
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="mergelab-compare-"))
        work = tmp
    else:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
    heads = setup.heads
    data = {"tasks": setup.tasks, "samples_per_task": samples}
    started = time.perf_counter()
    rows: list[MethodRow] = []
    outputs: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc=f"compare {setup.arch}", unit="method")
    try:
        for cfg in configs:
            if bar is not None:
                bar.set_postfix_str(cfg.name)
            params = {**cfg.parameters(quick), **dict(overrides.get(cfg.name, {}))}
            try:
                row = _run_one(cfg, params, setup, data, work, cache_dir, quick, isolate, outputs,
                               partial(evaluate, reset_bn=evaluation_reset(protocol)), evaluate, protocol,
                               _search_grid(cfg, overrides.get(cfg.name, {}), select, quick))
            except MergeLabError as exc:
                log.error("%s failed: %s", cfg.name, exc)
                row = _failed(cfg.name, f"{type(exc).__name__}: {exc}", params)
            except Exception as exc:  # noqa: BLE001 - one broken method must not lose a long comparison
                log.exception("%s failed", cfg.name)
                row = _failed(cfg.name, f"{type(exc).__name__}: {exc}", params)
            row.bn = protocol if cfg.name not in ("individual", "multitask") else "own"
            rows.append(row)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "pool": [str(e.path) for e in setup.pool],
        "pool_tasks": [e.task for e in setup.pool],
        "samples_per_task": samples,
        "quick": quick,
        "isolated": isolate,
        "bn": protocol,
        "head": "expert",
        "protocol": describe(protocol),
        "select": select,
        "seconds": round(time.perf_counter() - started, 2),
        "memory_note": ("peak MB: ru_maxrss of a fresh spawned process per method (torch loaded); "
                        "+MB: above that process's RSS before the merge" if isolate else
                        "peak MB: this process's VmHWM after a /proc/self/clear_refs reset (includes memory "
                        "already held); +MB: above its RSS before the method"),
        "wall_note": ("wall s: merge time (read, merge, write; evaluation excluded); individual: summed expert "
                      "fine-tuning time; multitask: its training time; adamerging_surgery: AdaMerging + surgery"),
        "sources": {c.name: c.source for c in configs},
    }
    if workdir is not None:
        meta["workdir"] = str(work)
    return ComparisonTable(setup.arch, list(setup.tasks), rows, meta)


def _search_grid(cfg: MethodConfig, user: Mapping[str, Any], select: str, quick: bool) -> dict[str, tuple[Any, ...]]:
    """The grid to search on validation data: the row's grid minus parameters the user fixed (quick: the
    grid's first, middle and last values)."""
    if select != "validation":
        return {}
    grid = {k: tuple(v) for k, v in cfg.grid.items() if k not in user}
    if quick:
        grid = {k: tuple(dict.fromkeys((v[0], v[len(v) // 2], v[-1]))) for k, v in grid.items()}
    return grid


def _invalid(result: Any, negative: int, protocol: str) -> str | None:
    """Why an evaluated merge is invalid (non-finite logits; negative BN variances used as they are)."""
    bad = [f"{r.task} ({r.nonfinite}/{r.n_test})" for r in result.tasks if r.nonfinite]
    if bad:
        return "non-finite logits on " + ", ".join(bad)
    if negative and protocol == "merged":
        return f"{negative} negative BatchNorm running_var entries (statistics kept as merged)"
    return None


def _select_on_validation(spec: dict[str, Any], grid: Mapping[str, tuple[Any, ...]], heads: Sequence[Any],
                          tasks: Sequence[str], work: Path, evaluate: Callable[..., Any]) -> dict[str, Any]:
    """Merge ``spec`` at every point of ``grid`` (in-process), score each on the validation split under the
    comparison's BN protocol, and return ``{parameter: {"grid", "validation_accuracy", "chosen"}}`` with the
    best mean validation accuracy (ties: the first grid point; invalid merges never win)."""
    import itertools

    from mergelab.merging import merge

    names = list(grid)
    points = list(itertools.product(*(grid[n] for n in names)))
    scores: list[float] = []
    for point in points:
        out = work / "validation-candidate"
        candidate = {**spec, "parameters": {**spec["parameters"], **dict(zip(names, point))}}
        merge(candidate, out, overwrite=True, progress=False)
        r = evaluate(out, heads, tasks=tasks, split="validation")
        scores.append(r.mean_accuracy if r.valid else -math.inf)
        shutil.rmtree(out, ignore_errors=True)
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    return {n: {"grid": list(grid[n]) if len(names) == 1 else [p[j] for p in points],
                "validation_accuracy": [s if math.isfinite(s) else None for s in scores],
                "chosen": points[best][j]} for j, n in enumerate(names)}


def _run_one(cfg: MethodConfig, params: dict[str, Any], setup: _Setup, data: dict[str, Any], work: Path,
             cache_dir: PathLike | None, quick: bool, isolate: bool, outputs: dict[str, dict[str, Any]],
             evaluate: Callable[..., Any], evaluate_own: Callable[..., Any], protocol: str = "merged",
             grid: Mapping[str, tuple[Any, ...]] | None = None) -> MethodRow:
    tasks, heads = setup.tasks, setup.heads
    nan = math.nan
    if cfg.name == "pretrained":
        r = evaluate(setup.base, heads, tasks=tasks)
        row = _row_from_eval(cfg.name, r, tasks, 0.0, nan, nan, params)
        row.invalid = _invalid(r, 0, protocol)
        return row
    if cfg.name == "individual":
        rows = [evaluate_own(e.path, [e], tasks=[e.task]).by_task()[e.task] for e in heads]
        acc = {row.task: row.accuracy for row in rows}
        loss = {row.task: row.loss for row in rows}
        norm = [row.normalized_accuracy for row in rows]
        return MethodRow(cfg.name, acc, loss, sum(acc.values()) / len(acc),
                         sum(norm) / len(norm) if all(n is not None for n in norm) else nan,
                         sum(e.wall_time_s for e in heads), nan, {"experts": [str(e.path) for e in heads]}, nan,
                         per_task_correct={row.task: row.correct for row in rows if row.correct},
                         per_task_n={row.task: row.n_test for row in rows})
    if cfg.name == "multitask":
        from mergelab.training.multitask import multitask_spec, read_multitask

        spec = multitask_spec(tasks, setup.arch, experts=heads, **params)
        job = _run_job("multitask", {"spec": spec.canonical(), "cache_dir": None if cache_dir is None else str(cache_dir),
                                     "experts": [str(e.path) for e in heads]}, isolate, setup.arch)
        mtl = read_multitask(job["path"])
        if mtl is None:  # pragma: no cover - the job just wrote it
            raise SpecError(f"multi-task model missing at {job['path']}")
        r = evaluate_own(mtl.backbone_path, mtl.head_experts(heads), tasks=tasks)
        peak = job["peak_mb"] if not job["cached"] else _num(mtl.peak_rss_mb)
        base = job["base_mb"] if not job["cached"] else nan
        return _row_from_eval(cfg.name, r, tasks, mtl.wall_time_s, peak, base,
                              {**spec.canonical(), "path": mtl.path, "cached": job["cached"]})
    if cfg.method is None:  # pragma: no cover - catalog rows all have a method
        raise SpecError(f"row {cfg.name!r} has no method")
    from mergelab.methods.data_informed import registry

    informed = cfg.method in registry()
    out = work / cfg.name
    spec: dict[str, Any] = {"method": cfg.method, "base": str(setup.base),
                            "models": [str(e.path) for e in setup.pool], "parameters": dict(params),
                            "device": "auto"}
    if informed:
        spec["data"] = dict(data)
        spec["parameters"] = {**BN_PARAMETERS.get(cfg.method, {}).get(protocol, {}), **spec["parameters"]}
    elif protocol != "none" and "overrides" not in params:
        from mergelab.evaluation.protocol import statistics_overrides

        # BN running statistics are not task vectors: the experts' weighted mean, whatever the method
        spec["overrides"] = statistics_overrides(cfg.method, [1.0] * len(setup.pool))
    if not spec.get("overrides"):
        spec.pop("overrides", None)
    selected = None
    if grid and not informed:
        selected = _select_on_validation(spec, grid, heads, tasks, work, evaluate)
        spec["parameters"].update({k: v["chosen"] for k, v in selected.items()})
    extra_wall, extra_peak = 0.0, nan
    if cfg.method == "surgery":
        modules = work / f"{cfg.name}.surgery"
        spec["parameters"]["modules_dir"] = str(modules)
        prior = outputs.get("adamerging")
        if prior is not None and "merged" not in params and "from" not in params:
            spec["parameters"]["merged"] = prior["out_dir"]
            extra_wall, extra_peak = prior["wall_s"], prior["peak_mb"]
        elif "merged" not in params and "from" not in params:
            spec["parameters"]["from"] = "adamerging"
            if quick:
                spec["parameters"]["from_parameters"] = dict(CATALOG["adamerging"].parameters(True))
    job = _run_job("merge", {"spec": spec, "out_dir": str(out)}, isolate, setup.arch)
    outputs[cfg.name] = job
    if cfg.method == "surgery":
        from mergelab.methods.data_informed.surgery import evaluate_with_surgery

        r = evaluate_with_surgery(out, spec["parameters"]["modules_dir"], heads, tasks=tasks)
    else:
        r = evaluate(out, heads, tasks=tasks)
    peak = job["peak_mb"] if math.isnan(extra_peak) else max(job["peak_mb"], extra_peak)
    record_params = dict(spec["parameters"])
    if spec.get("overrides"):
        record_params["overrides"] = spec["overrides"]
    if selected:
        record_params["selected"] = selected
    negative = _negative_variances(out)
    if negative:
        log.warning("%s: %d BatchNorm running_var entries of the merged model are negative (NaN features)",
                    cfg.name, negative)
        record_params["negative_running_var"] = negative
    row = _row_from_eval(cfg.name, r, tasks, job["wall_s"] + extra_wall, peak, job["base_mb"],
                         {"method": cfg.method, **record_params})
    row.invalid = _invalid(r, negative, protocol)
    if row.invalid:
        log.warning("%s: invalid merge: %s", cfg.name, row.invalid)
    return row


__all__ = ["CATALOG", "DEFAULT_METHODS", "DEFAULT_TASKS", "PAIRED_REFERENCES", "ComparisonTable", "MethodConfig",
           "MethodRow", "PairedComparison", "REFERENCE_ROWS", "run_comparison"]
