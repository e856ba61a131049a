"""Existing results as report documents: a method comparison and a pool-scaling run.

* :func:`comparison_sections` / :func:`comparison_document` turn a
  :class:`~mergelab.experiments.comparison_table.ComparisonTable` into sections: the accuracy table (per task, average,
  normalized, wall time, peak memory), a bar figure of average and normalized accuracy per method, a bar
  figure of per-task accuracy, a wall-time figure, the methods' settings, and three paper claims checked on
  the table (see :func:`comparison_verdicts`).
* :func:`pool_scaling_sections` / :func:`pool_scaling_document` turn a
  :class:`~mergelab.experiments.pool_scaling.PoolScalingResult` into a line figure of average accuracy against
  pool size per method with the FW-Merging paper's endpoints
  (:data:`mergelab.experiments.paper_results.PAPER_TABLE3`) as points, a normalized
  accuracy figure, tables, and the paper's claims as verdicts (:func:`pool_scaling_verdicts`).

Verdicts are statistical tests, printed with each verdict (:mod:`mergelab.analysis.statistics`). Method
rankings ("A beats B") use the **paired test on the same test examples**: the difference of task-averaged
accuracy with its 95% interval (paired, stratified by task) and McNemar's exact p-value, Holm-adjusted over all
the paired comparisons of one table (every merge against pretrained and task arithmetic,
:meth:`~mergelab.experiments.comparison_table.ComparisonTable.paired_comparisons`, also tabulated in the report); an
adjusted p >= 0.05 is *undecided*, as is a missing, failed or invalid row or one without per-example results
(tables written before they were kept). Pool-scaling claims compare one method at two pool sizes
(:func:`pool_scaling_verdicts`): paired on the same examples when both evaluate the same tasks, as independent
samples (:func:`~mergelab.analysis.statistics.accuracy_difference`) when they do not.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mergelab.analysis.statistics import ALPHA, Estimate, accuracy_difference, paired_accuracy_test
from mergelab.experiments.comparison_rows import PAIRED_REFERENCES
from mergelab.experiments.paper_results import PAPER_TABLE3
from mergelab.report.document import Figure, ReportDocument, Section, Series, Table, Verdict, versions

if TYPE_CHECKING:
    from mergelab.experiments.comparison_table import ComparisonTable
    from mergelab.experiments.pool_scaling import PoolScalingResult

#: Largest fall of FW-soft's accuracy (absolute) still called "flat" when irrelevant experts join.
FLAT_TOLERANCE = 0.02


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _pct(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else 100.0 * v


def _fin(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------- comparison


def _ok_rows(table: ComparisonTable) -> list[Any]:
    """Rows that ran and are valid models (failed and invalid rows are never drawn or compared)."""
    return [r for r in table.rows if r.usable]


def _average(table: ComparisonTable, method: str) -> float | None:
    for r in table.rows:
        if r.method == method and r.usable and math.isfinite(r.average):
            return float(r.average)
    return None


def _why_missing(table: ComparisonTable, method: str) -> str:
    for r in table.rows:
        if r.method == method:
            return f"{method} failed" if r.error is not None else f"{method} invalid ({r.invalid})"
    return f"{method} not measured"


def protocol_note(meta: Mapping[str, Any]) -> str:
    """The evaluation protocol sentence of a comparison (BN statistics, heads, how scales were chosen)."""
    parts = []
    if meta.get("protocol"):
        parts.append(f"Protocol: {meta['protocol']}.")
    if meta.get("select") == "validation":
        parts.append("lambda of task arithmetic, TIES and DARE chosen on the validation split of the training data.")
    elif meta.get("select") == "fixed":
        parts.append("lambda fixed at the papers' no-validation defaults.")
    return " ".join(parts)


def _ranking(claim: str, predicted: str, a_name: str, b_name: str, source: str, table: ComparisonTable,
             comparison: Any) -> Verdict:
    """Verdict for "``a`` is more accurate than ``b``" from the table's paired comparison of the two
    (:meth:`~mergelab.experiments.comparison_table.ComparisonTable.paired_comparisons`; undecided when missing, failed,
    invalid, without per-example results, or not significant after Holm's adjustment over the table's
    comparisons)."""
    protocol = f" {protocol_note(table.meta)}"
    a, b = _average(table, a_name), _average(table, b_name)
    if a is None or b is None:
        missing = [_why_missing(table, n) for n, v in ((a_name, a), (b_name, b)) if v is None]
        return Verdict(claim=claim, predicted=predicted, measured=", ".join(missing),
                       agrees=None, detail=source + protocol)
    head = f"{a_name} {_fmt_pct(a)} vs {b_name} {_fmt_pct(b)} ({100 * (a - b):+.1f} points)"
    if comparison is None:
        return Verdict(claim=claim, predicted=predicted,
                       measured=f"{head}; no per-example results to test the difference (re-run the comparison)",
                       agrees=None, detail=source + protocol)
    return Verdict(claim=claim, predicted=predicted,
                   measured=f"{head}; {comparison.test.describe()}; Holm-adjusted p = {comparison.p_adjusted:.3g}",
                   agrees=comparison.verdict,
                   detail=f"{source} Paired test on the same test examples (mergelab.analysis.statistics): the "
                          f"difference of task-averaged accuracy with its 95% interval (stratified by task) and "
                          f"McNemar's exact p-value, Holm-adjusted over this table's {comparison.family} paired "
                          f"comparison(s); adjusted p >= {ALPHA:g} is undecided.{protocol}")


#: The papers' ranking claims checked on a comparison: (row, claim, predicted, source); each against task arithmetic.
RANKING_CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("ties", "TIES beats task arithmetic", "higher accuracy (trim + sign consensus shrink the task-heterogeneity "
     "term)", "Stability paper, Corollary 1; Yadav et al. 2023."),
    ("dare", "DARE beats task arithmetic", "higher accuracy (random drop + rescale shrinks the task-heterogeneity "
     "term)", "Stability paper, Corollary 1; Yu et al. 2024."),
    ("adamerging", "AdaMerging beats task arithmetic", "higher accuracy (learned layer-wise coefficients)",
     "Yang et al. 2024 (ICLR)."),
    ("fw_soft", "FW-soft beats task arithmetic", "higher accuracy (Frank-Wolfe over the pool's hull)",
     "Chen et al. 2025 (ICCV)."),
)


def comparison_verdicts(table: ComparisonTable) -> list[Verdict]:
    """Paper claims about method rankings (:data:`RANKING_CLAIMS`), each the table's paired test against task
    arithmetic on the same test examples, Holm-adjusted over all the table's paired comparisons (module
    docstring).

    * TIES and DARE beat task arithmetic: sparsification / sign consensus shrinks the heterogeneity term
      (stability paper, Corollary 1; Yadav et al. 2023; Yu et al. 2024).
    * AdaMerging beats task arithmetic (Yang et al. 2024).
    * FW-soft beats task arithmetic (Chen et al. 2025).

    Only claims whose rows were compared are returned.
    """
    names = {r.method for r in table.rows}
    if "task_arithmetic" not in names:
        return []
    by_pair = {(c.method, c.reference): c for c in table.paired_comparisons()}
    return [_ranking(claim, predicted, row, "task_arithmetic", source, table, by_pair.get((row, "task_arithmetic")))
            for row, claim, predicted, source in RANKING_CLAIMS if row in names]


def comparison_sections(table: ComparisonTable, prefix: str = "compare") -> list[Section]:
    """Sections of a comparison: accuracy table and figures, costs, settings, paper claims.

    ``prefix`` starts every figure id (figure ids are unique within a document).
    """

    rows = table.rows
    ok = _ok_rows(table)
    methods = [r.method for r in ok]
    acc_cols = ["method", *[f"{t} (%)" for t in table.tasks], "average (%)", "normalized (%)", "wall (s)",
                "peak memory (MB)", "error"]
    acc_rows = []
    for r in rows:
        if r.error is not None:
            acc_rows.append([r.method, *[None] * (len(table.tasks) + 4), r.error])
            continue
        if r.invalid is not None:
            acc_rows.append([r.method, *[None] * (len(table.tasks) + 4), f"invalid: {r.invalid}"])
            continue
        acc_rows.append([r.method, *[_pct(r.per_task.get(t)) for t in table.tasks], _pct(r.average),
                         _pct(r.normalized), _fin(r.wall_s), _fin(r.peak_mb), None])
    notes = " ".join(n for n in (table.meta.get("memory_note", ""), table.meta.get("wall_note", "")) if n)
    accuracy = Table(title=f"{table.arch}: accuracy per method on {len(table.tasks)} tasks", columns=acc_cols,
                     rows=acc_rows, digits=1,
                     caption="Test accuracy through each task's expert head; normalized = mean over tasks of "
                             f"merged / expert accuracy. {protocol_note(table.meta)} Invalid rows (non-finite "
                             f"logits) have no accuracy. {notes}".strip())
    comps = table.paired_comparisons()
    paired = Table(
        title="Paired tests on the same test examples", digits=2,
        columns=["method", "against", "difference (points)", "95% CI low", "95% CI high", "p (McNemar)",
                 "p (Holm)", "verdict"],
        rows=[[c.method, c.reference, 100 * c.test.difference, *(100 * v for v in c.test.interval()),
               f"{c.test.p_value:.3g}", f"{c.p_adjusted:.3g}", c.label] for c in comps],
        caption=f"Every merge against {' and '.join(PAIRED_REFERENCES)} on the same examples: the difference of "
                "task-averaged accuracy with its 95% interval (stratified by task), McNemar's exact p-value on the "
                "discordant examples (a stratified randomization test when tasks differ in size), Holm-adjusted "
                f"over the table's {len(comps)} comparisons; undecided unless the adjusted p < 0.05.") if comps else None
    main_fig = Figure(
        id=f"{prefix}-accuracy", title="Average and normalized accuracy per method", xlabel="method",
        ylabel="accuracy (%)", kind="bar",
        series=[Series(label="average accuracy", x=methods, y=[_pct(r.average) for r in ok]),
                Series(label="normalized accuracy", x=methods, y=[_pct(r.normalized) for r in ok])],
        caption="Failed methods have no bars (see the table)." if len(ok) < len(rows) else "") if methods else None
    per_task_fig = Figure(
        id=f"{prefix}-per-task", title="Accuracy per task and method", xlabel="method", ylabel="accuracy (%)",
        kind="bar", series=[Series(label=t, x=methods, y=[_pct(r.per_task.get(t)) for r in ok])
                            for t in table.tasks]) if methods else None
    timed = [r for r in ok if math.isfinite(r.wall_s) and r.wall_s > 0]
    wall_fig = Figure(
        id=f"{prefix}-wall", title="Wall time per method", xlabel="method", ylabel="seconds (log scale)",
        kind="bar", yscale="log",
        series=[Series(label="wall time", x=[r.method for r in timed], y=[r.wall_s for r in timed])],
        caption=table.meta.get("wall_note", "")) if timed else None
    sources = table.meta.get("sources", {}) or {}
    settings = Table(
        title="Settings per method", columns=["row", "mergelab method", "parameters", "source"],
        rows=[[r.method, r.params.get("method") if isinstance(r.params.get("method"), str) else None,
               _jsonable({k: v for k, v in r.params.items() if k not in ("experts", "method")}),
               sources.get(r.method, "")] for r in rows])
    sections = [
        Section(title=f"Method comparison ({table.arch}: {', '.join(table.tasks)})",
                text=f"Every method merges the same pool of {len(table.meta.get('pool', [])) or len(table.tasks)} "
                     "experts; each merged backbone is evaluated on each task's test set through that task's expert "
                     "head. 'pretrained' is the floor, 'individual' (each expert on its own task) the ceiling. "
                     + protocol_note(table.meta),
                figures=[f for f in (main_fig, per_task_fig) if f is not None],
                tables=[accuracy] + ([paired] if paired is not None else [])),
        Section(title="Cost and settings", figures=[wall_fig] if wall_fig else [], tables=[settings]),
    ]
    verdicts = comparison_verdicts(table)
    if verdicts:
        sections.append(Section(title="Paper claims on this comparison",
                                text="Rankings the papers report, each a paired test on the same test examples "
                                     "(McNemar's exact p-value, Holm-adjusted; undecided when not significant).",
                                verdicts=verdicts))
    return sections


def comparison_document(table: ComparisonTable, *, title: str | None = None, study: str = "comparison",
                        summary: str | None = None, config: Mapping[str, Any] | None = None) -> ReportDocument:
    """A report document holding :func:`comparison_sections` (config: the table's settings and ``config``)."""
    ok = _ok_rows(table)
    merges = [r for r in ok if r.method not in ("pretrained", "individual", "multitask")]
    best = max(merges, key=lambda r: r.average if math.isfinite(r.average) else -1.0, default=None)
    auto = (f"{len(table.rows)} rows on {table.arch} ({', '.join(table.tasks)})."
            + (f" Best merge by average accuracy: {best.method} ({_fmt_pct(best.average)}, normalized "
               f"{_fmt_pct(best.normalized)})." if best is not None else ""))
    failed = [r.method for r in table.rows if r.error is not None]
    if failed:
        auto += f" Failed: {', '.join(failed)}."
    invalid = [r.method for r in table.rows if r.error is None and r.invalid is not None]
    if invalid:
        auto += f" Invalid (non-finite, not compared): {', '.join(invalid)}."
    note = protocol_note(table.meta)
    if note:
        auto += " " + note
    cfg = {"arch": table.arch, "tasks": list(table.tasks), "methods": [r.method for r in table.rows],
           **{k: v for k, v in table.meta.items() if k not in ("memory_note", "wall_note", "sources")},
           **dict(config or {})}
    return ReportDocument(title=title or f"Method comparison: {table.arch} on {len(table.tasks)} tasks", study=study,
                          summary=summary if summary is not None else auto, config=_jsonable(cfg),
                          sections=comparison_sections(table), created=_now(), versions=versions())


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


# -------------------------------------------------------------------------------------- pool scaling


def _pool_value(result: PoolScalingResult, method: str, n: int, what: str = "average") -> float | None:
    table = result.tables.get(n)
    if table is None:
        return None
    try:
        row = table.row(method)
    except KeyError:
        return None
    if not row.usable:
        return None
    v = getattr(row, what)
    return float(v) if math.isfinite(v) else None


def _pool_outcomes(result: PoolScalingResult, method: str, n: int) -> dict[str, Any] | None:
    table = result.tables.get(n)
    row = next((r for r in table.rows if r.method == method and r.usable), None) if table is not None else None
    return row.outcomes() if row is not None else None


def _pool_change(result: PoolScalingResult, method: str, n0: int, n1: int) -> tuple[Any, str] | None:
    """The change of ``method``'s task-averaged accuracy from pool size ``n0`` to ``n1`` as an
    :class:`~mergelab.analysis.statistics.Estimate` and how it was tested; None without per-example results.
    Paired on the same examples when both sizes evaluate the same tasks, else independent samples."""
    o0, o1 = _pool_outcomes(result, method, n0), _pool_outcomes(result, method, n1)
    if o0 is None or o1 is None:
        return None
    if set(o0) == set(o1) and all(o0[t].shape == o1[t].shape for t in o0):
        t = paired_accuracy_test(o1, o0)
        return Estimate(t.difference, t.se), f"paired on the same examples, {t.method} p = {t.p_value:.3g}"
    return accuracy_difference(o1, o0), "different evaluated tasks: independent samples (conservative)"


def pool_scaling_verdicts(result: PoolScalingResult) -> list[Verdict]:
    """The FW-Merging paper's pool-scaling claims, checked between the smallest and largest pool measured, each
    on the 95% interval of the change in task-averaged accuracy (:func:`_pool_change`; undecided when it
    contains 0 or per-example results are missing).

    * irrelevant experts join: task arithmetic falls (paper 70.3 -> 21.2): the interval lies below 0; FW-soft
      stays flat (74.1 -> 74.2): agrees when the interval lies above ``-FLAT_TOLERANCE`` (it falls by less than
      :data:`FLAT_TOLERANCE`), disagrees when it lies below.
    * relevant experts join: FW-soft rises (59.2 -> 68.3): the interval lies above 0.
    """
    sizes = sorted(n for n in result.sizes if n in result.tables)
    paper = PAPER_TABLE3.get(result.mode, {})

    def ends(method: str) -> tuple[int, float | None, int, float | None] | None:
        if len(sizes) < 2 or method not in result.methods:
            return None
        return sizes[0], _pool_value(result, method, sizes[0]), sizes[-1], _pool_value(result, method, sizes[-1])

    def paper_text(method: str) -> str:
        p = paper.get(method, {})
        return " -> ".join(f"{v:.1f}% ({n} models)" for n, v in sorted(p.items()))

    def check(e: tuple[int, float | None, int, float | None], method: str,
              rule: Callable[[float, float], bool | None]) -> tuple[str, bool | None]:
        """The measured text and verdict of ``rule(low, high)`` on the change's 95% interval."""
        n0, a0, n1, a1 = e
        text = f"{_fmt_pct(a0)} ({n0} experts) -> {_fmt_pct(a1)} ({n1} experts)"
        if a0 is None or a1 is None:
            return text, None
        change = _pool_change(result, method, n0, n1)
        if change is None:
            return text + "; no per-example results to test the change", None
        est, how = change
        lo, hi = est.interval()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return text + f"; change {100 * est.value:+.1f} points, no interval", None
        return (text + f"; change {100 * est.value:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}; {how})",
                rule(lo, hi))

    out: list[Verdict] = []
    note = "FW-Merging paper Table 3 (ViT-B/32 CLIP experts; this run: {arch}, smallest vs largest pool)."
    src = note.format(arch=result.arch)
    if result.mode == "irrelevant":
        e = ends("task_arithmetic")
        if e is not None:
            measured, agrees = check(e, "task_arithmetic", lambda lo, hi: True if hi < 0 else (False if lo > 0 else None))
            out.append(Verdict(claim="Task arithmetic falls as irrelevant experts join",
                               predicted=f"falls: {paper_text('task_arithmetic')}", measured=measured,
                               agrees=agrees, detail=f"{src} Falls: the 95% interval of the change lies below 0."))
        e = ends("fw_soft")
        if e is not None:
            measured, agrees = check(e, "fw_soft", lambda lo, hi: True if lo > -FLAT_TOLERANCE
                                     else (False if hi < -FLAT_TOLERANCE else None))
            out.append(Verdict(claim="FW-soft stays flat as irrelevant experts join",
                               predicted=f"flat: {paper_text('fw_soft')}", measured=measured, agrees=agrees,
                               detail=f"{src} Flat: the 95% interval of the change lies above -"
                                      f"{100 * FLAT_TOLERANCE:.0f} points (disagrees when it lies below)."))
    else:
        e = ends("fw_soft")
        if e is not None:
            measured, agrees = check(e, "fw_soft", lambda lo, hi: True if lo > 0 else (False if hi < 0 else None))
            out.append(Verdict(claim="FW-soft improves as relevant experts join",
                               predicted=f"rises: {paper_text('fw_soft')}", measured=measured, agrees=agrees,
                               detail=f"{src} The evaluated tasks grow with the pool here, as in the paper; rises: "
                                      f"the 95% interval of the change lies above 0."))
    return out


def pool_scaling_sections(result: PoolScalingResult, prefix: str | None = None) -> list[Section]:
    """Sections of a pool-scaling run (one mode): figures, tables and the paper's claims as verdicts."""
    prefix = prefix or f"pool-{result.mode}"
    sizes = sorted(n for n in result.sizes if n in result.tables)
    paper = PAPER_TABLE3.get(result.mode, {})
    acc_series = [Series(label=m, x=list(sizes), y=[_pct(_pool_value(result, m, n)) for n in sizes])
                  for m in result.methods]
    acc_series += [Series(label=f"paper: {m}", x=sorted(p), y=[p[n] for n in sorted(p)], style="points")
                   for m, p in paper.items()]
    what = ("the 4 evaluated tasks stay fixed while experts of other tasks join" if result.mode == "irrelevant"
            else "each pool is evaluated on all of its tasks")
    fig_acc = Figure(id=f"{prefix}-accuracy", title=f"Average accuracy vs pool size ({result.mode} experts join)",
                     xlabel="experts in the pool", ylabel="average accuracy (%)", series=acc_series,
                     caption=f"{result.arch}: {what}. Diamonds: the FW-Merging paper's endpoints (Table 3, ViT-B/32 "
                             "CLIP experts on other tasks: compare shapes, not levels).")
    fig_norm = Figure(id=f"{prefix}-normalized", title=f"Normalized accuracy vs pool size ({result.mode})",
                      xlabel="experts in the pool", ylabel="normalized accuracy (%)",
                      series=[Series(label=m, x=list(sizes), y=[_pct(_pool_value(result, m, n, "normalized"))
                                                                for n in sizes]) for m in result.methods])
    rows: list[list[Any]] = [[m, *[_pct(_pool_value(result, m, n)) for n in sizes]] for m in result.methods]
    rows += [[f"paper: {m}", *[p.get(n) for n in sizes]] for m, p in paper.items()]
    acc_table = Table(title=f"Average accuracy (%) by pool size ({result.mode})",
                      columns=["method", *[f"{n} experts" for n in sizes]], rows=rows, digits=1,
                      caption="Paper rows: FW-Merging Table 3 endpoints (ViT-B/32).")
    cost = Table(title=f"Wall time (s) by pool size ({result.mode})", columns=["method", *[f"{n} experts" for n in sizes]],
                 rows=[[m, *[_pool_value(result, m, n, "wall_s") for n in sizes]] for m in result.methods], digits=1)
    pools = Table(title="Pools", columns=["experts", "pool tasks", "evaluated tasks"],
                  rows=[[n, ", ".join(result.pools[n]), ", ".join(result.eval_tasks[n])] for n in sizes])
    failed = [f"{r.method} at {n}: {r.error}" for n in sizes for r in result.tables[n].rows if r.error]
    text = (f"Pool scaling with {result.mode} experts on {result.arch}: {what}."
            + (" Failed: " + "; ".join(failed) if failed else ""))
    return [Section(title=f"Pool scaling: {result.mode} experts join", text=text, figures=[fig_acc, fig_norm],
                    tables=[acc_table, cost, pools], verdicts=pool_scaling_verdicts(result))]


def pool_scaling_document(result: PoolScalingResult, *, title: str | None = None,
                          config: Mapping[str, Any] | None = None) -> ReportDocument:
    """A report document (study ``pool_scaling``) holding :func:`pool_scaling_sections`."""
    cfg = {"mode": result.mode, "arch": result.arch, "sizes": list(result.sizes), "methods": list(result.methods),
           **dict(result.meta), **dict(config or {})}
    return ReportDocument(title=title or "Pool scaling (FW-Merging Table 3)", study="pool_scaling",
                          summary="Accuracy of merging methods as the pool of experts grows, against the FW-Merging "
                                  "paper's claims.",
                          config={result.mode: _jsonable(cfg)}, sections=pool_scaling_sections(result), created=_now(),
                          versions=versions())


def merge_pool_scaling_documents(old: ReportDocument | None, new: ReportDocument) -> ReportDocument:
    """``new`` plus the sections and config of ``old``'s *other* pool-scaling modes (one report per folder)."""
    if old is None or old.study != "pool_scaling":
        return new
    modes = set(new.config)
    kept = [s for s in old.sections if not any(s.title.startswith(f"Pool scaling: {m} ") for m in modes)]
    config = {**{k: v for k, v in old.config.items() if k not in modes}, **new.config}
    ids = {f.id for s in new.sections for f in s.figures}
    kept = [s for s in kept if not ({f.id for f in s.figures} & ids)]
    return new.model_copy(update={"sections": kept + list(new.sections), "config": config})


__all__ = ["FLAT_TOLERANCE", "RANKING_CLAIMS", "comparison_document", "comparison_sections", "comparison_verdicts",
           "merge_pool_scaling_documents", "pool_scaling_document", "pool_scaling_sections", "pool_scaling_verdicts"]
