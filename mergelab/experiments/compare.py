"""Method comparison on a task group: every merging method against the usual reference points, one table.

``run_comparison(arch, tasks, methods)`` takes the zoo's experts for ``tasks`` (or an explicit ``pool`` of
expert folders, which may hold more experts than tasks; :mod:`mergelab.experiments.comparison_setup`), and
produces one :class:`~mergelab.experiments.comparison_table.MethodRow` per row: per-task test accuracy and loss,
their average, normalized accuracy (mean over tasks of ``acc_t / acc(expert_t on t)``, THEORY.md section 2),
wall time and peak memory, gathered in a :class:`~mergelab.experiments.comparison_table.ComparisonTable` (with
the paired tests between its rows).

The rows and their settings are :mod:`mergelab.experiments.comparison_rows` (default: all of its ``CATALOG``):

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

  **Scales chosen on validation data** (``select="validation"``, default): a row with a ``grid`` is merged at
  every grid value and keeps the best mean validation accuracy (:mod:`mergelab.experiments.validation_selection`).
  The row records the grid, the validation accuracies and the chosen value. ``select="fixed"`` uses the rows'
  no-validation defaults.

  Data-informed methods use ``samples_per_task`` examples of each evaluated task (default 100, the
  FW-Merging paper's budget; also given to Fisher and RegMean, whose own defaults are 256) from the split each
  method defaults to (labelled train for FW/Fisher/RegMean, unlabelled test for AdaMerging and surgery, as
  their papers do).

**Wall time and peak memory.** Each merge (and the multi-task training) runs in a fresh spawned process
(``isolate=True``, the default) that times it and reads its resident-set high-water mark; with
``isolate=False`` in this process (:mod:`mergelab.experiments.isolated_jobs` says how each is measured).
``quick=True`` runs in-process.

``quick=True``: few samples and steps everywhere (tests, CI, smoke runs); the numbers mean little.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergelab.errors import MergeLabError, SpecError
from mergelab.experiments.comparison_rows import BN_PARAMETERS, CATALOG, MethodConfig, method_configs
from mergelab.experiments.comparison_setup import ComparisonSetup, resolve_setup
from mergelab.experiments.comparison_table import ComparisonTable, MethodRow, failed_row, number
from mergelab.experiments.isolated_jobs import run_job
from mergelab.experiments.validation_selection import search_grid, select_on_validation
from mergelab.output_paths import refuse_overlap

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

QUICK_SAMPLES = 16


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
        arch: architecture of the zoo. tasks: tasks to evaluate (default
            :data:`~mergelab.experiments.comparison_rows.DEFAULT_TASKS`, or the pool's tasks). methods: row names
            of :data:`~mergelab.experiments.comparison_rows.CATALOG` or any registered method (default: all of
            :data:`~mergelab.experiments.comparison_rows.DEFAULT_METHODS`).
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
    # deferred: torch (evaluation); the comparison's types and rows are read on torch-free paths (report, CLI)
    from mergelab.evaluation import evaluate
    from mergelab.evaluation.protocol import describe, evaluation_reset, resolve_bn

    if samples_per_task < 1:
        raise SpecError(f"samples_per_task must be >= 1, got {samples_per_task}")

    isolate = (not quick) if isolate is None else isolate
    if select not in ("validation", "fixed"):
        raise SpecError(f"select must be 'validation' or 'fixed', got {select!r}")
    if bn is None and reset_bn is not None:
        bn = reset_bn
    setup = resolve_setup(arch, tasks, pool, cache_dir)
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
    data = {"tasks": setup.tasks, "samples_per_task": samples}
    started = time.perf_counter()
    rows: list[MethodRow] = []
    outputs: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        bar = tqdm(total=len(configs), desc=f"compare {setup.arch}", unit="method")
    try:
        for cfg in configs:
            if bar is not None:
                bar.set_postfix_str(cfg.name)
            params = {**cfg.parameters(quick), **dict(overrides.get(cfg.name, {}))}
            try:
                row = _run_one(cfg, params, setup, data, work, cache_dir, quick, isolate, outputs,
                               partial(evaluate, reset_bn=evaluation_reset(protocol)), evaluate, protocol,
                               search_grid(cfg.grid, overrides.get(cfg.name, {}), select, quick))
            except MergeLabError as exc:
                log.error("%s failed: %s", cfg.name, exc)
                row = failed_row(cfg.name, f"{type(exc).__name__}: {exc}", params)
            except Exception as exc:  # noqa: BLE001 - one broken method must not lose a long comparison
                log.exception("%s failed", cfg.name)
                row = failed_row(cfg.name, f"{type(exc).__name__}: {exc}", params)
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


# ---------------------------------------------------------------------------------------------- rows


def _run_one(cfg: MethodConfig, params: dict[str, Any], setup: ComparisonSetup, data: dict[str, Any], work: Path,
             cache_dir: PathLike | None, quick: bool, isolate: bool, outputs: dict[str, dict[str, Any]],
             evaluate: Callable[..., Any], evaluate_own: Callable[..., Any], protocol: str = "merged",
             grid: Mapping[str, tuple[Any, ...]] | None = None) -> MethodRow:
    """One row: ``evaluate`` scores under the comparison's BN protocol, ``evaluate_own`` with the models' own
    statistics (individual experts, multi-task model); ``outputs`` collects the merge jobs by row name."""
    if cfg.name == "pretrained":
        r = evaluate(setup.base, setup.heads, tasks=setup.tasks)
        row = _row_from_eval(cfg.name, r, setup.tasks, 0.0, math.nan, math.nan, params)
        row.invalid = _invalid(r, 0, protocol)
        return row
    if cfg.name == "individual":
        return _individual_row(cfg.name, setup, evaluate_own)
    if cfg.name == "multitask":
        return _multitask_row(cfg.name, params, setup, cache_dir, isolate, evaluate_own)
    if cfg.method is None:  # pragma: no cover - catalog rows all have a method
        raise SpecError(f"row {cfg.name!r} has no method")
    return _merge_row(cfg, params, setup, data, work, quick, isolate, outputs, evaluate, protocol, grid)


def _individual_row(name: str, setup: ComparisonSetup, evaluate_own: Callable[..., Any]) -> MethodRow:
    """Each expert on its own task; wall time: the experts' summed fine-tuning time."""
    heads = setup.heads
    rows = [evaluate_own(e.path, [e], tasks=[e.task]).by_task()[e.task] for e in heads]
    acc = {row.task: row.accuracy for row in rows}
    loss = {row.task: row.loss for row in rows}
    norm = [row.normalized_accuracy for row in rows]
    return MethodRow(name, acc, loss, sum(acc.values()) / len(acc),
                     sum(norm) / len(norm) if all(n is not None for n in norm) else math.nan,
                     sum(e.wall_time_s for e in heads), math.nan, {"experts": [str(e.path) for e in heads]},
                     math.nan, per_task_correct={row.task: row.correct for row in rows if row.correct},
                     per_task_n={row.task: row.n_test for row in rows})


def _multitask_row(name: str, params: dict[str, Any], setup: ComparisonSetup, cache_dir: PathLike | None,
                   isolate: bool, evaluate_own: Callable[..., Any]) -> MethodRow:
    """The jointly fine-tuned backbone (trained, or read from the cache), each task through its own head."""
    # deferred: torch (training); see run_comparison
    from mergelab.training.multitask import multitask_spec, read_multitask

    tasks, heads = setup.tasks, setup.heads
    spec = multitask_spec(tasks, setup.arch, experts=heads, **params)
    job = run_job("multitask", {"spec": spec.canonical(), "cache_dir": None if cache_dir is None else str(cache_dir),
                                "experts": [str(e.path) for e in heads]}, isolate, setup.arch)
    mtl = read_multitask(job["path"])
    if mtl is None:  # pragma: no cover - the job just wrote it
        raise SpecError(f"multi-task model missing at {job['path']}")
    r = evaluate_own(mtl.backbone_path, mtl.head_experts(heads), tasks=tasks)
    peak = job["peak_mb"] if not job["cached"] else number(mtl.peak_rss_mb)
    base = job["base_mb"] if not job["cached"] else math.nan
    return _row_from_eval(name, r, tasks, mtl.wall_time_s, peak, base,
                          {**spec.canonical(), "path": mtl.path, "cached": job["cached"]})


def _merge_row(cfg: MethodConfig, params: dict[str, Any], setup: ComparisonSetup, data: dict[str, Any], work: Path,
               quick: bool, isolate: bool, outputs: dict[str, dict[str, Any]], evaluate: Callable[..., Any],
               protocol: str, grid: Mapping[str, tuple[Any, ...]] | None) -> MethodRow:
    """A merge of the pool by ``cfg.method`` (its scale chosen on validation when ``grid``), written to
    ``work / cfg.name`` by a measured job and evaluated through the experts' heads."""
    # deferred: torch (the data-informed registry, evaluation); see run_comparison
    from mergelab.evaluation.protocol import statistics_overrides
    from mergelab.methods.data_informed import registry

    tasks, heads = setup.tasks, setup.heads
    informed = cfg.method in registry()
    out = work / cfg.name
    spec: dict[str, Any] = {"method": cfg.method, "base": str(setup.base),
                            "models": [str(e.path) for e in setup.pool], "parameters": dict(params),
                            "device": "auto"}
    if informed:
        spec["data"] = dict(data)
        spec["parameters"] = {**BN_PARAMETERS.get(cfg.method, {}).get(protocol, {}), **spec["parameters"]}
    elif protocol != "none" and "overrides" not in params:
        # BN running statistics are not task vectors: the experts' weighted mean, whatever the method
        spec["overrides"] = statistics_overrides(cfg.method, [1.0] * len(setup.pool))
    if not spec.get("overrides"):
        spec.pop("overrides", None)
    selected = None
    if grid and not informed:
        selected = select_on_validation(spec, grid, heads, tasks, work, evaluate)
        spec["parameters"].update({k: v["chosen"] for k, v in selected.items()})
    extra_wall, extra_peak = 0.0, math.nan
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
    job = run_job("merge", {"spec": spec, "out_dir": str(out)}, isolate, setup.arch)
    outputs[cfg.name] = job
    if cfg.method == "surgery":
        # deferred: torch (surgery); see run_comparison
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
    negative = negative_variances(out)
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


def _invalid(result: Any, negative: int, protocol: str) -> str | None:
    """Why an evaluated merge is invalid (non-finite logits; negative BN variances used as they are)."""
    bad = [f"{r.task} ({r.nonfinite}/{r.n_test})" for r in result.tasks if r.nonfinite]
    if bad:
        return "non-finite logits on " + ", ".join(bad)
    if negative and protocol == "merged":
        return f"{negative} negative BatchNorm running_var entries (statistics kept as merged)"
    return None


def negative_variances(path: PathLike) -> int:
    """Number of negative BatchNorm ``running_var`` entries in a merged backbone (they make features NaN)."""
    # deferred: torch (models); see run_comparison
    from mergelab.models import read_backbone_state

    return int(sum((t < 0).sum().item() for n, t in read_backbone_state(path).items() if n.endswith("running_var")))


__all__ = ["QUICK_SAMPLES", "negative_variances", "run_comparison"]
