"""The data-dependent sections of the mergeability report: a :class:`~mergelab.analysis.pool_analysis.PoolDataAnalysis`
as Markdown, JSON data and plots (:mod:`~mergelab.analysis.pool_report_plots`) in the sections ``theory``,
``bound``, ``trends``, ``landscape`` and ``cka`` (:func:`add_data_sections`), and a terminal summary."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from mergelab.analysis.bound import BOUND_FORMULA, FORM, SOURCE
from mergelab.analysis.diagnostics import to_jsonable
from mergelab.analysis.pool_analysis import PoolDataAnalysis, nonfinite_points
from mergelab.analysis.pool_report_plots import (
    HP_LABELS,
    plot_bound_terms,
    plot_cka,
    plot_paths,
    plot_theory,
    plot_trends,
)
from mergelab.report.folder import Drawing, Report
from mergelab.report.markdown import fmt, markdown_table

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.analysis.noise_scale import NoiseScaleReport


#: Section keys this module adds to a report, in order.
SECTION_KEYS = ("theory", "bound", "trends", "landscape", "cka")


#: What THEORY.md section 1 says each hyperparameter does to mergeability (to compare with the bound's shape).
THEORY_EXPECTATIONS = {
    "K": "optimum K* (inverted-U in merged performance) or monotone decline",
    "eta": "large learning rates collapse the merge (stability grows as eta^2)",
    "b": "trade-off; at small eta larger b merges better",
    "n": "monotone improvement with more data (stability falls as 1/n)",
    "N": "decline: heterogeneity accumulates faster than optimisation improves",
}


def _noise_cell(n: NoiseScaleReport | None, attr: str) -> Any:
    return None if n is None else getattr(n, attr)


def _theory_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    m = a.measurement
    rows = []
    for i, init in enumerate(a.inits):
        ns = init.noise_sidecar
        nm = init.noise_measured
        t = init.measured
        rows.append([
            init.label, t.n, t.n_used, t.init_loss, t.sigma2, float(m.heterogeneity.delta2[i]),
            t.grad_norm2, init.L,
            "n/a" if t.smoothness is None else f"{t.smoothness.iterations}{'' if t.smoothness.converged else ' (not conv.)'}",
            _noise_cell(ns, "proxy"), _noise_cell(nm, "trace_sigma"), _noise_cell(nm, "T"),
        ])
    o = a.options
    body = [
        "Measured at theta_0 (the base) on each expert's own **training** subset, "
        f"{o.samples_per_task} seeded samples per task (seed {o.seed}); gradients over the backbone parameters "
        "in eval mode with BatchNorm statistics re-estimated on the task's training images, the loss through the "
        + ("**initial head** fine-tuning started from (recomputed: LP-FT linear probe, or the seeded zero/random head)"
           if o.heads == "init" else "**expert's final head**") + ".",
        "",
        markdown_table(
            ["expert", "n_i", "samples", "F_{S_i}(theta_0)", "sigma_i^2 = tr(Sigma_i)", "delta_i^2",
             "||grad F_i||^2", "L_i", "power its", "noise proxy eta/(B(1-beta))", "tr(Sigma) all params",
             "T measured"],
            rows,
        ),
        "",
        f"Pool: **L = max_i L_i = {fmt(m.smoothness)}**; heterogeneity D = sum_i (n_i/n) delta_i^2 = "
        f"{fmt(m.heterogeneity.mean_delta2)}; ||grad F||^2 = {fmt(m.heterogeneity.mean_grad_norm2)} "
        "(F = sum_i (n_i/n) F_i, n_i = the expert's training-set size from its sidecar).",
        "",
        f"L_i: power iteration on Hessian-vector products, at most {o.hessian_iters} iterations (tolerance "
        f"{o.hessian_tol:g}) on one batch of the samples: a small-sample estimate of the top eigenvalue. Noise scale: "
        "the sidecar's proxy (linear (1 - beta) form) and T = proxy x tr(Sigma), tr(Sigma) the per-sample gradient "
        "variance over all trained parameters (backbone and head) at theta_0"
        + (" (augmentation-aware when the expert trained with augmentation)." if o.noise else "; not measured here."),
    ]
    data = {
        "experts": [dict(i.to_dict(), delta2=float(m.heterogeneity.delta2[k])) for k, i in enumerate(a.inits)],
        "pool": {"smoothness": m.smoothness, "heterogeneity": m.heterogeneity.to_dict(),
                 "num_params": int(a.inits[0].measured.grad.numel())},
        "settings": dict(m.settings),
    }
    return "\n".join(body), data


def _bound_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    c = a.constants
    head = [
        "**(derived)** This bound is our own derivation from the stated dependencies of the stability framework "
        "(THEORY.md section 1), not a formula from the paper; read it as a prediction to check by measurement.",
        "",
        f"Constants: {c.note}.",
        "",
        f"Merge coefficients: {a.coefficients.note}; alpha = ({', '.join(fmt(x, 3) for x in a.coefficients.alphas)}).",
        "",
    ]
    data: dict[str, Any] = {"form": FORM, "formula": BOUND_FORMULA, "source": SOURCE, "constants": c.to_dict(),
                            "coefficients": a.coefficients.to_dict()}
    if a.bound is None:
        return "\n".join(head + ["Not evaluated: the smoothness L was not measured."]), {**data, "bound": None}
    b = a.bound
    rows = [
        ["optimisation: initial-loss decay F0 / sqrt(N P)", b.opt_init],
        ["optimisation: minibatch noise L sum a_i^2 (S1_i/K_i) sigma_i^2 / b_i", b.opt_var],
        ["optimisation: heterogeneity chi^2(alpha||w) x D", b.opt_het],
        ["opt (sum)", b.opt],
        ["stability eps^2 = sum_i (n_i/n) alpha_i^2 eps_i^2", b.eps2],
        ["generalisation gen* = eps sqrt(2 L F) + L eps^2 / 2 (F = opt proxy)", b.gen],
        ["gamma*", b.gamma_star],
        ["**bound = c_opt opt + c_stab gen**", b.bound],
        ["raw bound (unit constants)", b.raw_bound],
        ["chi^2(alpha || w)", b.chi2],
    ]
    pred = a.predicted_loss()
    if pred is not None:
        rows.append(["predicted merged loss (calibrated bound + floor)", pred])
    exp_rows = [[e["name"], e["eta"], e["steps"], e["batch_size"], e["n"], e["alpha"], e["weight_w"], e["eps2"],
                 e["eta_L_K"], "yes" if e["valid"] else "**no**"] for e in b.experts]
    n_bad = sum(not e["valid"] for e in b.experts)
    body = head + [
        markdown_table(["term (derived)", "value"], rows),
        "",
        "Per expert (eta = lr / (1 - momentum), the heavy-ball step; w_i = FedNova effective weights; valid: "
        "eta L K <= 1, the step-size condition of the stability argument):",
        "",
        markdown_table(["expert", "eta", "K", "b", "n_i", "alpha_i", "w_i", "eps_i^2", "eta L K", "valid"], exp_rows),
        "",
        (f"**{n_bad} of {len(b.experts)} experts violate eta <= 1/(L K)**: the bound is extrapolated outside the "
         "condition under which it was derived; treat its value as a score, not a guarantee." if n_bad else
         "All experts satisfy the step-size condition."),
        "",
        f"Formula: `{BOUND_FORMULA}`",
    ]
    data.update({"bound": b.to_dict(), "chi2": b.chi2, "all_valid": b.all_valid,
                 "validity": [{"expert": e["name"], "eta_L_K": e["eta_L_K"], "valid": e["valid"]} for e in b.experts],
                 "predicted_loss": pred})
    return "\n".join(body), data


def _trend_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    if not a.trends:
        return "Not evaluated: the smoothness L was not measured.", {"form": "derived", "trends": {}, "recommendation": None}
    rows = []
    for hp, t in a.trends.items():
        i1 = int(np.argmin(np.abs(np.log(np.asarray(t.factors)))))
        rows.append([HP_LABELS[hp], t.shape, f"x{t.argmin_factor:.3g}" + (" (edge)" if t.argmin_at_edge else ""),
                     ", ".join(f"{k}: {v}" for k, v in t.term_shapes.items()), f"{100 * t.valid_fraction[i1]:.0f}%",
                     THEORY_EXPECTATIONS[hp]])
    rec = a.recommendation
    body = [
        "**(derived)** The bound re-evaluated with every expert's K, eta (base lr), b or n (and data ratio) multiplied "
        "by 0.25 ... 4, statistics at theta_0 held fixed; for N, sub-pools of the measured experts (heterogeneity "
        "recomputed from the task-gradient Gram matrix) and cyclic replication above the pool size. These are "
        "predictions of the formula, to be checked against measured merges; they are not measurements.",
        "",
        markdown_table(["hyperparameter", "bound shape", "argmin", "term shapes", "valid at x1",
                        "THEORY.md expectation"], rows),
        "",
        "### Merge-friendly recommendation for the next expert (derived)",
        "",
    ]
    if rec is not None:
        r = rec.recommended
        body += [
            markdown_table(["setting", "typical pool expert", "recommended"], [
                ["learning rate", rec.base["lr"], r["lr"]], ["steps K", rec.base["steps"], r["steps"]],
                ["batch size", rec.base["batch_size"], r["batch_size"]],
                ["data ratio", rec.base["data_ratio"], r["data_ratio"]],
            ]),
            "",
            *[f"- {line}" for line in rec.reasoning],
        ]
    data = {"form": "derived", "factors_model": "every expert's setting x factor; N: sub-pools / replication",
            "trends": {hp: t.to_dict() for hp, t in a.trends.items()},
            "recommendation": None if rec is None else rec.to_dict(), "theory_expectation": dict(THEORY_EXPECTATIONS)}
    return "\n".join(body), data


def _landscape_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    o = a.options
    body = [f"Evaluated on {o.samples_per_task} seeded **{o.eval_split}** samples per task, each task through its "
            f"expert's head; BatchNorm statistics `{o.bn}` along the paths "
            + ("(combined like the weights, as a plain merge does; averaging shrinks activations, which inflates "
               "barriers of ResNets -- `--bn reset` re-estimates them)." if o.bn == "interpolate" else
               "(re-estimated on training samples at every point).")]
    data: dict[str, Any] = {"samples_per_task": o.samples_per_task, "split": o.eval_split, "bn": o.bn}
    if a.interpolation is not None and a.interpolation_endpoints is not None:
        s = a.interpolation.summary()
        curves = dict(a.interpolation.curves, mean=a.interpolation.mean_curve())
        rows = [[t, v["loss_barrier"], v["accuracy_barrier"], v["loss_gain"], v["accuracy_gain"],
                 curves[t].loss[0], curves[t].loss[-1]] for t, v in s.items()]
        ea, eb = a.interpolation_endpoints
        body += ["", f"### Linear interpolation (1 - a) theta_{{{ea}}} + a theta_{{{eb}}}", "",
                 markdown_table(["task", "loss barrier", "accuracy barrier", "loss gain L(.5) - mean ends",
                                 "accuracy gain A(.5) - mean ends", "loss at a=0", "loss at a=1"], rows),
                 "", "Barrier: largest gap above the endpoints' chord; gain: the midpoint merge against the endpoints' "
                 "mean (accuracy: positive is good; loss: negative is good)."]
        data["interpolation"] = {"endpoints": [ea, eb], **a.interpolation.to_dict()}
    if a.ta_path is not None:
        p = a.ta_path
        n = len(a.pool.experts)
        mean = p.mean_curve()
        idx_avg = int(np.argmin(np.abs(np.asarray(p.alphas) - 1.0 / n)))
        rows = []
        for name, c in list(p.curves.items()) + ([("mean", mean)] if len(p.curves) > 1 else []):
            ba, bv = c.best("accuracy")
            la, lv = c.best("loss")
            rows.append([name, c.accuracy[0], c.accuracy[idx_avg], c.loss[idx_avg], ba, bv, la, lv])
        body += ["", f"### Task-arithmetic path theta_0 + a sum_i tau_i ({n} experts)", "",
                 markdown_table(["task", "acc at a=0 (theta_0)", f"acc at a=1/N={1 / n:.3g} (average)",
                                 "loss at a=1/N", "best a (acc)", "best acc", "best a (loss)", "best loss"], rows)]
        data["task_arithmetic"] = p.to_dict()
    bad = nonfinite_points(a)
    if bad:
        body += ["", f"**Non-finite losses** at {', '.join(bad)}: "
                 + ("the combined BatchNorm running variances turn negative when the path extrapolates "
                    "(a * N > 1 on the task-arithmetic path), so the network outputs NaN there (accuracy at those "
                    "points is meaningless). This is what a plain merge with that coefficient produces; "
                    "`--bn reset` re-estimates the statistics instead." if o.bn == "interpolate" else
                    "the merged network diverges there.")]
        data["nonfinite_points"] = bad
    return "\n".join(body), data


def _cka_section(a: PoolDataAnalysis) -> tuple[str, dict[str, Any]]:
    c = a.cka or {}
    rows = [[r["expert"], r["cka_merge"], r["cka_base"]] for r in c.get("experts", [])]
    b = c.get("batch", {})
    body = [
        f"Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of column-centred penultimate features on one fixed "
        f"batch of {b.get('n')} inputs ({b.get('per_task')} seeded {b.get('split')} samples of each of "
        f"{', '.join(b.get('tasks', []))}). Merge: {c.get('merge')} (lambda from {c.get('lambda_source')}).",
        "",
        markdown_table(["expert", "CKA(expert, TA merge)", "CKA(expert, theta_0)"], rows),
        "",
        f"CKA(TA merge, theta_0) = {fmt(c.get('cka_merge_base'))}. An expert whose features the merge preserves "
        "has CKA near 1 with it; a low value flags the expert the merge loses most.",
    ]
    if not c.get("merge_features_finite", True):
        body += ["", "**The merged network's features are not finite** on this batch (CKA n/a): with BatchNorm "
                 "statistics combined like the weights, lambda * N > 1 extrapolates the running variances below 0. "
                 "`--bn reset` re-estimates them before measuring."]
    return "\n".join(body), c


def add_data_sections(report: Report, a: PoolDataAnalysis) -> Report:
    """Add the sections ``theory``, ``bound``, ``trends``, ``landscape`` and ``cka`` (those computed) to ``report``."""
    md, data = _theory_section(a)
    report.add_section("Theory quantities at theta_0", md, to_jsonable(data), key="theory",
                       figures=[Drawing("theory.png", "F_S(theta_0), sigma^2, delta^2 and L_i per expert",
                                       lambda: plot_theory(a))])
    md, data = _bound_section(a)
    figs = [Drawing("bound.png", "(derived) bound terms and the step-size condition per expert",
                   lambda: plot_bound_terms(a))] if a.bound is not None else []
    report.add_section("Stability bound (derived)", md, to_jsonable(data), figs, key="bound")
    md, data = _trend_section(a)
    figs = [Drawing("trends.png", "(derived) the bound along K, eta, b, n and N", lambda: plot_trends(a))] if a.trends else []
    report.add_section("Predicted trends and recommendation (derived)", md, to_jsonable(data), figs, key="trends")
    if a.interpolation is not None or a.ta_path is not None:
        md, data = _landscape_section(a)
        figs = []
        if a.interpolation is not None and a.interpolation_endpoints is not None:
            ea, eb = a.interpolation_endpoints
            interp = a.interpolation
            figs.append(Drawing("interpolation.png", f"Loss and accuracy along (1-a) {ea} + a {eb}",
                               lambda: plot_paths(interp, f"linear interpolation {ea} -> {eb}")))
        if a.ta_path is not None:
            ta = a.ta_path
            figs.append(Drawing("ta_path.png", "Loss and accuracy along theta_0 + a sum tau_i",
                               lambda: plot_paths(ta, "task-arithmetic coefficient path")))
        report.add_section("Loss landscape: interpolation and task-arithmetic path", md, to_jsonable(data), figs,
                           key="landscape")
    if a.cka is not None:
        md, data = _cka_section(a)
        report.add_section("Linear CKA: experts vs the task-arithmetic merge", md, to_jsonable(data),
                           [Drawing("cka.png", "Linear CKA of each expert with the TA merge and theta_0",
                                   lambda: plot_cka(a))], key="cka")
    report.meta["data_analysis"] = to_jsonable({
        "options": asdict(a.options), "seconds": a.seconds, "warnings": a.warnings,
        "experts": [str(e.path) for e in a.pool.experts], "tasks": a.pool.tasks,
    })
    return report


def format_data_summary(a: PoolDataAnalysis) -> str:
    """A few lines for the terminal."""
    m = a.measurement
    lines = [f"data analysis ({sum(a.seconds.values()):.1f} s): L = {fmt(m.smoothness)}, "
             f"D = sum p_i delta_i^2 = {fmt(m.heterogeneity.mean_delta2)}"]
    for i, init in enumerate(a.inits):
        lines.append(f"  {init.label:20s} F0 {fmt(init.measured.init_loss):>9s}  sigma^2 {fmt(init.measured.sigma2):>9s}  "
                     f"delta^2 {fmt(float(m.heterogeneity.delta2[i])):>9s}  L_i {fmt(init.L):>9s}")
    if a.bound is not None:
        b = a.bound
        lines.append(f"(derived) bound {fmt(b.bound)} (opt {fmt(b.opt)}, gen {fmt(b.gen)}), chi^2(alpha||w) "
                     f"{fmt(b.chi2)}, valid experts {sum(e['valid'] for e in b.experts)}/{len(b.experts)}; "
                     + ("calibrated" if a.constants.calibrated else "constants 1/1 (uncalibrated)"))
        lines.append("(derived) trends: " + ", ".join(f"{hp} {t.shape}" for hp, t in a.trends.items()))
    if a.interpolation is not None:
        s = a.interpolation.summary()
        lines.append("interpolation: " + ", ".join(
            f"{t} barrier {fmt(v['loss_barrier'], 3)} acc-gain {fmt(v['accuracy_gain'], 3)}" for t, v in s.items()))
    if a.cka is not None:
        lines.append("CKA(expert, TA merge): " + ", ".join(f"{r['expert']} {fmt(r['cka_merge'], 3)}"
                                                          for r in a.cka["experts"]))
    return "\n".join(lines)


__all__ = ["SECTION_KEYS", "THEORY_EXPECTATIONS", "add_data_sections", "format_data_summary"]
