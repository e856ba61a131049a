"""The pool-diagnostics sections of the mergeability report (``mergelab analyze``) and its terminal summary.

:func:`diagnostics_report` adds the sections ``diagnostics``, ``operators`` and ``expected_ranking`` (Markdown
tables, JSON data, ``layers.csv``, and the cosine / conflict / dispersion plots) to a
:class:`mergelab.report.folder.Report`, the one report document written as report.json + report.md + PNGs;
further analyses (:mod:`mergelab.analysis.pool_report`) add theirs.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergelab.analysis.diagnostics import OPERATORS, PoolDiagnostics, to_jsonable
from mergelab.report.figure_text import literal
from mergelab.report.folder import Drawing, Report, ReportPaths
from mergelab.report.markdown import fmt, markdown_table, pct

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure as MplFigure

# ---------------------------------------------------------------------------------------- formatting


def short_labels(paths: Sequence[str]) -> list[str]:
    """Short, unique display names for checkpoint paths: the folder name for ``model*.safetensors``-style
    files inside a folder, else the file or folder name without extension."""
    out = []
    for p in paths:
        path = Path(p)
        generic = path.suffix in (".safetensors", ".bin", ".pt", ".pth") and path.stem.split("-")[0] in (
            "model", "pytorch_model", "diffusion_pytorch_model"
        )
        name = path.parent.name if generic and path.parent.name else (path.stem if path.suffix else path.name)
        out.append(name or str(p))
    seen: dict[str, int] = {}
    for name in out:
        seen[name] = seen.get(name, 0) + 1
    return [f"{i + 1}:{name}" if seen[name] > 1 else name for i, name in enumerate(out)]


# ---------------------------------------------------------------------------------- the diagnostics


_DISCLAIMER = (
    "Notes on reading these numbers. Dispersion is D = sum_i ||tau_i - mean_j tau_j||^2 (unweighted mean); "
    "Delta_T = D - D_T is the empirical reduction of Corollary 1 (THEORY.md, section 1). Only the sign-consensus "
    "step is guaranteed not to increase D (coordinate by coordinate, whatever sign is elected); magnitude trimming "
    "alone can increase it (two agreeing experts trimmed to disjoint supports), and DARE's 1/density rescale "
    "increases it in expectation by (1/d - 1)(1 - 1/N) sum_i ||tau_i||^2. A negative Delta_T is therefore a "
    "measurement, not an error. The pool sign-conflict rate grows with N by chance alone (chance level "
    "1 - 2^(1-k) for k nonzero experts); the pairwise rate has chance level 0.5."
)


def _key_figures(diag: PoolDiagnostics) -> str:
    t = diag.total
    norms = t.norms
    rows = [
        ["experts (N)", diag.n_experts],
        ["tensors analysed / skipped (integer or empty)", f"{len(diag.layers)} / {len(diag.skipped)}"],
        ["coordinates per expert", t.numel],
        ["task-vector norm ||tau_i|| (min / max)", f"{fmt(float(norms.min()))} / {fmt(float(norms.max()))}"],
        ["mean pairwise cosine", t.mean_cosine()],
        ["mean pairwise sign conflict (chance 0.5)", pct(t.mean_pairwise_conflict())],
        ["pool sign conflict (chance for this support)",
         f"{pct(t.pool_conflict_rate)} ({pct(t.pool_conflict_chance)})"],
        ["dispersion D", t.dispersion],
        ["normalised dispersion D / sum_i ||tau_i||^2", t.normalized_dispersion],
    ]
    return markdown_table(["figure", "value"], rows)


def _experts_table(diag: PoolDiagnostics, labels: Sequence[str]) -> str:
    t = diag.total
    changed = t.changed / t.numel if t.numel else np.full(diag.n_experts, np.nan)
    rows = [
        [labels[i], diag.weights[i], float(t.norms[i]), pct(float(changed[i])), diag.experts[i]]
        for i in range(diag.n_experts)
    ]
    return markdown_table(["expert", "weight", "norm", "coords changed", "path"], rows)


def _matrix_table(matrix: np.ndarray, labels: Sequence[str], *, as_pct: bool = False) -> str:
    rows = [
        [labels[i], *[pct(float(v)) if as_pct else fmt(float(v), 3) for v in matrix[i]]]
        for i in range(len(labels))
    ]
    return markdown_table(["", *labels], rows)


def _operator_table(diag: PoolDiagnostics) -> str:
    d = diag.config.density
    rows = [
        [
            f"`{r['operator']}`", r["description"], r["dispersion_after"], r["delta"], pct(r["relative_delta"]),
            pct(r["kept_fraction"]), f"{r['layers_increased']}/{len(diag.layers)}", r["guarantee"],
        ]
        for r in diag.operator_table()
    ]
    header = (
        f"Whole model, density d = {d}, trim scope `{diag.config.trim_scope}`, sign election "
        f"`{diag.config.sign_election}`, DARE seed {diag.config.seed}; D before = {fmt(diag.total.dispersion)}.\n\n"
    )
    return header + markdown_table(
        ["T", "operator", "D_T", "Delta_T = D - D_T", "Delta_T / D", "entries kept", "layers where D rose",
         "guaranteed"],
        rows,
    )


def _worst_layers_table(diag: PoolDiagnostics, k: int) -> str:
    rows = []
    for layer in diag.worst_layers(k):
        s = layer.stats
        rows.append([
            f"`{layer.name}`", "x".join(map(str, layer.shape)) or "scalar", s.numel, pct(s.pool_conflict_rate),
            pct(s.pool_conflict_chance), pct(s.mean_pairwise_conflict()), s.mean_cosine(),
            s.normalized_dispersion,
        ])
    return markdown_table(
        ["tensor", "shape", "numel", "pool conflict", "chance", "pairwise conflict", "mean cosine", "D / sum ||tau||^2"],
        rows,
    )


def _ranking_markdown(ranking: Mapping[str, Any]) -> str:
    lines = [
        "**This is a heuristic from data-free statistics, not a prediction of the theory and not a guarantee**: "
        "validate on held-out data.",
        "",
        f"Regime: **{ranking['regime']}**. Expected order: "
        + " > ".join(f"`{m}`" for m in ranking["ranking"]) + ".",
        "",
    ]
    lines += [f"- {r}" for r in ranking["reasons"]]
    th = ranking["thresholds"]
    lines += [
        "",
        f"Rules: *conflicting* if mean pairwise conflict >= {th['conflict_high']} or sign consensus removes >= "
        f"{th['sign_delta_high']:.0%} of D (TIES/DARE-TIES expected to beat task arithmetic); *aligned* if "
        f"conflict <= {th['conflict_low']} and mean cosine >= {th['cosine_aligned']} (averaging / task arithmetic "
        "fine); *mixed* otherwise.",
    ]
    return "\n".join(lines)


def _layers_csv(diag: PoolDiagnostics) -> str:
    rows = diag.layer_table()
    buf = io.StringIO()
    cols = [c for c in rows[0] if c not in ("norms", "shape")]
    writer = csv.writer(buf)
    writer.writerow(["name", "shape", *[c for c in cols if c != "name"],
                     *[f"norm_{i + 1}" for i in range(diag.n_experts)]])
    for r in rows:
        writer.writerow([
            r["name"], "x".join(map(str, r["shape"])),
            *[_csv_value(r[c]) for c in cols if c != "name"], *[_csv_value(v) for v in r["norms"]],
        ])
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return repr(v) if isinstance(v, float) else v


# --------------------------------------------------------------------------------------------- plots


def _layer_axis(ax: Any, names: Sequence[str]) -> None:
    if len(names) <= 30:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([literal(n if len(n) <= 40 else "..." + n[-37:]) for n in names], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("tensor index (storage order)")


def plot_cosine(diag: PoolDiagnostics, labels: Sequence[str]) -> MplFigure:
    """Heatmap of the whole-model pairwise cosine similarity of the task vectors."""
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.figure import Figure as MplFigure

    n = diag.n_experts
    cos = diag.total.cosine()
    fig = MplFigure(figsize=(1.2 + 0.6 * n, 1.0 + 0.55 * n))
    ax = fig.add_subplot()
    im = ax.imshow(np.nan_to_num(cos, nan=0.0), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([literal(x) for x in labels], rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels([literal(x) for x in labels], fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                v = cos[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(np.nan_to_num(v)) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("task-vector cosine similarity", fontsize=9)
    return fig


def plot_conflicts(diag: PoolDiagnostics) -> MplFigure:
    """Per-layer sign-conflict rates (pool and mean pairwise) with the pool rate's chance level."""
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.figure import Figure as MplFigure

    names = [layer.name for layer in diag.layers]
    x = np.arange(len(names))
    pool = np.array([layer.stats.pool_conflict_rate for layer in diag.layers])
    chance = np.array([layer.stats.pool_conflict_chance for layer in diag.layers])
    pair = np.array([layer.stats.mean_pairwise_conflict() for layer in diag.layers])
    fig = MplFigure(figsize=(max(6.0, min(16.0, 0.25 * len(names) + 3)), 3.8))
    ax = fig.add_subplot()
    ax.bar(x, pool, color="tab:red", alpha=0.6, label="pool conflict rate")
    ax.plot(x, chance, "k_", markersize=8, label="pool chance level")
    ax.plot(x, pair, "o", color="tab:blue", markersize=3, label="mean pairwise conflict")
    ax.axhline(0.5, color="tab:blue", lw=0.8, ls=":", label="pairwise chance (0.5)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of coordinates")
    _layer_axis(ax, names)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("sign conflicts per tensor", fontsize=9)
    return fig


def plot_dispersion(diag: PoolDiagnostics) -> MplFigure:
    """Dispersion after each operator relative to before: whole model (bars) and per tensor (markers)."""
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.figure import Figure as MplFigure

    ops = [op for op in OPERATORS if op in diag.total.operators]
    names = [layer.name for layer in diag.layers]
    fig = MplFigure(figsize=(max(9.0, min(18.0, 0.25 * len(names) + 7)), 3.8))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.5]})
    ratios = [diag.total.dispersion_after(op) / diag.total.dispersion if diag.total.dispersion else np.nan
              for op in ops]
    colors = [f"C{i}" for i in range(len(ops))]
    ax0.bar(range(len(ops)), ratios, color=colors)
    ax0.axhline(1.0, color="k", lw=0.8)
    ax0.set_xticks(range(len(ops)))
    ax0.set_xticklabels(ops, rotation=45, ha="right", fontsize=8)
    ax0.set_ylabel("D_T / D (below 1: dispersion reduced)")
    ax0.set_title("whole model", fontsize=9)
    x = np.arange(len(names))
    width = 0.6 / max(len(ops), 1)  # side by side within a tensor's slot, so equal values stay visible
    for k, (op, color) in enumerate(zip(ops, colors)):
        r = np.array([
            layer.stats.dispersion_after(op) / layer.stats.dispersion if layer.stats.dispersion else np.nan
            for layer in diag.layers
        ])
        ax1.plot(x + (k - (len(ops) - 1) / 2) * width, r, "o", color=color, markersize=3, label=op)
    ax1.axhline(1.0, color="k", lw=0.8)
    if any(r > 0 for r in ratios if not np.isnan(r)):
        ax1.set_yscale("log")
    ax1.set_ylabel("D_T / D per tensor")
    _layer_axis(ax1, names)
    ax1.legend(fontsize=7, ncol=3)
    ax1.set_title("per tensor", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------ assembly


def diagnostics_report(
    diag: PoolDiagnostics, report: Report | None = None, *, worst: int = 10, title: str = "Mergeability report"
) -> Report:
    """Add the pool-diagnostics sections to ``report`` (a new one by default) and return it.

    Sections: ``diagnostics`` (key figures, experts, cosine and pairwise-conflict matrices, worst-conflicting
    tensors, with the full result of :meth:`PoolDiagnostics.to_dict` as data and ``layers.csv`` attached),
    ``operators`` (the Delta_T table) and ``expected_ranking`` (the heuristic).
    """
    report = report or Report(title)
    labels = short_labels(diag.experts)
    report.meta.setdefault("base", diag.base)
    report.meta.setdefault("experts", list(diag.experts))
    data = to_jsonable(diag.to_dict())

    body = [
        _key_figures(diag),
        "",
        "### Experts",
        "",
        _experts_table(diag, labels),
    ]
    if diag.n_experts <= 12:
        body += [
            "",
            "### Cosine similarity (whole model)",
            "",
            _matrix_table(diag.total.cosine(), labels),
            "",
            "### Pairwise sign conflict (among coordinates both experts change)",
            "",
            _matrix_table(diag.total.pairwise_conflict(), labels, as_pct=True),
        ]
    body += [
        "",
        f"### Most conflicting tensors (top {worst} by pool conflict rate)",
        "",
        _worst_layers_table(diag, worst),
        "",
        "The full per-tensor table is in `layers.csv` and in `report.json`.",
    ]
    if diag.warnings:
        body += ["", "Warnings:", ""] + [f"- {w}" for w in diag.warnings]
    report.add_section(
        "Pool diagnostics",
        "\n".join(body),
        data=data,
        figures=[
            Drawing("cosine.png", "Pairwise cosine similarity of the task vectors (whole model)",
                   lambda: plot_cosine(diag, labels)),
            Drawing("conflicts.png", "Sign-conflict rate per tensor", lambda: plot_conflicts(diag)),
        ],
        key="diagnostics",
        files={"layers.csv": _layers_csv(diag)},
    )
    report.add_section(
        "Dispersion reduction by operator (empirical Delta_T of Corollary 1)",
        _operator_table(diag) + "\n\n" + _DISCLAIMER,
        data=data["operators"],
        figures=[Drawing("dispersion.png", "Dispersion after each operator relative to before",
                        lambda: plot_dispersion(diag))],
        key="operators",
    )
    report.add_section(
        "Expected method ranking (heuristic)",
        _ranking_markdown(data["expected_ranking"]),
        data=data["expected_ranking"],
        key="expected_ranking",
    )
    return report


def write_report(
    result: PoolDiagnostics | Report, out_dir: str | Path, *, plots: bool = True, title: str = "Mergeability report"
) -> ReportPaths:
    """Write a mergeability report for ``result`` (pool diagnostics, or an assembled :class:`Report`) into
    ``out_dir``: ``report.json``, ``report.md``, ``layers.csv`` and, with ``plots``, ``cosine.png``,
    ``conflicts.png`` and ``dispersion.png``."""
    report = result if isinstance(result, Report) else diagnostics_report(result, title=title)
    return report.write(out_dir, plots=plots)


def format_summary(diag: PoolDiagnostics) -> str:
    """A short plain-text summary for the terminal: key figures, the Delta_T table and the heuristic."""
    t = diag.total
    lines = [
        f"pool: {diag.n_experts} experts, {len(diag.layers)} tensors, {t.numel:,} coordinates each "
        f"({diag.seconds:.1f} s)",
        f"  norms ||tau_i||:            {', '.join(fmt(float(v)) for v in t.norms)}",
        f"  mean pairwise cosine:       {fmt(t.mean_cosine())}",
        f"  sign conflict, pairwise:    {pct(t.mean_pairwise_conflict())} (chance 50.0%)",
        f"  sign conflict, pool:        {pct(t.pool_conflict_rate)} (chance {pct(t.pool_conflict_chance)})",
        f"  dispersion D:               {fmt(t.dispersion)} (normalised {fmt(t.normalized_dispersion)})",
        f"operators at density {diag.config.density} (Delta_T = D - D_T; negative: dispersion rose):",
    ]
    for r in diag.operator_table():
        lines.append(
            f"  {r['operator']:12s} D_T {fmt(r['dispersion_after']):>10s}  Delta_T {fmt(r['delta']):>10s}  "
            f"({pct(r['relative_delta']):>7s})"
        )
    ranking = diag.expected_ranking()
    lines.append(f"expected ranking (heuristic, regime '{ranking['regime']}'): {' > '.join(ranking['ranking'])}")
    worst = diag.worst_layers(3)
    if worst:
        lines.append("most conflicting tensors: " + ", ".join(
            f"{w.name} ({pct(w.stats.pool_conflict_rate)})" for w in worst
        ))
    return "\n".join(lines)
