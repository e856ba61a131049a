"""Statistical inference for the studies and comparisons: error bars and verdicts valid for how the data were
drawn. One implementation, used by the scaling-law study, ``mergelab compare`` and the report converters.

**Estimates.** An :class:`Estimate` is a value, its standard error and the degrees of freedom of the
reference t distribution (``inf``: normal). Its two-sided interval is ``value +- t_{df}(1 - alpha/2) se``;
it is *significant* at ``alpha`` when that interval excludes 0. A standard error that cannot be estimated
(one sample, a jackknife replicate that is undefined) is NaN, never 0, and a NaN standard error is never
significant: the verdict is *undecided*.

**Overlapping groups: the delete-one-unit jackknife** (:func:`jackknife`, :func:`contrast`). The scaling study
merges *groups of tasks* that share tasks (all 15 groups of 4 of 6 tasks): every group containing a task
carries that task's experts (and their fine-tuning luck), so the 15 merges are not 15 independent samples and
the classic ``sd / sqrt(15)`` understates the error (under a simulated null the old verdicts called an effect
67% of the time). The independent units are the *tasks*. Leaving task ``t`` out drops every group containing
it and recomputes the statistic on the rest, ``theta_(t)``; the jackknife variance is

    ``var = (n - 1) / n * sum_t (theta_(t) - mean_t theta_(t))^2``, ``df = n - 1``   (``n`` tasks).

Why the jackknife and not cluster-robust (sandwich) errors: with groups of 4 of 6 tasks *every* pair of groups
shares a task, so the multi-way cluster-robust variance (sum of residual products over pairs sharing a cluster)
is the square of the residuals' sum, identically 0; it needs many nearly-disjoint clusters. The per-value mean
over all ``C(n, k)`` groups is a U-statistic of order ``k`` in the tasks, and the delete-one jackknife is
the standard variance estimator for U-statistics (Arvesen 1969, "Jackknifing U-statistics", Ann. Math. Stat.
40), conservative in small samples (Efron & Stein 1981). It needs ``k <= n - 1``: a value whose only group
holds every task (N = n) has no replicate, so its error is NaN and any step to it is undecided.

**Seeds.** Fine-tuning seeds are nested within a (group, value) *cell*: :func:`level_means` first averages the
replicates (seeds) of a cell, then the cells of a value. The seed-to-seed spread of a task's experts is part of
what the task-level jackknife sees (a task's experts enter every group containing it), so no separate seed term
is added.

**Steps and verdicts** (:func:`step_contrasts`, :func:`significant_signs`): the difference between consecutive
grid values, on the cells present at both (paired) when they share cells, each tested at
``alpha / (number of steps)`` (Bonferroni), so the chance that a curve with no true trend shows *any*
significant step is at most ``alpha`` (family-wise, per hyperparameter). Default ``alpha = 0.05``.

**Paired comparisons of two methods on the same test examples** (:func:`paired_accuracy_test`). Every method is
evaluated on the same examples, so "A beats B" is judged on the per-example pairs. The statistic is the
difference of task-averaged accuracies ``D = (1/T) sum_t (acc_A,t - acc_B,t)``. Under H0 (A's and B's outcomes on
an example are exchangeable) only the discordant examples carry information and their signs are fair coin
flips: with equal test-set sizes ``D`` is a multiple of the pooled discordant difference ``b - c`` and the
p-value is McNemar's exact (binomial) test on the pooled counts (:func:`mcnemar_exact`; McNemar 1947); with
unequal sizes it is the same randomization test by Monte Carlo (fixed seed) over per-task binomial sign
flips. The interval is ``D +- z se`` with the stratified paired error ``se^2 = (1/T^2) sum_t s_t^2 / n_t``
(``s_t^2`` the sample variance of the per-example differences of task t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Default family-wise level of a verdict.
ALPHA = 0.05
#: Monte Carlo draws of the stratified randomization test (unequal test-set sizes).
PERMUTATION_DRAWS = 100_000

__all__ = [
    "ALPHA",
    "Estimate",
    "Observation",
    "PairedTest",
    "accuracy_difference",
    "contrast",
    "holm",
    "jackknife",
    "level_means",
    "mcnemar_exact",
    "mean_and_error",
    "paired_accuracy_test",
    "rank_correlation_test",
    "significant_signs",
    "step_contrasts",
]


# ------------------------------------------------------------------------------------------------ estimates
@dataclass(frozen=True)
class Estimate:
    """``value`` with standard error ``se`` (NaN: not estimable) and ``df`` degrees of freedom (``inf``: normal)."""

    value: float
    se: float
    df: float = math.inf

    def critical(self, alpha: float = ALPHA) -> float:
        """Two-sided critical value ``t_{df}(1 - alpha/2)`` (the normal's when ``df`` is infinite); NaN if df < 1."""
        if not self.df >= 1:
            return math.nan
        return float(stats.norm.ppf(1 - alpha / 2) if math.isinf(self.df) else stats.t.ppf(1 - alpha / 2, self.df))

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """``value -+ critical(alpha) * se`` (NaN, NaN when the error is not estimable)."""
        half = self.critical(alpha) * self.se
        if not math.isfinite(half) or not math.isfinite(self.value):
            return math.nan, math.nan
        return self.value - half, self.value + half

    def p_value(self) -> float:
        """Two-sided p-value of ``value = 0`` (t or normal reference); NaN when the error is not estimable."""
        if not (math.isfinite(self.value) and math.isfinite(self.se) and self.df >= 1):
            return math.nan
        if self.se == 0:
            return 1.0 if self.value == 0 else 0.0
        z = abs(self.value) / self.se
        return float(2 * (stats.norm.sf(z) if math.isinf(self.df) else stats.t.sf(z, self.df)))

    def sign(self, alpha: float = ALPHA) -> int:
        """+1 / -1 when the interval at ``alpha`` lies above / below 0, else 0 (undecided, NaN error included)."""
        lo, hi = self.interval(alpha)
        return 1 if lo > 0 else (-1 if hi < 0 else 0)


def mean_and_error(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and classic standard error ``sd / sqrt(n)`` (``ddof = 1``) of the finite ``values``, for *independent*
    samples. ``(nan, nan)`` without values; ``(x, nan)`` for one value: one sample has no error bar."""
    xs = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if xs.size == 0:
        return math.nan, math.nan
    if xs.size == 1:
        return float(xs[0]), math.nan
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(xs.size))


def jackknife(statistic: Callable[[Hashable | None], float], units: Sequence[Hashable]) -> Estimate:
    """Delete-one jackknife over ``units``: ``statistic(None)`` on all the data, ``statistic(u)`` with unit ``u``
    left out. ``se^2 = (n-1)/n sum_u (theta_(u) - mean theta_(.))^2``, ``df = n - 1`` (module docstring).
    The standard error is NaN with fewer than 2 units or when any replicate is not finite."""
    value = float(statistic(None))
    units = list(dict.fromkeys(units))
    n = len(units)
    if n < 2 or not math.isfinite(value):
        return Estimate(value, math.nan, max(n - 1, 0))
    reps = np.array([float(statistic(u)) for u in units], dtype=np.float64)
    if not np.all(np.isfinite(reps)):
        return Estimate(value, math.nan, n - 1)
    var = (n - 1) / n * float(np.sum((reps - reps.mean()) ** 2))
    return Estimate(value, math.sqrt(var), n - 1)


# ------------------------------------------------------------------------------ overlapping groups of units
@dataclass(frozen=True)
class Observation:
    """One measurement ``y`` at grid ``level`` in ``cell`` (e.g. a task group; replicates such as fine-tuning seeds
    share a cell), depending on the independent ``units`` (e.g. the group's tasks)."""

    units: frozenset[Hashable]
    level: Hashable
    cell: Hashable
    y: float


def _cells(observations: Iterable[Observation], drop: Hashable | None) -> dict[Hashable, dict[Hashable, float]]:
    """``{level: {cell: mean of its finite replicates}}`` over observations not depending on ``drop``."""
    acc: dict[Hashable, dict[Hashable, list[float]]] = {}
    for o in observations:
        if (drop is not None and drop in o.units) or not math.isfinite(o.y):
            continue
        acc.setdefault(o.level, {}).setdefault(o.cell, []).append(o.y)
    return {lv: {c: float(np.mean(ys)) for c, ys in cells.items()} for lv, cells in acc.items()}


def level_means(observations: Iterable[Observation], drop: Hashable | None = None) -> dict[Hashable, float]:
    """Per level, the mean over its cells of each cell's mean over replicates (cells depending on unit ``drop``
    left out)."""
    return {lv: float(np.mean(list(cells.values()))) for lv, cells in _cells(observations, drop).items()}


def _units(observations: Iterable[Observation]) -> list[Hashable]:
    seen: dict[Hashable, None] = {}
    for o in observations:
        if math.isfinite(o.y):
            for u in sorted(o.units, key=str):
                seen.setdefault(u, None)
    return list(seen)


def contrast(observations: Sequence[Observation], weights: Mapping[Hashable, float], *, paired: bool = True) -> Estimate:
    """``sum_level w_level * level_mean`` with its delete-one-unit jackknife error (module docstring).

    ``paired``: when the weighted levels share cells, only the cells present at all of them are used (the same
    groups at every value: a paired contrast). A replicate in which a weighted level has no cell left is
    undefined, and the error is then NaN."""
    obs = [o for o in observations if o.level in weights]
    if paired:
        by_level: dict[Hashable, set[Hashable]] = {}
        for o in obs:
            if math.isfinite(o.y):
                by_level.setdefault(o.level, set()).add(o.cell)
        common = set.intersection(*by_level.values()) if len(by_level) == len(weights) and by_level else set()
        if common:
            obs = [o for o in obs if o.cell in common]

    def statistic(drop: Hashable | None) -> float:
        means = level_means(obs, drop)
        if any(lv not in means for lv in weights):
            return math.nan
        return float(sum(w * means[lv] for lv, w in weights.items()))

    return jackknife(statistic, _units(obs))


def step_contrasts(observations: Sequence[Observation], levels: Sequence[Hashable]) -> list[Estimate]:
    """``level[i+1] - level[i]`` for consecutive ``levels`` (paired over shared cells), each with its jackknife
    error over units."""
    return [contrast(observations, {a: -1.0, b: 1.0}) for a, b in zip(levels, levels[1:])]


def significant_signs(estimates: Sequence[Estimate], alpha: float = ALPHA) -> list[int]:
    """Sign of each estimate whose interval at ``alpha / len(estimates)`` excludes 0 (Bonferroni: the chance that
    any of them is called when none is real is at most ``alpha``), 0 otherwise."""
    if not estimates:
        return []
    level = alpha / len(estimates)
    return [e.sign(level) for e in estimates]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): sorted ascending, ``p_(i) * (m - i)`` made monotone and
    capped at 1; rejecting where the adjusted value is below ``alpha`` keeps the family-wise error at ``alpha``.
    NaN counts as 1."""
    ps = [1.0 if not math.isfinite(p) else float(p) for p in p_values]
    m = len(ps)
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        running = max(running, min(1.0, ps[i] * (m - rank)))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------- paired method comparison
def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for ``b`` pairs where only the first is right and ``c`` where only the
    second is: the binomial test of ``b`` successes in ``b + c`` trials at 1/2, ``min(1, 2 P(X <= min(b, c)))``
    (1 when there are no discordant pairs)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of methods A and B on the same examples (:func:`paired_accuracy_test`)."""

    difference: float  # mean over tasks of acc_A - acc_B
    se: float
    p_value: float
    a_only: int  # examples only A got right (pooled over tasks)
    b_only: int  # examples only B got right
    n: int  # examples
    method: str  # "McNemar exact" or "stratified randomization (Monte Carlo)"

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        return Estimate(self.difference, self.se).interval(alpha)

    def verdict(self, alpha: float = ALPHA) -> bool | None:
        """True: A more accurate than B at ``alpha``; False: less accurate; None: not significant (undecided)."""
        if not (self.p_value < alpha):
            return None
        return self.difference > 0

    def describe(self, alpha: float = ALPHA) -> str:
        lo, hi = self.interval(alpha)
        return (f"paired difference {100 * self.difference:+.1f} points ({100 * (1 - alpha):.0f}% CI "
                f"{100 * lo:+.1f} to {100 * hi:+.1f}), p = {self.p_value:.3g} ({self.method}; {self.a_only} examples "
                f"only the first got right, {self.b_only} only the second, of {self.n})")


def paired_accuracy_test(a: Mapping[str, Sequence[bool] | np.ndarray], b: Mapping[str, Sequence[bool] | np.ndarray],
                         *, draws: int = PERMUTATION_DRAWS, seed: int = 0) -> PairedTest:
    """Paired test of task-averaged accuracy between two methods evaluated on the same examples (module
    docstring). ``a``, ``b``: ``{task: per-example correctness}`` on the same tasks, in the same example order."""
    if set(a) != set(b) or not a:
        raise ValueError(f"the two methods must be evaluated on the same tasks, got {sorted(a)} and {sorted(b)}")
    tasks = sorted(a)
    diffs, weights, disc, plus = [], [], [], []
    for t in tasks:
        x, y = np.asarray(a[t], dtype=bool), np.asarray(b[t], dtype=bool)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"task {t}: the two methods' outcomes differ in shape ({x.shape} vs {y.shape}) or are empty")
        d = x.astype(np.float64) - y.astype(np.float64)
        diffs.append(d)
        weights.append(1.0 / (len(tasks) * x.size))
        disc.append(int(np.count_nonzero(d)))
        plus.append(int(np.count_nonzero(d > 0)))
    diff = float(sum(w * d.sum() for w, d in zip(weights, diffs)))
    var = sum((d.var(ddof=1) / d.size if d.size > 1 else math.nan) / len(tasks) ** 2 for d in diffs)
    n_a, n_b = sum(plus), sum(disc) - sum(plus)
    if np.allclose(weights, weights[0]):
        p, how = mcnemar_exact(n_a, n_b), "McNemar exact"
    else:
        rng = np.random.default_rng(seed)
        w, m = np.array(weights), np.array(disc)
        k = rng.binomial(m, 0.5, size=(draws, len(tasks)))
        null = ((2 * k - m) * w).sum(axis=1)
        p = float((1 + np.count_nonzero(np.abs(null) >= abs(diff) - 1e-12)) / (draws + 1))
        how = "stratified randomization (Monte Carlo)"
    return PairedTest(diff, math.sqrt(var) if math.isfinite(var) else math.nan, p, n_a, n_b,
                      sum(d.size for d in diffs), how)


def accuracy_difference(a: Mapping[str, Sequence[bool] | np.ndarray], b: Mapping[str, Sequence[bool] | np.ndarray]) -> Estimate:
    """Difference of task-averaged accuracies ``mean_t acc_A,t - mean_t acc_B,t`` between two evaluations that are
    *not* on the same examples (e.g. different task sets), with the error of independent samples:
    ``se^2 = sum_t s_A,t^2 / (T_A^2 n_A,t) + sum_t s_B,t^2 / (T_B^2 n_B,t)`` (``s^2`` the sample variance of the
    per-example correctness), normal reference. Where the two share tasks their outcomes are positively
    correlated, so this error is conservative for them; use :func:`paired_accuracy_test` when they share all."""
    parts = []
    for side in (a, b):
        if not side:
            raise ValueError("an evaluation without tasks")
        xs = [np.asarray(v, dtype=np.float64) for v in side.values()]
        if any(x.size < 2 for x in xs):
            return Estimate(math.nan, math.nan)
        parts.append((float(np.mean([x.mean() for x in xs])),
                      sum(x.var(ddof=1) / x.size for x in xs) / len(xs) ** 2))
    return Estimate(parts[0][0] - parts[1][0], math.sqrt(parts[0][1] + parts[1][1]))


def rank_correlation_test(x: Sequence[float], y: Sequence[float], *, draws: int = 9_999,
                          seed: int = 0) -> tuple[float, float]:
    """Spearman's ``rho`` between ``x`` and ``y`` (independent units: one pair per unit) and its two-sided
    permutation p-value under the null of no association (``scipy.stats.permutation_test`` with
    ``permutation_type="pairings"``: the pairing of ``y`` with ``x`` is shuffled). With ``n! <= draws + 1`` the
    test enumerates every pairing and is exact; otherwise ``draws`` random pairings (seeded, reproducible) give
    ``p = (1 + #{|rho*| >= |rho|}) / (draws + 1)``. Non-finite pairs are dropped; fewer than 3 pairs, or a
    constant side, give ``(nan, nan)``: no test, undecided."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    ra, rb = stats.rankdata(a), stats.rankdata(b)

    def rho(u: np.ndarray, axis: int = -1) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        uc, vc = u - u.mean(axis=axis, keepdims=True), rb - rb.mean()
        return (uc * vc).sum(axis=axis) / np.sqrt((uc ** 2).sum(axis=axis) * (vc ** 2).sum())

    res = stats.permutation_test((ra,), rho, permutation_type="pairings", n_resamples=draws, vectorized=True,
                                 alternative="two-sided", random_state=np.random.default_rng(seed))
    return float(res.statistic), float(res.pvalue)
