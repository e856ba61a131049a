"""The quickstart: build (or reuse) a small zoo, merge a task group with every method, report.

:func:`run_quickstart` is the main job on a fresh machine (``mergelab quickstart``, ``make demo``):

1. **Zoo**: :func:`mergelab.training.zoo.build_zoo` for the comparison's default 4-task group
   (:data:`~mergelab.experiments.comparison_rows.DEFAULT_TASKS`: mnist, mnist_rot90, digits, shapes) on ``resnet_s``:
   builds the task data, pretrains the backbone and fine-tunes the four experts at the zoo's default
   hyperparameters, each only if it is not cached already (``$MERGELAB_CACHE``, default ``~/.cache/mergelab``).
2. **Comparison**: :func:`mergelab.experiments.compare.run_comparison` with every row (pretrained,
   individual experts, multi-task learning, weight averaging, task arithmetic, TIES, DARE, Fisher, RegMean,
   AdaMerging, AdaMerging + surgery, FW-hard, FW-soft) at ``mergelab compare``'s settings (its ``CATALOG``;
   :data:`QUICKSTART_OVERRIDES` could lighten them, it is empty because the full settings fit the budget),
   run in this process (``isolate=False``: no fresh process per method, so peak memory is this process's
   high-water mark).
3. **Report**: the table is printed by the CLI; ``comparison.csv``, ``comparison.json``, ``report.json`` and
   the static HTML page ``report.html`` go to the output folder.

Reruns are fast: the comparison's result is cached under ``<cache>/quickstart/<key>/comparison.json``, keyed
by everything it depends on (architecture, tasks, methods and their settings, samples, the experts' spec
hashes and the pretrained backbone's id, the mergelab version), so a second run with the same settings only
redraws the report (``force=True`` recomputes). A rebuilt expert or backbone changes the key.

``quick=True`` (tests, smoke runs): tiny budgets everywhere (the comparison's ``quick``); combine with
``tasks``, ``methods`` and ``zoo_overrides`` (e.g. fewer fine-tuning steps) for a run of seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab import __version__
from mergelab.atomic_files import write_text_atomic
from mergelab.errors import MergeLabError, SpecError
from mergelab.untrusted_input import read_json_file
from mergelab.experiments.comparison_rows import CATALOG, DEFAULT_METHODS, DEFAULT_TASKS, method_configs
from mergelab.experiments.comparison_table import ComparisonTable
from mergelab.output_paths import refuse_overlap
from mergelab.report.document import ReportDocument

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

DEFAULT_ARCH = "resnet_s"
DEFAULT_OUT = "mergelab-quickstart"
#: Per-row parameter overrides on top of :data:`mergelab.experiments.comparison_rows.CATALOG` for the quickstart. Empty:
#: with the catalog's full settings the quickstart took 5 min 54 s from an empty cache on 2 cores that other
#: jobs were also using (load average ~5), within the 10-minute budget; AdaMerging (500 steps, ~110 s) is the
#: costliest row, so ``{"adamerging": {"steps": 200}}`` is the first place to cut if it ever is not.
QUICKSTART_OVERRIDES: dict[str, dict[str, Any]] = {}
CACHE_FORMAT = 3  # 2: BN protocol, validation-chosen lambdas, invalid rows; 3: per-example outcomes (paired verdicts)


@dataclass
class QuickstartResult:
    """What the quickstart produced: the table, the document and where they were written."""

    table: ComparisonTable
    document: ReportDocument
    out_dir: Path
    html: Path
    report_json: Path
    comparison_cached: bool
    experts_trained: int
    timings: dict[str, float] = field(default_factory=dict)


def _settings(arch: str, tasks: Sequence[str], methods: Sequence[str] | None, samples_per_task: int, quick: bool,
              overrides: Mapping[str, Mapping[str, Any]], bn: str, select: str) -> dict[str, Any]:
    return {"arch": arch, "tasks": list(tasks), "methods": list(methods) if methods is not None else list(DEFAULT_METHODS),
            "samples_per_task": samples_per_task, "quick": quick,
            "overrides": {k: dict(v) for k, v in sorted(overrides.items())}, "bn": bn, "select": select, "isolate": False,
            "grids": {name: {k: list(v) for k, v in c.grid.items()} for name, c in CATALOG.items() if c.grid}}


def cache_key(settings: Mapping[str, Any], experts: Sequence[Any], pretrained_id: str) -> str:
    """Hash of the comparison's settings, the experts (task and spec hash) and the pretrained backbone."""
    payload = {"format": CACHE_FORMAT, "settings": dict(settings), "pretrained": pretrained_id,
               "experts": [[e.task, e.spec_hash] for e in experts], "mergelab": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cached(path: Path) -> ComparisonTable | None:
    try:
        return ComparisonTable.from_dict(read_json_file(path, what="cached comparison"))
    except FileNotFoundError:
        return None
    except (OSError, MergeLabError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable cached comparison %s: %s", path, exc)
        return None


def _check_names(tasks: Sequence[str], methods: Sequence[str] | None) -> None:
    # deferred: the task suite loads torch; this module is on the 'mergelab --help' path
    from mergelab.tasks import task_spec

    for t in tasks:
        task_spec(t)
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"tasks: a task is listed twice: {list(tasks)}")
    method_configs(methods)


def run_quickstart(
    out_dir: PathLike = DEFAULT_OUT,
    *,
    arch: str = DEFAULT_ARCH,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    samples_per_task: int = 100,
    quick: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    zoo_overrides: Mapping[str, Any] | None = None,
    bn: str | None = None,
    select: str = "validation",
    cache_dir: PathLike | None = None,
    workers: int = 2,
    force: bool = False,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Build or reuse the zoo, compare every method, write the report; see the module docstring.

    Args:
        out_dir: output folder (created): comparison.csv/json, report.json, report.html.
        arch: architecture. tasks: the task group (default the comparison's 4 tasks). methods: comparison
            rows (default all).
        samples_per_task: examples per task for data-informed methods.
        quick: tiny budgets (tests). overrides: ``{row: {param: value}}`` on top of
            :data:`QUICKSTART_OVERRIDES` (ignored for rows not compared).
        zoo_overrides: expert spec fields for the zoo's fine-tuning (default: the zoo's defaults).
        bn: BatchNorm protocol (default: joint for BatchNorm architectures, :mod:`mergelab.evaluation.protocol`).
        select: ``validation`` (lambda of TA/TIES/DARE on validation data) or ``fixed``.
        cache_dir: cache root. workers: fine-tuning processes. force: recompute the comparison even if cached.
        progress: progress bars. on_stage: called with a one-line message at the start of each step.
    """
    # deferred: the comparison, zoo and report load torch; this module is on the 'mergelab --help' path
    from mergelab.experiments.compare import run_comparison
    from mergelab.models.paths import cache_root
    from mergelab.models.pretraining import read_pretrained
    from mergelab.report.convert import comparison_document
    from mergelab.report.html import write_html
    from mergelab.training.zoo import build_zoo

    say = on_stage or (lambda msg: log.info("%s", msg))
    tasks = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
    if not tasks:
        raise SpecError("tasks: the quickstart needs at least one task")
    if workers < 1:
        raise SpecError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out}: exists and is not a folder; the quickstart writes its report into a folder")
    chosen = list(methods) if methods is not None else None
    _check_names(tasks, chosen)  # unknown tasks or methods fail now, not after the fine-tuning
    merged_overrides: dict[str, dict[str, Any]] = {}
    rows = set(chosen) if chosen is not None else None
    for name, params in {**QUICKSTART_OVERRIDES, **{k: dict(v) for k, v in (overrides or {}).items()}}.items():
        if rows is None or name in rows:
            merged_overrides[name] = {**QUICKSTART_OVERRIDES.get(name, {}), **dict(params)}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    say(f"[1/3] zoo: task data, pretrained {arch} and experts for {', '.join(tasks)} (reused when cached)")
    zoo = build_zoo(arch, tasks, cache_dir, workers=workers, overrides=zoo_overrides, progress=progress)
    timings["zoo_s"] = round(time.perf_counter() - t0, 2)
    if zoo.failures:
        raise SpecError("fine-tuning failed for " + "; ".join(f"{t}: {e}" for t, e in zoo.failures.items()))
    pre = read_pretrained(arch, cache_dir)
    if pre is None:  # pragma: no cover - build_zoo just made it
        raise SpecError(f"no pretrained {arch} backbone after building the zoo")
    refuse_overlap(out, [pre.path or None, *(e.path for e in zoo.experts)], what="--out", replaces=False)

    # deferred: torch (evaluation); this module is on the 'mergelab --help' path
    from mergelab.evaluation.protocol import resolve_bn

    settings = _settings(arch, tasks, chosen, samples_per_task, quick, merged_overrides, resolve_bn(bn, arch), select)
    key = cache_key(settings, zoo.experts, pre.pretrained_id)
    cached_path = cache_root(cache_dir) / "quickstart" / key / "comparison.json"
    t1 = time.perf_counter()
    table = None if force else _read_cached(cached_path)
    cached = table is not None
    if table is None:
        say(f"[2/3] comparison: merging {len(tasks)} experts with {len(settings['methods'])} methods and evaluating")
        table = run_comparison(arch, tasks, chosen, pool=[e.path for e in zoo.experts], samples_per_task=samples_per_task,
                               cache_dir=cache_dir, progress=progress, quick=quick, isolate=False,
                               overrides=merged_overrides, bn=settings["bn"], select=select)
        if not any(r.error for r in table.rows):  # a failed method is retried on the next run
            write_text_atomic(cached_path, json.dumps(table.to_dict(), indent=1, default=str) + "\n")
    else:
        say(f"[2/3] comparison: reusing {cached_path} (same settings and experts; --force recomputes)")
    timings["comparison_s"] = round(time.perf_counter() - t1, 2)

    t2 = time.perf_counter()
    say(f"[3/3] report: {out}")
    config = {"quickstart": {**settings, "zoo_overrides": dict(zoo_overrides or {}), "cache_key": key,
                             "comparison_cached": cached, "experts": [str(e.path) for e in zoo.experts],
                             "experts_trained": zoo.trained, "workers": workers},
              "lighter_than_compare_defaults": {k: v for k, v in merged_overrides.items() if k in QUICKSTART_OVERRIDES}}
    document = comparison_document(
        table, title=f"mergelab quickstart: {arch} on {len(tasks)} tasks", study="quickstart", config=config,
        summary=None)
    document = document.model_copy(update={"summary": (
        f"The quickstart fine-tuned (or reused) one {arch} expert per task for {', '.join(tasks)}, merged them with "
        f"every method and evaluated each merge on the tasks' test sets. {document.summary}"
        + (" Budgets of AdaMerging and surgery are lighter than `mergelab compare`'s (see the configuration)."
           if config["lighter_than_compare_defaults"] else "")
        + (" quick=True: tiny budgets, the numbers mean little." if quick else ""))})
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv")
    table.to_json(out / "comparison.json")
    report_json = document.to_json(out)
    html = write_html(document, out / "report.html")
    timings["report_s"] = round(time.perf_counter() - t2, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    return QuickstartResult(table, document, out, html, report_json, cached, zoo.trained, timings)


__all__ = ["DEFAULT_ARCH", "DEFAULT_OUT", "QUICKSTART_OVERRIDES", "QuickstartResult", "cache_key", "run_quickstart"]
