"""Fitting the *(derived)* excess-loss form of the stability bound to measured merges, and testing it.

The form (:data:`mergelab.analysis.excess_bound.EXCESS_FORMULA`, THEORY.md section 1, "Where N enters") predicts the
**excess** loss of a merge over its experts, ``excess_j = loss(merge_j) - mean_i loss(expert_i on task i)`` (both
under the same BatchNorm protocol), as ``c0 + c_opt OPT_j + c_stab STAB_j + c_het HET_j``.

**Fit** (:func:`fit_excess`). Columns are standardised, ``z_jk = (x_jk - mean_k) / sd_k`` (population sd; a
constant column gets coefficient 0), and the intercept is free. With a free intercept the least-squares
problem separates exactly: for any slopes the best ``c0`` is ``mean(y - X c)``, so the slopes solve the
problem on centred data. ``method="nnls"`` (default) constrains the slopes to be non-negative
(``scipy.optimize.nnls`` on the centred standardised columns): each term of an upper bound can only *add*
excess loss, so a negative slope would not be the bound any more, only a regression that happens to use one
of its terms with the wrong sign (the terms are correlated across merges -- OPT and STAB both move with
``eta K`` -- and ordinary least squares trades them off with opposite signs). ``method="ols"`` is the
unconstrained fit, reported alongside so that a sign the data want is visible. The intercept absorbs what the
bound does not model (the loss floor, the BatchNorm re-estimation's own cost); without it the constants have to
explain the level and the ranking at once (the old calibration zeroed ``c_stab`` this way). Standardising
makes the slopes comparable (each is the excess per standard deviation of its term) and the NNLS problem
well conditioned; the constants are reported in the terms' own units too.

**Held-out prediction** (:func:`leave_one_out`): leave-one-hyperparameter-out -- fit on the merges of every
sweep but one, predict the held-out sweep's merges; merges identical to a held-out one (the same experts, as
the default experts appear in several sweeps) are left out of that fit. The held-out predictions of all sweeps
are pooled and ranked against the measured excess (Spearman).

Pooling ranks predictions of *different* fits on one scale, so it also scores how well each fold's level
(intercept) and spread match the others'. When one sweep's terms lie far outside the rest (on the scaling
study the learning-rate sweep's STAB and HET reach 55 and 137 standard deviations of the other sweeps'), that
sweep sets the standardisation of every fold that contains it, the other sweeps' predictions spread by a few
hundredths while the folds' intercepts differ by tenths, and the pooled Spearman falls below every fold's own
(measured: folds 0.19-0.76, pooled 0.11; a one-term fit, which cannot reorder merges within a fold, falls from
the term's 0.52 to 0.13 pooled). Two *(derived)* variants are offered beside the plain form, never instead of it:

* ``form="log"``: the multiplicative form ``log excess = c0 + sum_k c_k log T_k`` (slopes >= 0 under NNLS;
  ``c_k`` are elasticities in the terms), fitted on log columns and mapped back with ``exp``. The terms are
  products of powers of the hyperparameters, so their logarithms are on one scale across sweeps. Merges with
  a non-positive excess cannot be fitted (they are still predicted); a non-positive term gives no prediction.
* ``offsets``: per-task intercepts. The form is per task and averaged over the N tasks, and each task has
  constants it does not model (its loss floor, the BatchNorm re-estimation's cost on it): ``excess_j = c0 +
  sum_t a_t w_jt + slopes . z_j`` with ``w_jt = 1/N_j`` when task ``t`` is in merge ``j``
  (:func:`task_offset_matrix`), ``a_t`` free. The offsets alone (no term, ``X`` with zero columns) are the
  baseline a fit with offsets must beat: otherwise the ranking comes from which tasks are merged, not from
  the bound. A merge containing a task with no training merge gets no prediction.

:func:`within_spearman` ranks inside clusters (e.g. merges of the same tasks) and averages: it scores the
bound on what hyperparameters do to one group of tasks, with the group's level removed.

**Intervals.** Merges of a study share tasks (groups of 4 of 6 tasks overlap), so they are not independent:
the independent unit is the task. Intervals are **delete-one-task jackknife** intervals
(:func:`task_jackknife`, through :func:`mergelab.analysis.statistics.jackknife`, which says why the jackknife
and not cluster-robust errors): replicate ``t`` recomputes the statistic (refitting everything) without any
merge that contains task ``t``; ``se = sqrt((T-1)/T sum_t (s_t - mean s)^2)`` and the interval is
``estimate +- t_{T-1, 0.975} se`` (Spearman's on Fisher's ``z = atanh(rho)`` scale, mapped back). With a
handful of tasks this is wide, as it should be. The percentile bootstrap over merges
(:func:`merge_bootstrap`) is reported beside it for reference; it treats overlapping merges as independent
and is therefore too narrow, and no verdict uses it.

**Elasticities** (:func:`elasticity`): within one sweep (the other hyperparameters fixed), the OLS slope of
``log excess`` on ``log x`` (``x`` = K, eta, n, b) or on ``N``, with its jackknife interval. The per-task
stability term predicts 1 for K, 2 for eta and -1 for n (:data:`PREDICTED_ELASTICITIES`); THEORY.md's
scaling laws predict the signs. :func:`verdict`: ``agrees`` only when the interval supports the prediction,
``disagrees`` when it excludes it, ``undecided`` otherwise. Merges with a non-positive excess have no
logarithm: they are dropped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

from mergelab.analysis.bound import FORM
from mergelab.analysis.excess_bound import EXCESS_TERMS, ExcessConstants
from mergelab.analysis.statistics import jackknife

FitMethod = Literal["nnls", "ols"]
FitForm = Literal["linear", "log"]

#: Predicted sign and value of d log(excess) / d log(x) per hyperparameter (``N``: d log(excess) / dN).
#: Values: the per-task stability term's elasticities (eta^2 K / n); signs: THEORY.md section 1's scaling laws
#: (b: "at small eta larger batches merge better"; N: "decline with more tasks").
PREDICTED_ELASTICITIES: dict[str, tuple[int, float | None]] = {
    "K": (1, 1.0), "eta": (1, 2.0), "n": (-1, -1.0), "b": (-1, None), "N": (1, None),
}

__all__ = [
    "Elasticity",
    "ExcessFit",
    "HeldOut",
    "Interval",
    "PREDICTED_ELASTICITIES",
    "elasticity",
    "fit_excess",
    "leave_one_out",
    "merge_bootstrap",
    "spearman",
    "task_jackknife",
    "task_offset_matrix",
    "within_spearman",
    "verdict",
]


# ------------------------------------------------------------------------------------------------ the fit
@dataclass(frozen=True)
class ExcessFit:
    """A fit of the excess-loss form (module docstring): ``standardized`` slopes (excess per standard deviation of
    each term), the ``constants`` in the terms' own units, the column ``means`` and ``scales`` used, ``r2``."""

    method: str
    intercept: float
    standardized: tuple[float, ...]
    means: tuple[float, ...]
    scales: tuple[float, ...]
    constants: ExcessConstants
    r2: float
    n: int
    terms: tuple[str, ...] = EXCESS_TERMS
    form: str = FORM
    #: per-offset-column coefficients (``()`` without offsets) and whether a column had any training weight
    offsets: tuple[float, ...] = ()
    offsets_seen: tuple[bool, ...] = ()

    def predict(self, X: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
        """``intercept + sum_t a_t w_t + sum_k standardized_k (x_k - mean_k) / scale_k`` for each row of ``X``
        (``w``: the rows' ``offsets`` columns, required when the fit has offsets; NaN for a row that puts weight
        on a column unseen in training)."""
        x = np.asarray(X, dtype=np.float64)
        x = x.reshape(len(x), len(self.means)) if x.ndim == 1 else x
        z = (x - np.array(self.means)) / np.array(self.scales)
        out = self.intercept + z @ np.array(self.standardized)
        if self.offsets:
            if offsets is None:
                raise ValueError("this fit has offsets: pass the rows' offset columns")
            w = np.asarray(offsets, dtype=np.float64).reshape(len(x), len(self.offsets))
            out = out + w @ np.array(self.offsets)
            unseen = ~np.array(self.offsets_seen)
            out[np.any(w[:, unseen] != 0, axis=1)] = math.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["constants"] = asdict(self.constants)
        return d


def fit_excess(X: np.ndarray, y: Sequence[float], *, method: FitMethod = "nnls",
               offsets: np.ndarray | None = None) -> ExcessFit:
    """Fit ``y ~ c0 + X c`` with a free intercept on standardised columns (module docstring).

    ``X``: ``[m, k]`` term values (columns :data:`~mergelab.analysis.excess_bound.EXCESS_TERMS` for the excess form;
    ``k = 0`` fits the intercept and offsets alone), ``y``: measured excess losses. ``method``: ``"nnls"`` (slopes
    >= 0) or ``"ols"``. ``offsets``: ``[m, p]`` nuisance columns with free coefficients (per-task intercepts,
    :func:`task_offset_matrix`): the slopes are fitted on ``X`` and ``y`` with ``[1, offsets]`` projected out
    (exact for least squares: the nuisance coefficients are then the least-squares fit to ``y - X c``, the
    minimum-norm one when the offsets span the constant).
    """
    x = np.asarray(X, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(t):
        raise ValueError(f"X must be [m, k] with one row per measured value: got {x.shape} and {t.shape}")
    if len(t) < 2:
        raise ValueError(f"need at least 2 merges to fit, got {len(t)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t))):
        raise ValueError("terms and measured excess losses must be finite")
    if method not in ("nnls", "ols"):
        raise ValueError(f"unknown method {method!r}; known: nnls, ols")
    w = None if offsets is None else np.asarray(offsets, dtype=np.float64)
    if w is not None and (w.ndim != 2 or len(w) != len(t) or not np.all(np.isfinite(w))):
        raise ValueError(f"offsets must be a finite [m, p] array with one row per merge, got shape {w.shape}")
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    const = sd <= 1e-12 * np.maximum(np.abs(mu), 1e-300)
    scale = np.where(const, 1.0, sd)
    z = (x - mu) / scale
    z[:, const] = 0.0
    nuisance = np.ones((len(t), 1)) if w is None else np.column_stack([np.ones(len(t)), w])

    def resid_of(v: np.ndarray) -> np.ndarray:
        return v - nuisance @ np.linalg.lstsq(nuisance, v, rcond=None)[0]

    zc, yc = resid_of(z), resid_of(t)
    if x.shape[1] == 0:
        beta = np.zeros(0)
    elif method == "nnls":
        beta, _ = optimize.nnls(zc, yc)
    else:
        beta = np.linalg.lstsq(zc, yc, rcond=None)[0]
    beta = np.where(const, 0.0, beta)
    nu = np.linalg.lstsq(nuisance, t - z @ beta, rcond=None)[0]
    intercept = float(nu[0])
    tc = t - t.mean()
    resid = t - nuisance @ nu - z @ beta
    ss = float(tc @ tc)
    r2 = 1.0 - float(resid @ resid) / ss if ss > 0 else math.nan
    c = beta / scale
    c0 = intercept - float(c @ mu)
    k = x.shape[1]
    consts = ExcessConstants(c0, *(float(v) for v in c)) if k == 3 else ExcessConstants(c0)
    return ExcessFit(method, intercept, tuple(float(v) for v in beta), tuple(float(v) for v in mu),
                     tuple(float(v) for v in scale), consts, r2, len(t),
                     terms=EXCESS_TERMS if k == 3 else tuple(f"x{i}" for i in range(k)),
                     offsets=() if w is None else tuple(float(v) for v in nu[1:]),
                     offsets_seen=() if w is None else tuple(bool(v) for v in np.any(w != 0, axis=0)))


def task_offset_matrix(memberships: Sequence[Sequence[str]],
                       tasks: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(W, tasks)`` with ``W[j, t] = 1 / N_j`` when task ``t`` is one of merge ``j``'s ``N_j`` tasks, else 0:
    the per-task-intercept columns of a form averaged over the merged tasks (module docstring).
    ``tasks``: the column order (default: sorted)."""
    names = tuple(sorted({t for ms in memberships for t in ms})) if tasks is None else tuple(tasks)
    col = {t: i for i, t in enumerate(names)}
    W = np.zeros((len(memberships), len(names)))
    for j, ms in enumerate(memberships):
        if not ms:
            raise ValueError(f"merge {j} has no tasks")
        for t in ms:
            W[j, col[t]] += 1.0 / len(ms)
    return W, names


def within_spearman(x: Sequence[float], y: Sequence[float], clusters: Sequence[Hashable]) -> float:
    """Mean over ``clusters`` of Spearman's correlation of ``x`` and ``y`` inside each cluster (clusters where it
    is undefined -- fewer than 3 finite pairs, no spread -- are skipped; NaN when none is left)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    c = list(clusters)
    if not (len(a) == len(b) == len(c)):
        raise ValueError("x, y and clusters must have one entry per merge")
    vals = []
    for name in dict.fromkeys(c):
        idx = np.array([i for i, v in enumerate(c) if v == name])
        r = spearman(a[idx], b[idx])
        if math.isfinite(r):
            vals.append(r)
    return float(np.mean(vals)) if vals else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation over the pairs where both are finite (NaN with fewer than 3 or no spread)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------ held out
@dataclass(frozen=True)
class HeldOut:
    """Leave-one-group-out predictions: ``predicted[j]`` is merge ``j``'s prediction by the fit that did not see
    its group; ``spearman`` over all of them pooled, ``per_group`` within each held-out group."""

    predicted: tuple[float, ...]
    spearman: float
    per_group: dict[str, float]
    fits: dict[str, ExcessFit]
    method: str
    fit_form: str = "linear"
    offsets: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"predicted": list(self.predicted), "spearman": self.spearman, "per_group": dict(self.per_group),
                "fits": {k: v.to_dict() for k, v in self.fits.items()}, "method": self.method, "form": FORM,
                "fit_form": self.fit_form, "offsets": self.offsets}


def leave_one_out(X: np.ndarray, y: Sequence[float], groups: Sequence[str], *,
                  keys: Sequence[Hashable] | None = None, method: FitMethod = "nnls", form: FitForm = "linear",
                  offsets: np.ndarray | None = None) -> HeldOut:
    """Fit on every group but one, predict the held-out group; pool the predictions (module docstring).

    ``groups[j]``: merge ``j``'s group (the hyperparameter swept); ``keys[j]``: its identity (merges with a key of
    the held-out group are left out of that fit). Rows with non-finite values get NaN predictions.
    ``form="log"``: fit ``log y`` on ``log X`` and predict ``exp`` of the fit (module docstring); ``offsets``:
    per-row nuisance columns with free coefficients (:func:`task_offset_matrix`).
    """
    if form not in ("linear", "log"):
        raise ValueError(f"unknown form {form!r}; known: linear, log")
    x = np.asarray(X, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"X must be [m, k], got shape {x.shape}")
    g = np.asarray([str(v) for v in groups])
    if not (len(x) == len(t) == len(g)):
        raise ValueError(f"X, y and groups must have one entry per merge: {len(x)}, {len(t)}, {len(g)}")
    w = None if offsets is None else np.asarray(offsets, dtype=np.float64)
    if w is not None and w.shape[:1] != (len(t),):
        raise ValueError(f"offsets must have one row per merge: got {w.shape}")
    ks = list(range(len(t))) if keys is None else list(keys)
    usable = np.all(np.isfinite(x), axis=1) & (True if w is None else np.all(np.isfinite(w), axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        if form == "log":
            usable &= np.all(x > 0, axis=1)
            xf = np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), math.nan)
            tf = np.where(t > 0, np.log(np.where(t > 0, t, 1.0)), math.nan)
        else:
            xf, tf = x, t
    trainable = usable & np.isfinite(tf)
    pred = np.full(len(t), math.nan)
    fits: dict[str, ExcessFit] = {}
    per: dict[str, float] = {}
    for name in sorted(set(g.tolist())):
        test = g == name
        held = {ks[j] for j in np.flatnonzero(test)}
        train = trainable & ~test & np.array([k not in held for k in ks])
        if train.sum() < 2:
            continue
        fit = fit_excess(xf[train], tf[train], method=method, offsets=None if w is None else w[train])
        fits[name] = fit
        idx = np.flatnonzero(test & usable)
        p = fit.predict(xf[idx], None if w is None else w[idx])
        pred[idx] = np.exp(p) if form == "log" else p
        per[name] = spearman(pred[idx], t[idx])
    return HeldOut(tuple(float(v) for v in pred), spearman(pred, t), per, fits, method, form, w is not None)


# ------------------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    """An estimate with its interval: ``kind`` says how it was computed; ``replicates`` the number used."""

    estimate: float
    low: float
    high: float
    se: float
    kind: str
    replicates: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_jackknife(statistic: Callable[[np.ndarray], float], memberships: Sequence[Sequence[str]], *,
                   level: float = 0.95, fisher_z: bool = False) -> Interval:
    """Delete-one-task jackknife interval of ``statistic(mask)`` (module docstring), computed by
    :func:`mergelab.analysis.statistics.jackknife` (the study's one jackknife).

    ``statistic`` takes a boolean mask over the merges and returns the statistic on those merges;
    ``memberships[j]`` are merge ``j``'s tasks. Replicate ``t`` masks out every merge containing task ``t``.
    ``fisher_z``: jackknife ``atanh`` of the statistic (for a correlation) and map the interval back with
    ``tanh``. A replicate that is not finite (or fewer than 2 tasks) gives a NaN interval: undecided.
    """
    member = [set(ms) for ms in memberships]
    tasks = sorted({t for ms in member for t in ms})

    def f(v: float) -> float:
        return math.atanh(max(min(v, 1 - 1e-12), -1 + 1e-12)) if fisher_z and math.isfinite(v) else v

    def stat(unit: Any) -> float:
        mask = np.array([unit is None or unit not in ms for ms in member], dtype=bool)
        return f(float(statistic(mask))) if mask.any() else math.nan

    est = jackknife(stat, tasks)
    lo, hi = est.interval(1.0 - level)
    back = math.tanh if fisher_z else (lambda v: v)
    value = math.tanh(est.value) if fisher_z and math.isfinite(est.value) else est.value
    kind = "delete-one-task jackknife" + (" (Fisher z)" if fisher_z else "")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Interval(value, math.nan, math.nan, est.se, kind, len(tasks))
    return Interval(value, back(lo), back(hi), est.se, kind, len(tasks))


def merge_bootstrap(statistic: Callable[[np.ndarray], float], m: int, *, replicates: int = 1000,
                    level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of ``statistic(index array)`` resampling the ``m`` merges with replacement.
    Treats merges as independent (they are not when they share tasks): for reference only (module docstring)."""
    rng = np.random.default_rng(seed)
    est = float(statistic(np.arange(m)))
    vals = [float(statistic(rng.integers(0, m, m))) for _ in range(replicates)]
    v = np.array([x for x in vals if math.isfinite(x)])
    if len(v) < 2:
        return Interval(est, math.nan, math.nan, math.nan, "bootstrap over merges (ignores task overlap)", len(v))
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), float(v.std(ddof=1)), "bootstrap over merges (ignores task overlap)",
                    len(v))


# ------------------------------------------------------------------------------------------ elasticities
def verdict(interval: Interval, sign: int, value: float | None = None) -> tuple[str, str]:
    """``(sign verdict, value verdict)``, each ``agrees`` / ``disagrees`` / ``undecided`` (``value``: ``"-"``
    when no value is predicted). Sign: agrees when the interval lies on the predicted side of 0, disagrees when
    it lies on the other side. Value: disagrees when the interval excludes it; agrees when it contains it and
    the sign is established; undecided otherwise. A NaN interval is undecided."""
    lo, hi = interval.low, interval.high
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided", "undecided" if value is not None else "-"
    on = lo > 0 if sign > 0 else hi < 0
    against = hi < 0 if sign > 0 else lo > 0
    s = "agrees" if on else ("disagrees" if against else "undecided")
    if value is None:
        return s, "-"
    tol = 1e-9 * max(1.0, abs(value))  # rounding of an exact fit
    if not lo - tol <= value <= hi + tol:
        return s, "disagrees"
    return s, "agrees" if on else "undecided"


@dataclass(frozen=True)
class Elasticity:
    """The slope of ``log excess`` on ``log x`` (or on ``x`` for N) within one sweep, its interval, the
    prediction and the verdicts (module docstring); ``dropped`` merges had a non-positive excess."""

    hyperparameter: str
    regressor: str
    slope: float
    interval: Interval
    predicted_sign: int
    predicted_value: float | None
    sign_verdict: str
    value_verdict: str
    n: int
    dropped: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = self.interval.to_dict()
        return d


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan
    xc = x - x.mean()
    return float(xc @ (y - y.mean()) / (xc @ xc))


def elasticity(hp: str, values: Sequence[float], excess: Sequence[float], memberships: Sequence[Sequence[str]],
               *, level: float = 0.95) -> Elasticity:
    """Elasticity of the excess loss along one sweep ``hp`` (module docstring), with its task-jackknife interval
    and the verdicts against :data:`PREDICTED_ELASTICITIES`."""
    if hp not in PREDICTED_ELASTICITIES:
        raise ValueError(f"unknown hyperparameter {hp!r}; known: {', '.join(PREDICTED_ELASTICITIES)}")
    v = np.asarray(values, dtype=np.float64)
    e = np.asarray(excess, dtype=np.float64)
    if not (len(v) == len(e) == len(memberships)):
        raise ValueError("values, excess and memberships must have one entry per merge")
    keep = np.isfinite(e) & (e > 0) & np.isfinite(v) & (v > 0)
    x = v[keep] if hp == "N" else np.log(v[keep])
    ly = np.log(e[keep])
    ms = [memberships[j] for j in np.flatnonzero(keep)]
    iv = task_jackknife(lambda mask: _slope(x[mask], ly[mask]), ms, level=level)
    sign, value = PREDICTED_ELASTICITIES[hp]
    sv, vv = verdict(iv, sign, value)
    return Elasticity(hp, "N" if hp == "N" else f"log {hp}", iv.estimate, iv, sign, value, sv, vv,
                      int(keep.sum()), int((~keep).sum()))
