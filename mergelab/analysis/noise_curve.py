"""The effective-noise curve of the bifurcation protocol: median merge gain per noise scale ``T``, errors valid
for the protocol's nested design, the critical point and the "critical middle" verdict (THEORY.md section 2).

**Design.** A *cell* is one constant-lr parent run (one setting of lr, B, momentum, ...). From each of its
``R`` branch checkpoints, ``P`` seed pairs of decayed children are merged, one gain per (branch point, seed
pair): a cell's gains form an ``R x P`` array (NaN where a merge failed). Gains of one branch point share the
parent's checkpoint and those of one cell its trajectory, so they are *not* ``R P`` independent samples;
cells (distinct parents) are independent of each other.

**Estimate.** The gain at a noise level ``T`` is the median of every finite gain of the cells at that ``T``
(the median is robust to a single broken merge; the brief of issue 13 asks for it).

**Error: a two-stage (hierarchical) bootstrap** (Davison & Hinkley 1997, section 3.8, "Hierarchical data"),
resampling the design's units where they are drawn: in each replicate and independently per cell, ``R``
branch points are drawn with replacement, then within each drawn branch point ``P`` seed pairs with
replacement; the replicate's level estimate is the median of the pooled draws. The level's standard error
is the replicates' standard deviation and its interval the percentile interval (``level``, default 95%), both
after the small-sample correction below.
Cells are fixed design points and are not resampled. A level with fewer than 2 finite gains has no error
(NaN): one sample never gets an error bar and any verdict needing it is undecided.

**Critical point** ``T*`` = the ``T`` of the largest median gain; its interval is the percentile interval of
``log10 T*`` over the bootstrap replicates (the argmax of each replicate's curve), reported with the share of
replicates whose argmax lies strictly inside the grid.

**Verdict "non-monotone with a critical middle"** (:func:`middle_test`): the statistic
``S = max(interior medians) - max(median at the lowest T, median at the highest T)``; under the null of a flat
curve the bootstrap deviations ``m*_r - m`` (replicate minus estimate, per level) reproduce the sampling error
of every level, so ``S*_r = max(interior deviations) - max(end deviations)`` is ``S``'s null distribution
*including the selection of the best interior level* (a max-type bootstrap test, Hall & Wilson 1991, "Two
guidelines for bootstrap hypothesis testing"); ``p = (1 + #{S*_r >= S}) / (reps + 1)``. The middle is
claimed (``True``) when ``S > 0`` and ``p < alpha``. The opposite, an end above every interior level
(``-S`` with its own max-type p-value ``p_edge``, the same null draws negated), *disagrees* (``False``: a
monotone or U-shaped curve) only at the stricter level ``alpha / 2``, because that side is less well calibrated
(each end pools fewer cells than the middle: 4-6% false "no" at ``p_edge < alpha`` under simulated flat curves,
2.3-5.3% at ``alpha / 2``). Anything else (or fewer than 3 levels, or a level without an error) is undecided
(``None``). Defaults: ``alpha = 0.05``, 2000 replicates, seed 0 (the bootstrap is reproducible). Under
simulated flat curves of the default design (5 levels of 1-2 cells, 3 branch points x 2 seed pairs,
branch-point effects 0 to 2x the seed-pair noise, 400 data sets of 400 replicates each) the middle is claimed
in 2.0-4.8% and disagreement in 2.3-5.3% of the data sets (tests/test_noise_study.py asserts <= 5% / <= 6%).

**Small-sample correction.** Resampling ``R`` branch points estimates their variance with the factor
``(R - 1) / R`` (the plug-in variance); with the protocol's few branch points that alone made the flat-curve
false-claim rate 7%. The replicates' deviations from the estimate are therefore scaled by ``sqrt(u / (u - 1))``,
``u`` the fewest top-stage units of the level's cells (branch points, or the gains of a cell with a single
branch point), as in the ``G / (G - 1)`` correction of cluster-robust variances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

ALPHA = 0.05
REPS = 2000
LEVEL = 0.95

CellGains = Sequence[Sequence[float]] | np.ndarray  # rows: branch points, columns: seed pairs


def as_cell(gains: CellGains) -> np.ndarray:
    """``gains`` as a float ``R x P`` array without the branch points whose gains are all missing (NaN)."""
    a = np.asarray(gains, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"a cell's gains must be branch points x seed pairs, got shape {a.shape}")
    return a[np.isfinite(a).any(axis=1)] if a.size else a.reshape(0, 1)


def resample_cell(gains: CellGains, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` two-stage bootstrap draws of one cell (module docstring): shape ``(reps, R * P)``."""
    a = as_cell(gains)
    r, p = a.shape
    if r == 0:
        return np.empty((reps, 0))
    rows = rng.integers(r, size=(reps, r))
    cols = rng.integers(p, size=(reps, r, p))
    return a[rows[:, :, None], cols].reshape(reps, r * p)


def pooled_median(cells: Sequence[CellGains]) -> float:
    """The median of every finite gain of ``cells`` (NaN when there is none)."""
    values = np.concatenate([as_cell(c).ravel() for c in cells]) if cells else np.empty(0)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def n_finite(cells: Sequence[CellGains]) -> int:
    return int(sum(np.isfinite(as_cell(c)).sum() for c in cells))


def top_units(cells: Sequence[CellGains]) -> int:
    """The fewest top-stage units of the resampling among ``cells``: a cell's branch points, or its gains when
    it has a single branch point (0 when no cell has a finite gain)."""
    counts = []
    for c in cells:
        a = as_cell(c)
        if a.shape[0] >= 2:
            counts.append(a.shape[0])
        elif a.shape[0] == 1 and np.isfinite(a).sum() >= 1:
            counts.append(int(np.isfinite(a).sum()))
    return min(counts) if counts else 0


def bootstrap_medians(cells: Sequence[CellGains], reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` bootstrap replicates of :func:`pooled_median` of ``cells`` (each cell resampled on its own)."""
    draws = np.concatenate([resample_cell(c, reps, rng) for c in cells], axis=1)
    out = np.full(reps, math.nan)
    ok = np.isfinite(draws).any(axis=1)
    if ok.any():
        out[ok] = np.nanmedian(draws[ok], axis=1)
    return out


@dataclass(frozen=True)
class LevelEstimate:
    """The median gain at one noise level with its bootstrap standard error and percentile interval."""

    T: float
    median: float
    se: float
    lo: float
    hi: float
    samples: int  # finite gains
    cells: int


@dataclass(frozen=True)
class NoiseCurve:
    """:func:`noise_curve`'s result (module docstring)."""

    levels: list[LevelEstimate]
    critical_T: float
    critical_lo: float
    critical_hi: float
    interior_share: float  # replicates whose argmax is strictly inside the grid
    p_middle: float
    p_edge: float
    agrees: bool | None
    reason: str
    reps: int
    alpha: float
    replicates: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.empty((0, 0)))

    def as_dict(self) -> dict[str, object]:
        """JSON-able summary (without the replicates)."""
        return {"levels": [vars(lv).copy() for lv in self.levels], "critical_T": self.critical_T,
                "critical_interval": [self.critical_lo, self.critical_hi], "interior_share": self.interior_share,
                "p_middle": self.p_middle, "p_edge": self.p_edge, "agrees": self.agrees, "reason": self.reason,
                "reps": self.reps, "alpha": self.alpha}


def max_type_p(statistic: float, null_draws: np.ndarray) -> float:
    """``(1 + #{draws >= statistic}) / (n + 1)`` over the finite null draws (NaN without any)."""
    d = null_draws[np.isfinite(null_draws)]
    if not d.size or not math.isfinite(statistic):
        return math.nan
    return float((1 + np.sum(d >= statistic)) / (d.size + 1))


def middle_test(medians: Sequence[float], replicates: np.ndarray, alpha: float = ALPHA) -> tuple[bool | None, float, float, str]:
    """``(agrees, p_middle, p_edge, reason)`` of the critical-middle verdict for the curve ``medians`` (levels in
    increasing ``T``) with bootstrap ``replicates`` of shape ``(reps, levels)`` (module docstring): ``True``
    claimed (``p_middle < alpha``), ``False`` disagreeing (``p_edge < alpha / 2``), ``None`` undecided."""
    m = np.asarray(medians, dtype=float)
    if m.size < 3:
        return None, math.nan, math.nan, f"{m.size} value(s) of T: a middle needs at least 3"
    if not np.isfinite(m).all():
        return None, math.nan, math.nan, "a value of T has no finite gain"
    dev = np.asarray(replicates, dtype=float) - m
    if dev.ndim != 2 or dev.shape[1] != m.size or not np.isfinite(dev).all() or not np.any(dev != 0):
        return None, math.nan, math.nan, "no bootstrap error (a value of T has fewer than 2 gains, or no spread)"
    s = float(m[1:-1].max() - max(m[0], m[-1]))
    s_null = dev[:, 1:-1].max(axis=1) - np.maximum(dev[:, 0], dev[:, -1])
    p_mid = max_type_p(s, s_null)
    p_edge = max_type_p(-s, -s_null)
    if s > 0 and p_mid < alpha:
        return True, p_mid, p_edge, f"the best interior T beats both ends by {s:+.4g} (max-type bootstrap p = {p_mid:.3g} < {alpha})"
    if s < 0 and p_edge < alpha / 2:
        return False, p_mid, p_edge, (f"no critical middle: an end of the grid beats every interior T by {-s:.4g} "
                                      f"(max-type bootstrap p = {p_edge:.3g} < alpha / 2 = {alpha / 2:g}, a monotone "
                                      "or U-shaped curve)")
    return None, p_mid, p_edge, (f"the middle's margin over the better end, {s:+.4g}, is within the error "
                                 f"(p = {p_mid:.3g} for a middle, {p_edge:.3g} for an end; alpha {alpha})")


def noise_curve(
    levels: Mapping[float, Sequence[CellGains]],
    reps: int = REPS,
    seed: int = 0,
    alpha: float = ALPHA,
    level: float = LEVEL,
) -> NoiseCurve:
    """Median gain per ``T`` with errors, the critical point with its interval, and the verdict (module
    docstring). ``levels`` maps each noise scale ``T > 0`` to the gains of its cells."""
    if not levels:
        raise ValueError("noise_curve needs at least one value of T")
    rng = np.random.default_rng(seed)
    ts = sorted(levels)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    ests, reps_cols = [], []
    for t in ts:
        cells = list(levels[t])
        med, n = pooled_median(cells), n_finite(cells)
        draws = bootstrap_medians(cells, reps, rng) if n >= 2 else np.full(reps, math.nan)
        units = top_units(cells)
        if n >= 2 and units >= 2:
            draws = med + (draws - med) * math.sqrt(units / (units - 1))
        se = float(np.std(draws, ddof=1)) if n >= 2 else math.nan
        lo, hi = (float(v) for v in np.percentile(draws, q)) if n >= 2 else (math.nan, math.nan)
        ests.append(LevelEstimate(T=float(t), median=med, se=se, lo=lo, hi=hi, samples=n, cells=len(cells)))
        reps_cols.append(draws)
    boot = np.stack(reps_cols, axis=1)
    medians = [e.median for e in ests]
    finite = [i for i, v in enumerate(medians) if math.isfinite(v)]
    critical = ts[max(finite, key=lambda i: medians[i])] if finite else math.nan
    crit_lo = crit_hi = share = math.nan
    ok = np.isfinite(boot).all(axis=1)
    if ok.any() and len(ts) >= 2:
        arg = np.argmax(boot[ok], axis=1)
        logs = np.log10(np.asarray(ts, dtype=float))[arg]
        crit_lo, crit_hi = (float(10**v) for v in np.percentile(logs, q))
        share = float(np.mean((arg > 0) & (arg < len(ts) - 1)))
    agrees, p_mid, p_edge, reason = middle_test(medians, boot, alpha)
    return NoiseCurve(levels=ests, critical_T=float(critical), critical_lo=crit_lo, critical_hi=crit_hi,
                      interior_share=share, p_middle=p_mid, p_edge=p_edge, agrees=agrees, reason=reason, reps=reps,
                      alpha=alpha, replicates=boot)


def cell_estimate(gains: CellGains, reps: int = REPS, seed: int = 0, level: float = LEVEL) -> LevelEstimate:
    """One cell's median gain with its two-stage bootstrap error (``T`` left NaN)."""
    return replace(noise_curve({1.0: [gains]}, reps=reps, seed=seed, level=level).levels[0], T=math.nan)
