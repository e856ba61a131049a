"""What the stability bound *(derived)* predicts: its shape along each hyperparameter, and a next expert.

:func:`predict_trends` evaluates :func:`mergelab.analysis.bound.evaluate_bound` with one hyperparameter of every
expert (K, eta, b, n) multiplied by :data:`DEFAULT_FACTORS`, or on sub-pools of every size (N, averaging the
heterogeneity over the subsets), and classifies the curve's shape (:func:`classify_shape`); these are
predictions to compare with measurement, not measurements. :func:`recommend` searches a merge-friendly setting
for the next expert of a pool.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from mergelab.analysis.bound import FORM, BoundConstants, BoundExpert, BoundPool, BoundReport, evaluate_bound
from mergelab.analysis.heterogeneity import heterogeneity_from_gram

log = logging.getLogger(__name__)

HYPERPARAMETERS = ("K", "eta", "b", "n", "N")
DEFAULT_FACTORS: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 5))  # 0.25 .. 4, 9 points


# ---------------------------------------------------------------------------------------------------------
# trends
# ---------------------------------------------------------------------------------------------------------
def classify_shape(x: Sequence[float], y: Sequence[float], rtol: float = 1e-9) -> dict[str, Any]:
    """Shape of ``y(x)`` on an increasing grid: ``increasing``, ``decreasing``, ``flat``, ``U`` (interior
    minimum, falling then rising), ``inverted-U`` (interior maximum) or ``non-monotone``.

    Differences smaller than ``rtol * max|y|`` count as ties. Returns ``shape``, ``argmin``/``argmax`` (x values)
    and ``argmin_at_edge``. For a loss bound, ``U`` is an optimum at ``argmin`` (inverted-U in accuracy).
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or len(xs) < 2:
        raise ValueError("classify_shape needs two same-length sequences of >= 2 points")
    tol = rtol * max(float(np.max(np.abs(ys))), 1e-300)
    d = np.diff(ys)
    up, down = d > tol, d < -tol
    imin, imax = int(np.argmin(ys)), int(np.argmax(ys))
    if not up.any() and not down.any():
        shape = "flat"
    elif not down.any():
        shape = "increasing"
    elif not up.any():
        shape = "decreasing"
    elif 0 < imin < len(ys) - 1 and not up[:imin].any() and not down[imin:].any():
        shape = "U"
    elif 0 < imax < len(ys) - 1 and not down[:imax].any() and not up[imax:].any():
        shape = "inverted-U"
    else:
        shape = "non-monotone"
    return {"shape": shape, "argmin": float(xs[imin]), "argmax": float(xs[imax]),
            "argmin_at_edge": imin in (0, len(ys) - 1)}


@dataclass(frozen=True)
class BoundTrend:
    """The bound's prediction along one hyperparameter *(derived)*: a prediction to compare with measurement.

    ``factors`` multiply the pool's current setting (for ``N``: ``values`` are pool sizes). ``shape`` is the
    bound's; ``term_shapes`` those of ``opt``, ``gen`` and ``eps2``. ``valid_fraction[k]`` is the fraction of
    experts satisfying ``eta <= 1/(L K)`` at grid point ``k``.
    """

    hyperparameter: str
    factors: tuple[float, ...]
    values: tuple[float, ...]
    bound: tuple[float, ...]
    opt: tuple[float, ...]
    gen: tuple[float, ...]
    eps2: tuple[float, ...]
    valid_fraction: tuple[float, ...]
    shape: str
    argmin_factor: float
    argmin_value: float
    argmin_at_edge: bool
    term_shapes: dict[str, str]
    direction: str
    model: str
    form: str = FORM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _direction_text(hp: str, shape: str, argmin_factor: float, at_edge: bool) -> str:
    label = {"K": "steps K", "eta": "learning rate eta", "b": "batch size b", "n": "data size n", "N": "number of tasks N"}[hp]
    if shape == "increasing":
        return f"(derived) the bound increases with {label}: smaller is predicted to merge better"
    if shape == "decreasing":
        return f"(derived) the bound decreases with {label}: larger is predicted to merge better"
    if shape == "U":
        return (f"(derived) U-shaped in {label} (inverted-U in merged accuracy): optimum near x{argmin_factor:.3g} "
                f"of the current setting")
    if shape == "flat":
        return f"(derived) the bound does not depend on {label} here"
    return f"(derived) {shape} in {label}; minimum at x{argmin_factor:.3g}" + (" (grid edge)" if at_edge else "")


def _sub_pool(pool: BoundPool, idx: Sequence[int]) -> BoundPool:
    """The pool restricted to (or cyclically replicated onto) ``idx``; delta from the Gram matrix when known."""
    ex = [pool.experts[i] for i in idx]
    gram = None
    if pool.gram is not None:
        gram = np.asarray(pool.gram)[np.ix_(idx, idx)]
        delta2, _ = heterogeneity_from_gram(gram, [e.n for e in ex])
        ex = [replace(e, delta2=float(d)) for e, d in zip(ex, delta2)]
    if pool.merge == "weighted":
        total = float(sum(e.alpha for e in pool.experts))  # type: ignore[misc]
        sub = float(sum(e.alpha for e in ex))  # type: ignore[misc]
        ex = [replace(e, alpha=float(e.alpha) * total / sub) for e in ex]  # type: ignore[arg-type]
    return pool.with_experts(ex, gram)


def _n_trend(pool: BoundPool, factors: Sequence[float], constants: BoundConstants | None, heavy_ball: bool,
             max_subsets: int, seed: int) -> tuple[list[int], list[list[BoundReport]], str]:
    N = pool.size
    sizes = sorted({max(1, int(round(N * f))) for f in factors})
    rng = np.random.default_rng(seed)
    reports: list[list[BoundReport]] = []
    for k in sizes:
        if k <= N:
            if math.comb(N, k) <= max_subsets:
                subsets = [list(s) for s in itertools.combinations(range(N), k)]
            else:
                subsets = [sorted(rng.choice(N, size=k, replace=False).tolist()) for _ in range(max_subsets)]
        else:
            subsets = [[i % N for i in range(k)]]
        reports.append([evaluate_bound(_sub_pool(pool, s), constants, heavy_ball=heavy_ball) for s in subsets])
    het = "delta recomputed from the task-gradient Gram matrix" if pool.gram is not None else "measured delta_i kept"
    model = (f"N <= {N}: mean over sub-pools of the measured experts; N > {N}: experts replicated cyclically "
             f"(new tasks assumed statistically like the current ones); {het}; merge rule {pool.merge!r}")
    return sizes, reports, model


def predict_trends(
    pool: BoundPool,
    factors: Sequence[float] = DEFAULT_FACTORS,
    *,
    hyperparameters: Sequence[str] = HYPERPARAMETERS,
    constants: BoundConstants | None = None,
    heavy_ball: bool = True,
    max_subsets: int = 64,
    seed: int = 0,
) -> dict[str, BoundTrend]:
    """*(derived)* The bound along each hyperparameter on a multiplicative grid around the pool's settings.

    ``K``, ``eta``, ``b``, ``n``: every expert's value times each factor, statistics at theta_0 unchanged (they
    do not depend on how the experts are trained). ``N``: pool sizes ``round(N * factor)``, see
    :func:`_n_trend` (sub-pools below the current size, cyclic replication above; with the Gram matrix the
    heterogeneity of each sub-pool is recomputed, so it grows with the pool's diversity). Each trend reports the
    bound's shape (monotone / U / inverted-U with its argmin) -- predictions to compare with measurement.
    """
    out: dict[str, BoundTrend] = {}
    fs = sorted(float(f) for f in factors)
    for hp in hyperparameters:
        if hp == "N":
            sizes, groups, model = _n_trend(pool, fs, constants, heavy_ball, max_subsets, seed)
            xs = [float(s) for s in sizes]
            fac = [s / pool.size for s in sizes]
            agg = {k: [float(np.mean([getattr(r, k) for r in g])) for g in groups] for k in ("bound", "opt", "gen", "eps2")}
            valid = [float(np.mean([np.mean([e["valid"] for e in r.experts]) for r in g])) for g in groups]
        elif hp in ("K", "eta", "b", "n"):
            reports = [evaluate_bound(pool.scaled(hp, f), constants, heavy_ball=heavy_ball) for f in fs]
            fac = fs
            attr = {"K": "steps", "eta": "lr", "b": "batch_size", "n": "n"}[hp]
            base = float(np.mean([getattr(e, attr) for e in pool.experts]))
            xs = [base * f for f in fs]
            agg = {k: [float(getattr(r, k)) for r in reports] for k in ("bound", "opt", "gen", "eps2")}
            valid = [float(np.mean([e["valid"] for e in r.experts])) for r in reports]
            model = f"every expert's {attr} x factor; L, sigma^2, delta^2, F0 measured at theta_0 held fixed"
        else:
            raise ValueError(f"unknown hyperparameter {hp!r}; known: {', '.join(HYPERPARAMETERS)}")
        shape = classify_shape(fac, agg["bound"])
        argmin_i = int(np.argmin(agg["bound"]))
        out[hp] = BoundTrend(
            hyperparameter=hp,
            factors=tuple(fac),
            values=tuple(xs),
            bound=tuple(agg["bound"]),
            opt=tuple(agg["opt"]),
            gen=tuple(agg["gen"]),
            eps2=tuple(agg["eps2"]),
            valid_fraction=tuple(valid),
            shape=shape["shape"],
            argmin_factor=float(fac[argmin_i]),
            argmin_value=float(xs[argmin_i]),
            argmin_at_edge=bool(shape["argmin_at_edge"]),
            term_shapes={k: classify_shape(fac, agg[k])["shape"] for k in ("opt", "gen", "eps2")},
            direction=_direction_text(hp, shape["shape"], float(fac[argmin_i]), bool(shape["argmin_at_edge"])),
            model=model,
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# recommendation for the next expert
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeRecommendation:
    """A merge-friendly setting for the next expert *(derived)*: minimises the bound of the pool plus that
    expert over a grid of its ``lr``, ``steps``, ``batch_size`` (and data ratio, up to all data)."""

    base: dict[str, float]
    recommended: dict[str, float]
    factors: dict[str, float]
    bound_before: float
    bound_after: float
    valid_after: bool
    curves: dict[str, dict[str, Any]]
    reasoning: tuple[str, ...]
    form: str = FORM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def text(self) -> str:
        return "\n".join(self.reasoning)


def typical_expert(pool: BoundPool) -> BoundExpert:
    """A new expert statistically like the pool: means of the statistics, geometric mean of the lr."""
    ex = pool.experts
    opts = [e.optimizer for e in ex]
    return BoundExpert(
        name="next",
        lr=float(np.exp(np.mean([math.log(e.lr) for e in ex]))),
        steps=float(np.mean([e.steps for e in ex])),
        batch_size=float(np.mean([e.batch_size for e in ex])),
        n=float(np.mean([e.n for e in ex])),
        sigma2=float(np.mean([e.sigma2 for e in ex])),
        delta2=float(np.mean([e.delta2 for e in ex])),
        init_loss=float(np.mean([e.init_loss for e in ex])),
        momentum=float(np.mean([e.momentum for e in ex])),
        optimizer=max(set(opts), key=opts.count),
        lr_factor_mean=float(np.mean([e.lr_factor_mean for e in ex])),
        lr_factor_sq_mean=float(np.mean([e.lr_factor_sq_mean for e in ex])),
        data_ratio=float(np.mean([e.data_ratio for e in ex])),
        alpha=float(np.mean([e.alpha for e in ex])) if pool.merge == "weighted" else None,
    )


def recommend(
    pool: BoundPool,
    expert: BoundExpert | None = None,
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
    constants: BoundConstants | None = None,
    heavy_ball: bool = True,
) -> MergeRecommendation:
    """*(derived)* How to fine-tune the next expert so that the merge of ``pool`` + it has the smallest bound.

    ``expert`` is the planned expert with its task's statistics at theta_0 (default: a typical expert of the
    pool, :func:`_typical_expert`). Its ``lr``, ``steps`` and ``batch_size`` are searched jointly over
    ``factors`` (others' settings fixed); its data ratio is raised to 1 when it is below (the stability term
    falls as 1/n and nothing in the bound opposes more data). The reasoning says which term dominates and why
    each knob moves the way it does; it is a prediction of the derived bound, not a measurement.
    """
    target = expert or typical_expert(pool)
    fs = sorted(float(f) for f in factors)

    def pool_with(e: BoundExpert) -> BoundPool:
        return pool.with_experts(list(pool.experts) + [e], None)

    base_rep = evaluate_bound(pool_with(target), constants, heavy_ball=heavy_ball)
    curves: dict[str, dict[str, Any]] = {}
    for hp, attr in (("eta", "lr"), ("K", "steps"), ("b", "batch_size")):
        vals = [evaluate_bound(pool_with(target.scaled(hp, f)), constants, heavy_ball=heavy_ball).bound for f in fs]
        sh = classify_shape(fs, vals)
        curves[attr] = {"factors": fs, "bound": vals, "shape": sh["shape"], "argmin_factor": sh["argmin"],
                        "argmin_at_edge": sh["argmin_at_edge"]}
    best, best_f = math.inf, (1.0, 1.0, 1.0)
    n_factor = 1.0 / target.data_ratio if target.data_ratio < 1.0 else 1.0
    data_target = target.scaled("n", n_factor) if n_factor != 1.0 else target
    best_rep = base_rep
    for fe, fk, fb in itertools.product(fs, fs, fs):
        cand = data_target.scaled("eta", fe).scaled("K", fk).scaled("b", fb)
        rep = evaluate_bound(pool_with(cand), constants, heavy_ball=heavy_ball)
        if rep.bound < best:
            best, best_f, best_rep = rep.bound, (fe, fk, fb), rep
    fe, fk, fb = best_f
    rec = data_target.scaled("eta", fe).scaled("K", fk).scaled("b", fb)
    new = best_rep.experts[-1]
    L = pool.smoothness
    reasons: list[str] = [
        "(derived) recommendation from the stability bound of THEORY.md section 1 (constants "
        f"c_opt={base_rep.constants.c_opt:g}, c_stab={base_rep.constants.c_stab:g}); a prediction to check by measurement.",
    ]
    total = base_rep.bound
    share_gen = base_rep.constants.c_stab * base_rep.gen / total if total > 0 else 0.0
    reasons.append(
        f"At the current setting the bound is {total:.4g}: generalisation (stability) {100 * share_gen:.0f}%, "
        f"optimisation {100 * (1 - share_gen):.0f}% (initial-loss decay {base_rep.opt_init:.3g}, "
        f"minibatch noise {base_rep.opt_var:.3g}, chi^2 heterogeneity {base_rep.opt_het:.3g})."
    )
    reasons.append(
        "Stability eps_i^2 ~ eta^2 K (sigma^2 + b delta^2) / n grows quadratically in the learning rate, linearly in "
        "steps, with the batch size through the heterogeneity part, and falls with data; the optimisation term "
        "falls as 1/sqrt(N eta K) and its noise part as sigma^2/b."
    )
    for attr, label in (("lr", "learning rate"), ("steps", "steps"), ("batch_size", "batch size")):
        cv = curves[attr]
        edge = " (edge of the searched range: the bound keeps improving that way)" if cv["argmin_at_edge"] else ""
        reasons.append(f"Alone, the {label} curve is {cv['shape']} with its minimum at x{cv['argmin_factor']:.3g}{edge}.")
    reasons.append(
        f"Jointly: lr x{fe:.3g} ({target.lr:.4g} -> {rec.lr:.4g}), steps x{fk:.3g} ({target.steps:.4g} -> {rec.steps:.4g}), "
        f"batch size x{fb:.3g} ({target.batch_size:.4g} -> {rec.batch_size:.4g}); bound {total:.4g} -> {best:.4g}."
    )
    if n_factor != 1.0:
        reasons.append(f"Use all of the task's data (data ratio {target.data_ratio:.3g} -> 1): eps^2 falls as 1/n.")
    pool_P = evaluate_bound(pool, constants, heavy_ball=heavy_ball).progress if pool.size else float("nan")
    reasons.append(
        f"Matching progress: the new expert's accumulated step eta K m1 = {rec.eta(heavy_ball) * rec.steps * rec.lr_factor_mean:.4g} "
        f"vs the pool's {pool_P:.4g}; a mismatch moves the effective weights w away from alpha "
        f"(chi^2 = {best_rep.chi2:.3g} at the recommendation)."
    )
    ratio = new["eta_L_K"]
    reasons.append(
        f"Validity: eta L K = {ratio:.3g} for the recommended expert "
        + ("(<= 1: inside the bound's step-size condition)." if ratio <= 1 else
           f"(> 1: outside the condition eta <= 1/(L K) = {1 / (L * rec.steps):.3g}; the bound is extrapolated there).")
    )
    return MergeRecommendation(
        base={"lr": target.lr, "steps": target.steps, "batch_size": target.batch_size, "data_ratio": target.data_ratio},
        recommended={"lr": rec.lr, "steps": float(max(1, round(rec.steps))), "batch_size": float(max(1, round(rec.batch_size))),
                     "data_ratio": min(1.0, rec.data_ratio)},
        factors={"lr": fe, "steps": fk, "batch_size": fb, "data_ratio": n_factor},
        bound_before=total,
        bound_after=best,
        valid_after=bool(ratio <= 1),
        curves=curves,
        reasoning=tuple(reasons),
    )


__all__ = ["DEFAULT_FACTORS", "HYPERPARAMETERS", "BoundTrend", "MergeRecommendation", "classify_shape",
           "predict_trends", "recommend", "typical_expert"]
