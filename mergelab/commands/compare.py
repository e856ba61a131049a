"""``mergelab compare``: every merging method against pretrained, individual experts and multi-task learning.

* ``mergelab compare --arch resnet_s --tasks a,b,c,d [--methods m1,m2] [--out DIR] [--quick]`` prints the
  comparison table (per-task accuracy, average, normalized accuracy, wall time, peak memory) and, with
  ``--out``, writes ``comparison.csv``, ``comparison.json`` and the report document ``report.json`` there
  (``mergelab report DIR`` draws it; the merged models are kept in ``DIR/merged``).
* ``mergelab compare --pool-scaling irrelevant|relevant [--sizes 4,8,12,16,20]`` runs the FW-Merging pool
  scaling protocol (:mod:`mergelab.experiments.pool_scaling`) and writes ``pool_scaling_<mode>.csv/json`` and
  ``report.json`` (holding both modes when both were run into the same folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mergelab.errors import SpecError
from mergelab.experiments.comparison_rows import CATALOG, DEFAULT_TASKS
from mergelab.report.document import REPORT_FILENAME, ReportDocument
from mergelab.runtime import prefer_passive_omp


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _sizes(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes expects comma-separated integers, got {text!r}") from None


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, param = key.partition(".")
        if not sep or not dot or not method or not param:
            raise SpecError(f"--set expects METHOD.PARAM=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(method, {})[param] = value
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare merging methods with pretrained, individual experts and multi-task learning on a task group",
        description="Merge the zoo's experts for a task group with every method (or --methods), evaluate each "
                    "merge with the experts' heads, and print per-task accuracy, average, normalized accuracy, "
                    "wall time and peak memory (each method in a fresh process). --pool-scaling runs the "
                    "FW-Merging pool-scaling protocol instead.",
    )
    p.add_argument("--arch", default="resnet_s", help="architecture of the zoo (default resnet_s)")
    p.add_argument("--tasks", help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)}); with "
                   "--pool-scaling irrelevant: the evaluated group; relevant: the order in which experts join")
    p.add_argument("--methods", help="comma-separated rows (default: all): " + ", ".join(CATALOG)
                   + "; any other registered method name runs with its defaults")
    p.add_argument("--pool", nargs="+", metavar="EXPERT", help="expert folders to merge instead of the zoo's "
                   "default experts (may hold more experts than --tasks)")
    p.add_argument("--samples-per-task", type=int, default=100,
                   help="examples per task for data-informed methods (default 100, the FW-Merging paper's)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                   help="override a method's parameter, e.g. --set task_arithmetic.lambda=0.4 (repeatable)")
    p.add_argument("--out", help="folder for the CSV/JSON results (and the merged models)")
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere (smoke tests, CI)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", default=None,
                   help="run methods in this process (faster; peak memory then includes what it already holds)")
    p.add_argument("--bn", choices=["joint", "per_task", "merged"], default=None,
                   help="BatchNorm protocol of the pretrained row and every merge: joint (default for BatchNorm "
                        "architectures: statistics re-estimated on the group's unlabelled training images), "
                        "per_task (re-estimated per task) or merged (kept as merged)")
    p.add_argument("--reset-bn", dest="bn", action="store_const", const="joint", help="same as --bn joint")
    p.add_argument("--select", choices=["validation", "fixed"], default="validation",
                   help="choose lambda of task arithmetic, TIES and DARE on the validation split of the training "
                        "data (default; never the test split) or use the papers' no-validation defaults (fixed)")
    p.add_argument("--pool-scaling", choices=["irrelevant", "relevant"],
                   help="run the pool-scaling protocol (FW-Merging Table 3) instead of one comparison")
    p.add_argument("--sizes", type=_sizes, default=None, help="pool sizes for --pool-scaling (default 4,8,12,16,20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order in which experts join (--pool-scaling)")
    p.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (also in each method's process)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)
    if args.threads:
        # deferred: torch, only when the command runs; not on --help
        import torch

        torch.set_num_threads(max(1, args.threads))
    overrides = _overrides(args.set)
    out = Path(args.out) if args.out else None
    if args.pool_scaling:
        return _run_pool_scaling(args, overrides, out)
    if args.sizes is not None:
        raise SpecError("--sizes is for --pool-scaling")
    # deferred: the comparison and merge engine (tqdm, yaml); not on --help
    from mergelab.experiments.compare import run_comparison

    table = run_comparison(
        args.arch, _csv_list(args.tasks), _csv_list(args.methods), pool=args.pool,
        samples_per_task=args.samples_per_task, cache_dir=args.cache_dir,
        workdir=None if out is None else out / "merged", progress=args.progress, quick=args.quick,
        isolate=args.isolate, overrides=overrides, bn=args.bn, select=args.select)
    # deferred: the converters (numpy, scipy) and the comparison; not on --help
    from mergelab.report.convert import comparison_document
    from mergelab.report.text import comparison_text

    print(comparison_text(table))
    if out is not None:
        csv_path = table.to_csv(out / "comparison.csv")
        json_path = table.to_json(out / "comparison.json")
        doc_path = comparison_document(table, config={"overrides": overrides}).to_json(out)
        print(f"wrote {csv_path}, {json_path} and {doc_path} (draw it with `mergelab report {out}`)")
    return 1 if any(r.error for r in table.rows) else 0


def _run_pool_scaling(args: argparse.Namespace, overrides: dict[str, dict[str, Any]], out: Path | None) -> int:
    # deferred: the comparison and merge engine (tqdm, yaml); not on --help
    from mergelab.experiments.pool_scaling import DEFAULT_SIZES, run_pool_scaling

    if args.pool:
        raise SpecError("--pool-scaling builds its pools from the zoo; --pool is not used with it")
    mode = args.pool_scaling

    def save_partial(n: int, table: Any) -> None:
        if out is not None:
            table.to_json(out / f"pool_scaling_{mode}_{n}.json")

    result = run_pool_scaling(
        mode, args.arch, tasks=_csv_list(args.tasks), sizes=args.sizes or DEFAULT_SIZES,
        methods=_csv_list(args.methods), samples_per_task=args.samples_per_task, cache_dir=args.cache_dir,
        workdir=None if out is None else out / "merged", progress=args.progress, quick=args.quick, seed=args.seed,
        isolate=args.isolate, overrides=overrides, bn=args.bn, select=args.select,
        on_table=save_partial)
    # deferred: the converters (numpy, scipy) and the comparison; not on --help
    from mergelab.report.text import pool_scaling_text

    print(pool_scaling_text(result))
    if out is not None:
        csv_path = result.to_csv(out / f"pool_scaling_{mode}.csv")
        json_path = result.to_json(out / f"pool_scaling_{mode}.json")
        doc_path = _write_pool_scaling_report(result, out)
        print(f"wrote {csv_path}, {json_path} and {doc_path} (draw it with `mergelab report {out}`)")
    return 1 if any(r.error for t in result.tables.values() for r in t.rows) else 0


def _write_pool_scaling_report(result: Any, out: Path) -> Path:
    """Write ``out/report.json``: this mode's sections, keeping another mode's from an earlier run there."""
    # deferred: numpy and scipy (statistics); not on --help
    from mergelab.report.convert import merge_pool_scaling_documents, pool_scaling_document

    old = None
    if (out / REPORT_FILENAME).is_file():
        try:
            old = ReportDocument.from_json(out)
        except SpecError:  # an unreadable earlier document is replaced
            old = None
    return merge_pool_scaling_documents(old, pool_scaling_document(result)).to_json(out)
