"""``mergelab quickstart``: the main job (see :mod:`mergelab.quickstart`).

Builds or reuses a small resnet_s zoo (4 tasks), merges it with every method, evaluates, prints the
comparison table and writes ``report.json`` and ``report.html`` to ``--out`` (default
``./mergelab-quickstart``).
"""

from __future__ import annotations

import argparse
import sys
import time

from mergelab.quickstart import DEFAULT_ARCH, DEFAULT_OUT, run_quickstart
from mergelab.runtime import prefer_passive_omp


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="main job: build/reuse a small zoo, merge a task group with every method, print the table, write an HTML report",
        description="Fine-tune (or reuse from the cache) one resnet_s expert per task of a 4-task group, merge them "
                    "with every method (data-free and data-informed) next to the pretrained, individual and "
                    "multi-task references, evaluate, print the comparison table and write report.json and "
                    "report.html. About 5-10 minutes on 2 cores from an empty cache, seconds when cached.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"architecture (default {DEFAULT_ARCH})")
    p.add_argument("--tasks", help="comma-separated task group (default mnist,mnist_rot90,digits,shapes)")
    p.add_argument("--methods", help="comma-separated comparison rows (default: all; see `mergelab compare --help`)")
    p.add_argument("--samples-per-task", type=int, default=100, help="examples per task for data-informed methods")
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere (smoke test; numbers mean little)")
    p.add_argument("--bn", choices=["joint", "per_task", "merged"], default=None,
                   help="BatchNorm protocol (default joint for BatchNorm architectures; see `mergelab compare --help`)")
    p.add_argument("--select", choices=["validation", "fixed"], default="validation",
                   help="lambda of TA/TIES/DARE chosen on validation data (default) or the no-validation defaults")
    p.add_argument("--force", action="store_true", help="recompute the comparison even if a cached result matches")
    p.add_argument("--workers", type=int, default=2, help="fine-tuning processes (default 2)")
    p.add_argument("--cache-dir", help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=run)


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def run(args: argparse.Namespace) -> int:
    prefer_passive_omp()  # before torch is imported (mergelab.runtime)

    start = time.perf_counter()

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    result = run_quickstart(
        args.out, arch=args.arch, tasks=_csv(args.tasks), methods=_csv(args.methods),
        samples_per_task=args.samples_per_task, quick=args.quick, cache_dir=args.cache_dir, workers=args.workers,
        force=args.force, progress=args.progress, on_stage=stage, bn=args.bn, select=args.select)
    # deferred: the converters (numpy, scipy) and the comparison; not on --help
    from mergelab.report.text import comparison_text

    print(comparison_text(result.table))
    print()
    print(f"report: {result.html}")
    print(f"        (document {result.report_json}; open the HTML file in a browser, it works offline)")
    print(f"took {result.timings['total_s']:.0f} s (zoo {result.timings['zoo_s']:.0f} s, comparison "
          f"{result.timings['comparison_s']:.0f} s{', cached' if result.comparison_cached else ''}, report "
          f"{result.timings['report_s']:.0f} s)")
    return 1 if any(r.error for r in result.table.rows) else 0
