"""``mergelab results``: list and export rows of the results database.

``mergelab results [--db PATH] [--study S] [--kind K] [--status ST] [--where FIELD=VALUE ...] [--csv OUT]
[--limit N] [--columns C ...]`` prints a table of the matching rows (key prefix, kind, study, status and the
spec/metric fields that vary) and/or writes them all, flattened, to a CSV file. The default database is
``$MERGELAB_CACHE/results.sqlite`` (``~/.cache/mergelab/results.sqlite``).

``--where`` values are parsed as JSON when they can be (``lr=0.1`` is a number, ``nesterov=true`` a
boolean, ``task=digits`` a string); a field without a prefix is a spec field (``lr`` = ``spec.lr``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mergelab.errors import MergeLabError
from mergelab.experiments.store import ResultsStore, default_db_path, flat_columns, to_csv

#: Columns wider than this are cut in the table (the CSV keeps everything).
MAX_CELL = 24
#: At most this many spec and metric columns are shown when --columns is not given.
MAX_SPEC_COLUMNS = 6
MAX_METRIC_COLUMNS = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "results",
        help="list or export rows of the results database (fine-tunes, merges, evaluations)",
        description="Print the matching rows of the results database as a table and/or write them to CSV, "
                    "one column per spec/metrics/timings field (spec.lr, metrics.accuracy, ...).",
    )
    p.add_argument("--db", help="results database (default: $MERGELAB_CACHE/results.sqlite)")
    p.add_argument("--study", help="only rows of this study")
    p.add_argument("--kind", help="only rows of this kind (finetune, merge, evaluate, ...)")
    p.add_argument("--status", choices=["pending", "running", "done", "failed"], help="only rows with this status")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="only rows whose JSON field equals VALUE (repeatable); FIELD is spec.x, metrics.x, "
                        "timings.x, versions.x, or a bare spec field name")
    p.add_argument("--key", help="only rows whose key starts with this prefix")
    p.add_argument("--csv", metavar="OUT", help="write the matching rows (all fields) to this CSV file")
    p.add_argument("--limit", type=int, help="at most N rows")
    p.add_argument("--columns", nargs="+", metavar="C",
                   help="table columns (flattened names such as spec.lr metrics.accuracy timings.wall_s)")
    p.add_argument("--errors", action="store_true", help="print the error of each failed row after the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no table (with --csv: only write the file)")
    p.set_defaults(func=run_results)


def parse_where(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "task=digits"]`` -> ``{"lr": 0.1, "task": "digits"}`` (values parsed as JSON if possible)."""
    out: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise MergeLabError(f"--where expects FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[field.strip()] = value
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def default_columns(columns: list[str], flats: list[dict[str, Any]]) -> list[str]:
    """Key prefix, kind, study, status, the spec fields that differ between rows, the first metrics."""
    varying = [c for c in columns if c.startswith("spec.")
               and len({json.dumps(f.get(c), sort_keys=True, default=str) for f in flats}) > 1]
    if not varying:
        varying = [c for c in columns if c.startswith("spec.")]
    metrics = [c for c in columns if c.startswith("metrics.")]
    return ["key", "kind", "study", "status", *varying[:MAX_SPEC_COLUMNS], *metrics[:MAX_METRIC_COLUMNS]]


def format_table(columns: list[str], flats: list[dict[str, Any]]) -> str:
    header = [c if c != "key" else "key" for c in columns]
    body = [[(f.get(c) or "")[:12] if c == "key" else _cell(f.get(c)) for c in columns] for f in flats]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    numeric = [all(_is_number(f.get(c)) for f in flats if f.get(c) is not None) and c != "key" for c in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_results(args: argparse.Namespace) -> int:
    db = Path(args.db).expanduser() if args.db else default_db_path()
    if not db.exists():
        raise MergeLabError(f"no results database at {db} (use --db PATH, or set MERGELAB_CACHE)")
    if args.limit is not None and args.limit < 0:
        raise MergeLabError(f"--limit must be >= 0, got {args.limit}")
    with ResultsStore(db) as store:
        rows = store.query(study=args.study, kind=args.kind, status=args.status, where=parse_where(args.where),
                           key_prefix=args.key, limit=args.limit)
    if args.csv:
        out = to_csv(rows, args.csv)
        print(f"wrote {len(rows)} row(s) to {out}", file=sys.stderr)
    if args.quiet:
        return 0
    if not rows:
        print("no matching rows")
        return 0
    columns, flats = flat_columns(rows)
    shown = args.columns or default_columns(columns, flats)
    print(format_table(shown, flats))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(f"{len(rows)} row(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if args.errors:
        for r in rows:
            if r.error:
                print(f"\n{r.key[:12]} {r.kind} ({r.status}):\n{r.error}")
    return 0
