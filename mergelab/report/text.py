"""Results as fixed-width text for the terminal: a method comparison (:func:`comparison_text`, with its paired
tests, :func:`paired_text`) and a pool-scaling run (:func:`pool_scaling_text`, with the paper's endpoints and
the verdicts on its claims). The report documents of the same results are :mod:`mergelab.report.convert`."""

from __future__ import annotations

import math
from collections.abc import Callable

from mergelab.experiments.comparison_table import ComparisonTable
from mergelab.experiments.paper_results import PAPER_TABLE3
from mergelab.experiments.pool_scaling import PoolScalingResult
from mergelab.report.convert import pool_scaling_verdicts


#: The smallest p a Monte Carlo randomization test can report is 1 / (draws + 1).
_FLOOR_NOTE = " (whose smallest possible value is 1 / (draws + 1))"


def _short(task: str, n: int = 12) -> str:
    return task if len(task) <= n else task[: n - 1] + "~"


def paired_text(table: ComparisonTable) -> str:
    """The paired block of :func:`comparison_text`: per merge and reference, the difference of average accuracy
    (points), its 95% interval, McNemar's p, the Holm-adjusted p and the verdict; "" without comparisons."""
    comps = table.paired_comparisons()
    if not comps:
        if table.rows and not any(r.per_task_correct for r in table.rows):
            return "paired tests: none (no per-example results in this table; re-run the comparison)"
        return ""
    mw = max([12] + [len(c.method) for c in comps])
    rw = max([9] + [len(c.reference) for c in comps])
    head = (f"{'method':<{mw}} {'vs':<{rw}} {'diff':>6} {'95% CI':>15} {'p':>9} {'p (Holm)':>9}  verdict")
    hows = sorted({c.test.method for c in comps})
    lines = [f"paired tests on the same test examples (difference of average accuracy in points; p: "
             f"{' or '.join(hows)}{_FLOOR_NOTE if any('randomization' in h for h in hows) else ''}; Holm-adjusted "
             f"over {len(comps)} comparisons; undecided: adjusted p >= 0.05)", head, "-" * len(head)]
    for c in comps:
        lo, hi = c.test.interval()
        ci = "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(f"{c.method:<{mw}} {c.reference:<{rw}} {100 * c.test.difference:+6.1f} {ci:>15} "
                     f"{c.test.p_value:9.2g} {c.p_adjusted:9.2g}  {c.label}")
    return "\n".join(lines)


def comparison_text(table: ComparisonTable) -> str:
    """A fixed-width text table: per-task accuracy (%), average, normalized (%), wall time, peak memory."""
    names = [_short(t) for t in table.tasks]
    widths = [max(6, len(n)) for n in names]
    mwidth = max([18] + [len(r.method) for r in table.rows])
    head = f"{'method':<{mwidth}} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    head += f" {'avg':>6} {'norm':>6} {'wall s':>8} {'peak MB':>8} {'+MB':>6}"
    lines = [f"{table.arch} on {len(table.tasks)} tasks: " + ", ".join(table.tasks), head, "-" * len(head)]
    if table.meta.get("protocol"):
        lines.insert(1, f"protocol: {table.meta['protocol']}")
    pct = lambda v, w=6: f"{'-':>{w}}" if v is None or not math.isfinite(v) else f"{100 * v:{w}.1f}"  # noqa: E731
    num = lambda v, w, d: f"{'-':>{w}}" if v is None or not math.isfinite(v) else f"{v:{w}.{d}f}"  # noqa: E731
    for r in table.rows:
        if r.error is not None:
            lines.append(f"{r.method:<{mwidth}} failed: {r.error}")
            continue
        if r.invalid is not None:
            lines.append(f"{r.method:<{mwidth}} INVALID: {r.invalid}")
            continue
        cells = " ".join(pct(r.per_task.get(t), w) for t, w in zip(table.tasks, widths))
        lines.append(f"{r.method:<{mwidth}} {cells} {pct(r.average)} {pct(r.normalized)} "
                     f"{num(r.wall_s, 8, 1)} {num(r.peak_mb, 8, 0)} {num(r.peak_mb - r.base_mb, 6, 0)}")
    chosen = [f"{r.method} {k} {v['chosen']}" for r in table.rows if r.error is None
              for k, v in (r.params.get("selected") or {}).items()]
    if chosen:
        lines.append("chosen on validation data: " + ", ".join(chosen))
    lines.append("accuracy and normalized accuracy in %; " + table.meta.get("memory_note", ""))
    if table.meta.get("wall_note"):
        lines.append(table.meta["wall_note"])
    paired = paired_text(table)
    if paired:
        lines.extend(["", paired])
    return "\n".join(lines)


def pool_scaling_text(result: PoolScalingResult) -> str:
    """Average accuracy (%) per method and pool size, normalized accuracy, wall time, and the paper's endpoints."""
    sizes = [n for n in result.sizes if n in result.tables]
    w = max(18, *(len(m) for m in result.methods))
    head = f"{'pool size':<{w}} " + " ".join(f"{n:>7}" for n in sizes)
    what = ("evaluated on " + ", ".join(result.eval_tasks[sizes[0]]) if result.mode == "irrelevant" and sizes
            else "evaluated on every task of the pool")
    lines = [f"pool scaling ({result.mode} experts join), {result.arch}, {what}"]

    def block(title: str, get: Callable[[str, int], float], fmt: Callable[[float], str]) -> None:
        lines.extend(["", title, head, "-" * len(head)])
        for m in result.methods:
            cells = []
            for n in sizes:
                try:
                    v = get(m, n)
                except KeyError:
                    v = math.nan
                cells.append(f"{'-':>7}" if not math.isfinite(v) else fmt(v))
            lines.append(f"{m:<{w}} " + " ".join(cells))

    block("average accuracy (%)", result.accuracy, lambda v: f"{100 * v:7.1f}")
    block("normalized accuracy (%)", result.normalized, lambda v: f"{100 * v:7.1f}")
    block("wall time (s)", lambda m, n: result.tables[n].row(m).wall_s, lambda v: f"{v:7.1f}")
    block("peak memory (MB)", lambda m, n: result.tables[n].row(m).peak_mb, lambda v: f"{v:7.0f}")
    paper = PAPER_TABLE3.get(result.mode, {})
    if paper:
        lines.extend(["", "FW-Merging paper, Table 3 (ViT-B/32, average accuracy %):"])
        for m, by_n in paper.items():
            lines.append(f"  {m}: " + ", ".join(f"{n} models {v:.1f}" for n, v in sorted(by_n.items())))
    failed = [(n, r.method, r.error) for n in sizes for r in result.tables[n].rows if r.error]
    for n, m, e in failed:
        lines.append(f"failed: {m} at {n}: {e}")

    verdicts = pool_scaling_verdicts(result)
    if verdicts:
        lines.extend(["", "the paper's claims, smallest vs largest pool (95% interval of the change; paired on the "
                          "same examples when both evaluate the same tasks):"])
        lines.extend(f"  [{v.mark}] {v.claim}: {v.measured}" for v in verdicts)
    return "\n".join(lines)


__all__ = ["comparison_text", "paired_text", "pool_scaling_text"]
