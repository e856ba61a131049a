"""The plots of the data-dependent report sections (matplotlib figures, no pyplot state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mergelab.analysis.landscape import plot_interpolation
from mergelab.analysis.pool_analysis import PoolDataAnalysis
from mergelab.report.figure_text import literal

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure as MplFigure

    from mergelab.analysis.landscape import PathResult


#: Axis labels of the hyperparameters the bound's trends vary.
HP_LABELS = {"K": "steps K", "eta": "learning rate eta", "b": "batch size b", "n": "data size n (data ratio)",
              "N": "number of tasks N"}


def _new_fig(w: float, h: float) -> MplFigure:
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(w, h))


def plot_theory(a: PoolDataAnalysis) -> MplFigure:
    labels = [i.label for i in a.inits]
    series = {
        "F_S(theta_0)": [i.measured.init_loss for i in a.inits],
        "sigma^2": [i.measured.sigma2 for i in a.inits],
        "delta^2": [float(d) for d in a.measurement.heterogeneity.delta2],
        "L_i": [i.L for i in a.inits],
    }
    fig = _new_fig(max(6.0, 1.2 * len(labels) + 3), 3.8)
    ax = fig.add_subplot()
    k = len(series)
    width = 0.8 / k
    x = np.arange(len(labels))
    for j, (name, vals) in enumerate(series.items()):
        v = np.asarray(vals, dtype=float)
        ax.bar(x + (j - (k - 1) / 2) * width, np.where(v > 0, v, np.nan), width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([literal(x) for x in labels], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("theory quantities at theta_0 (log scale)", fontsize=9)
    return fig


def plot_bound_terms(a: PoolDataAnalysis) -> MplFigure:
    b = a.bound
    assert b is not None
    c = a.constants
    names = ["opt: init decay", "opt: noise", "opt: chi^2 het.", "gen"]
    vals = [c.c_opt * b.opt_init, c.c_opt * b.opt_var, c.c_opt * b.opt_het, c.c_stab * b.gen]
    fig = _new_fig(7.0, 3.4)
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    pos = [v for v in vals if v > 0]
    ax0.barh(names, [v if v > 0 else np.nan for v in vals], color=["C0", "C1", "C2", "C3"])
    if pos:
        ax0.set_xscale("log")
        lo = min(pos)
        for k, v in enumerate(vals):
            ax0.text(v if v > 0 else lo, k, f" {v:.3g}", va="center", fontsize=7)
    ax0.set_title("(derived) bound terms x constants", fontsize=9)
    ax0.tick_params(labelsize=7)
    labels = [e["name"] for e in b.experts]
    ratio = [e["eta_L_K"] for e in b.experts]
    ax1.bar(range(len(labels)), ratio, color=["tab:green" if e["valid"] else "tab:red" for e in b.experts])
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(labels)))
    ax1.set_xticklabels([literal(x) for x in labels], rotation=30, ha="right", fontsize=7)
    ax1.set_title("eta L K (valid <= 1)", fontsize=9)
    return fig


def plot_trends(a: PoolDataAnalysis) -> MplFigure:
    hps = list(a.trends)
    fig = _new_fig(3.0 * len(hps), 3.0)
    axes = fig.subplots(1, len(hps), squeeze=False)[0]
    for ax, hp in zip(axes, hps):
        t = a.trends[hp]
        xs = np.asarray(t.values, dtype=float)
        ax.plot(xs, t.bound, "o-", ms=3, color="k", label="bound")
        ax.plot(xs, np.asarray(t.opt) * a.constants.c_opt, "--", lw=0.9, label="c_opt opt")
        ax.plot(xs, np.asarray(t.gen) * a.constants.c_stab, ":", lw=0.9, label="c_stab gen")
        cur = xs[int(np.argmin(np.abs(np.log(np.asarray(t.factors)))))]
        ax.axvline(cur, color="tab:blue", lw=0.8, alpha=0.6)
        ax.plot([t.argmin_value], [min(t.bound)], "v", color="tab:red", ms=7)
        ax.set_xscale("log")
        if all(v > 0 for v in list(t.bound) + list(t.opt) + list(t.gen)):
            ax.set_yscale("log")
        # deferred: matplotlib (a heavy load) only when a figure is drawn
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(HP_LABELS[hp], fontsize=8)
        ax.set_title(f"{hp}: {t.shape}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle("(derived) predicted trends of the bound (blue: current setting, red: argmin)", fontsize=9)
    return fig


def plot_paths(path: PathResult, title: str) -> MplFigure:
    fig = _new_fig(10.0, 3.6)
    ax0, ax1 = fig.subplots(1, 2)
    plot_interpolation(path, "loss", ax=ax0)
    plot_interpolation(path, "accuracy", ax=ax1)
    fig.suptitle(literal(title), fontsize=9)
    return fig


def plot_cka(a: PoolDataAnalysis) -> MplFigure:
    rows = (a.cka or {}).get("experts", [])
    fig = _new_fig(max(5.0, 1.0 * len(rows) + 2.5), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["cka_merge"] for r in rows], 0.4, label="CKA(expert, TA merge)")
    ax.bar(x + 0.2, [r["cka_base"] for r in rows], 0.4, label="CKA(expert, theta_0)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.set_xticklabels([literal(r["expert"]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("linear CKA of penultimate features", fontsize=9)
    return fig
