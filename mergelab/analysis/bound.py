"""The stability bound for merging heterogeneous experts *(derived)* and its scaling-law predictions.

Everything in this module is **(derived)**: the framework paper (Li, Tang et al., "A Unified Generalization
Framework for Model Merging", arXiv 2601.21690) states the dependencies; the exact constants and the way the
pieces are combined below are our own derivation from them (THEORY.md section 1). Reports carry
``"form": "derived"``. The two scale constants ``c_opt`` and ``c_stab`` are meant to be calibrated against
measured merged-model losses (:mod:`mergelab.analysis.calibration`).

Notation: expert ``i`` of ``N`` has ``n_i`` training samples (``n = sum n_i``, ``p_i = n_i / n``), ``K_i``
steps, batch size ``b_i``, base learning rate ``lr_i``, momentum ``beta_i``; merge weights ``alpha_i`` (``1/N``
for averaging, ``lambda`` for task arithmetic ``theta_0 + lambda sum tau_i``), ``a_i = alpha_i / sum_j alpha_j``.
Measured at theta_0 (:mod:`mergelab.analysis.estimators`): ``L`` (smoothness), ``sigma_i^2`` (per-sample gradient
variance), ``delta_i^2 = ||grad F_i - grad F||^2``, ``F0_i = F_{S_i}(theta_0)``.

**Learning rate actually applied.** ``eta_i = lr_i / (1 - beta_i)`` for SGD with heavy-ball momentum (the
stationary step of heavy-ball SGD; ``heavy_ball=False`` uses ``lr_i``); Adam/AdamW keep ``lr_i`` and are flagged
(the SGD analysis does not cover per-coordinate normalisation). A schedule ``lr_t = eta_i f(t)`` enters through
``m1_i = mean_t f(t)`` and ``m2_i = mean_t f(t)^2`` (cosine to 0: 1/2 and 3/8): the accumulated step
``S1_i = sum_t eta_t = eta_i K_i m1_i`` replaces ``eta K`` and the accumulated squared step
``S2_i = sum_t eta_t^2 = eta_i^2 K_i m2_i`` replaces ``eta^2 K`` (constant schedule: ``m1 = m2 = 1``).

**Stability / generalisation** (Lei & Ying 2020, Thm 2; THEORY.md):

* per expert: ``eps_i^2 = e * S2_i * (sigma_i^2 + b_i delta_i^2) / n_i``, valid under ``eta_i <= 1/(L K_i)``
  (experts with ``eta_i L K_i > 1`` are flagged ``valid = False``);
* merged: replacing sample ``j`` of task ``i`` moves only expert ``i``, so ``x_avg - x_avg' = alpha_i (x_i - x_i')``
  and ``eps_avg^2 = sum_i p_i alpha_i^2 eps_i^2``;
* for a nonnegative L-smooth loss and any ``gamma > 0``:
  ``gen <= (L / gamma) F + ((L + gamma) / 2) eps^2`` with ``F = E[F_S(x_avg)]``. Minimising over gamma:
  ``d/dgamma = -L F / gamma^2 + eps^2 / 2 = 0`` gives ``gamma* = sqrt(2 L F / eps^2)`` and
  ``gen* = eps sqrt(2 L F) + L eps^2 / 2`` (``F = 0``: ``gamma* -> 0``, ``gen* = L eps^2 / 2``).
  ``F`` is the merged model's training loss; unless it is measured (``train_loss=``) we use the bound's own
  proxy for it, the optimisation term ``opt`` below (taking ``F_S* = 0`` for a nonnegative loss).

**Optimisation** (after FedNova, Wang et al. 2020, Thm 1-2: the merge as one round of heterogeneous local SGD):

* effective weights ``w_i = a_i S1_i / sum_j a_j S1_j`` (= ``alpha_i eta_i K_i / sum_j alpha_j eta_j K_j`` for a
  constant schedule) and ``chi^2(a || w) = sum_i (a_i - w_i)^2 / w_i``;
* ``opt = F0 / sqrt(N * P) + L * sum_i a_i^2 (S1_i / K_i) sigma_i^2 / b_i + chi^2(a || w) * D`` with
  ``F0 = sum_i p_i F0_i``, ``P = sum_i a_i S1_i`` (= ``eta_bar K_bar``), ``D = sum_i p_i delta_i^2``.
  The first term is THEORY's ``1/sqrt(N eta Kbar)`` decay (FedNova's ``(F(x_0) - F_inf) / sqrt(m tau T)``
  with the initial loss as numerator), the second FedNova's minibatch-noise term ``eta L sigma^2 A / m``
  (``A = 1`` for equal weights), the third the objective-inconsistency cost of Theorem 2. The three
  sub-terms are combined with unit weights (one calibrated constant for the whole term); FedNova's
  client-drift terms in ``eta^2 L^2 (K - 1)`` are not included.

**Bound**: ``bound = c_opt * opt + c_stab * gen*``; with ``c_opt = c_stab = 1`` it is the excess-risk bound
``E F(x_avg) - F* <= opt + gen*`` as derived. The constants multiply whole terms, so the bound is linear in
them (non-negative least squares calibrates them exactly).

**Where N enters: the excess-loss form** *(derived; THEORY.md section 1, "Where N enters")*. Written as above,
every term carries ``alpha_i^2`` or ``1/sqrt(N)`` and, with identical hyperparameters, ``chi^2 = 0`` removes the
heterogeneity: for ``alpha_i = 1/N`` the bound can only *fall* with ``N``, whatever its non-negative constants,
opposite to the paper ("heterogeneity penalties accumulate at least linearly with N") and to measurement. The
scaling study therefore fits, per task and averaged over the ``N`` tasks, the **excess** loss of the merge over
each expert on its own task (:data:`EXCESS_FORMULA`):

* ``STAB = (1/N) sum_i eps_i^2`` (:func:`stability_term`): per-task stability, linear in ``K``, quadratic in
  ``eta``, ``~1/n``, ``b`` on the heterogeneity part, flat in ``N`` for identical experts;
* ``OPT`` (:func:`optimization_term`): ``opt`` above, falling slowly with ``N``;
* ``HET = (1/N) sum_i (L_i/2) ||T(tau_i) - mean_j T(tau_j)||^2`` (:func:`heterogeneity_term`): the merge's
  second-order interference on each task, the task vectors' dispersion around their mean after the merge's
  operator ``T`` (:func:`merge_operator_vectors`; identity for averaging and task arithmetic), so Corollary 1's
  shrinkage under TIES/DARE enters; ``(1 - 1/N) r^2 L/2`` for orthogonal task vectors of norm ``r``: it grows
  with ``N``.

``excess ~ c0 + c_opt OPT + c_stab STAB + c_het HET`` (:func:`excess_bound`); the constants are fitted with an
intercept on standardised columns (:mod:`mergelab.analysis.bound_fit`). The form above (:func:`evaluate_bound`)
is kept for the pool report, the calibration study and :func:`recommend`, which rank pools of fixed ``N``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from mergelab.methods.catalog import METHODS

log = logging.getLogger(__name__)

FORM = "derived"
SOURCE = "THEORY.md section 1; Lei & Ying 2020; Wang et al. 2020 (FedNova); arXiv 2601.21690"
BOUND_FORMULA = (
    "(derived) bound = c_opt * opt + c_stab * gen;  "
    "eps_i^2 = e * S2_i * (sigma_i^2 + b_i * delta_i^2) / n_i  [S2_i = eta_i^2 K_i m2_i, valid iff eta_i <= 1/(L K_i)];  "
    "eps^2 = sum_i (n_i/n) alpha_i^2 eps_i^2;  "
    "gen = min_gamma (L/gamma) F + ((L+gamma)/2) eps^2 = eps*sqrt(2 L F) + L eps^2/2, gamma* = sqrt(2 L F / eps^2), F = opt unless measured;  "
    "opt = F0 / sqrt(N * P) + L * sum_i a_i^2 (S1_i/K_i) sigma_i^2 / b_i + chi^2(a||w) * D  "
    "[a = alpha/sum alpha, S1_i = eta_i K_i m1_i, w_i = a_i S1_i / sum_j a_j S1_j, P = sum_i a_i S1_i, "
    "F0 = sum_i (n_i/n) F_{S_i}(theta_0), D = sum_i (n_i/n) delta_i^2]"
)
HYPERPARAMETERS = ("K", "eta", "b", "n", "N")
DEFAULT_FACTORS: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 5))  # 0.25 .. 4, 9 points

MergeRule = Literal["mean", "task_arithmetic", "weighted"]

__all__ = [
    "BOUND_FORMULA",
    "BoundConstants",
    "BoundExpert",
    "BoundPool",
    "BoundReport",
    "BoundTrend",
    "DEFAULT_FACTORS",
    "EXCESS_FORMULA",
    "EXCESS_TERMS",
    "ExcessConstants",
    "ExcessTerms",
    "MERGE_OPERATORS",
    "MergeRecommendation",
    "bound_table",
    "chi2_divergence",
    "classify_shape",
    "effective_weights",
    "evaluate_bound",
    "generalization_term",
    "dispersion_from_gram",
    "excess_bound",
    "excess_terms",
    "heterogeneity_term",
    "merge_operator_vectors",
    "merged_stability",
    "optimization_term",
    "per_expert_stability",
    "predict_trends",
    "recommend",
    "schedule_moments",
    "stability_term",
    "task_vector_dispersion",
]


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def schedule_moments(steps: int, schedule: str = "constant", warmup_frac: float = 0.0, decay_frac: float = 0.2,
                     min_lr_ratio: float = 0.0) -> tuple[float, float]:
    """``(m1, m2) = (mean_t f(t), mean_t f(t)^2)`` of the training module's learning-rate schedule factor."""
    from mergelab.training.schedule import lr_factor

    f = np.array([lr_factor(t, steps, schedule, warmup_frac, decay_frac, min_lr_ratio) for t in range(steps)])
    return float(f.mean()), float((f * f).mean())


@dataclass(frozen=True)
class BoundExpert:
    """One expert as the bound sees it: hyperparameters and measured statistics at theta_0.

    ``lr`` is the base (peak) learning rate, ``momentum`` the SGD momentum (Adam's beta1 for Adam/AdamW),
    ``lr_factor_mean``/``lr_factor_sq_mean`` the schedule moments ``m1``/``m2`` (module docstring), ``n`` the
    training-set size ``n_i``, ``data_ratio`` the fraction of the task's data it is (caps recommendations),
    ``alpha`` its merge weight for the ``"weighted"`` rule.
    """

    name: str
    lr: float
    steps: float
    batch_size: float
    n: float
    sigma2: float
    delta2: float
    init_loss: float
    momentum: float = 0.0
    optimizer: str = "sgd"
    lr_factor_mean: float = 1.0
    lr_factor_sq_mean: float = 1.0
    data_ratio: float = 1.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        for f in ("lr", "steps", "batch_size", "n"):
            v = getattr(self, f)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"expert {self.name!r}: {f} must be positive and finite, got {v}")
        for f in ("sigma2", "delta2", "init_loss"):
            v = getattr(self, f)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"expert {self.name!r}: {f} must be nonnegative and finite, got {v}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"expert {self.name!r}: momentum must be in [0, 1), got {self.momentum}")

    def eta(self, heavy_ball: bool = True) -> float:
        """Peak learning rate actually applied: ``lr / (1 - momentum)`` for heavy-ball SGD, else ``lr``."""
        if heavy_ball and self.optimizer == "sgd":
            return self.lr / (1.0 - self.momentum)
        return self.lr

    def scaled(self, hyperparameter: str, factor: float) -> BoundExpert:
        """A copy with ``K``, ``eta`` (the base lr), ``b`` or ``n`` (and the data ratio) multiplied by ``factor``."""
        if hyperparameter == "K":
            return replace(self, steps=self.steps * factor)
        if hyperparameter == "eta":
            return replace(self, lr=self.lr * factor)
        if hyperparameter == "b":
            return replace(self, batch_size=self.batch_size * factor)
        if hyperparameter == "n":
            return replace(self, n=self.n * factor, data_ratio=self.data_ratio * factor)
        raise ValueError(f"unknown hyperparameter {hyperparameter!r}; per-expert ones: K, eta, b, n")

    @classmethod
    def from_expert(cls, expert: Any, *, sigma2: float, delta2: float, init_loss: float, n: float | None = None,
                    alpha: float | None = None, name: str | None = None) -> BoundExpert:
        """From an :class:`~mergelab.training.ExpertResult` (or an ``ExpertSpec`` plus ``n``) and measurements."""
        spec = getattr(expert, "spec", expert)
        n_train = n if n is not None else getattr(expert, "n_train", None)
        if n_train is None:
            raise ValueError("from_expert needs n (the training-set size) when given a spec")
        m1, m2 = schedule_moments(int(spec.steps), spec.schedule, spec.warmup_frac, spec.decay_frac, spec.min_lr_ratio)
        return cls(
            name=name or f"{spec.task}",
            lr=float(spec.lr),
            steps=float(spec.steps),
            batch_size=float(spec.batch_size),
            n=float(n_train),
            sigma2=float(sigma2),
            delta2=float(delta2),
            init_loss=float(init_loss),
            momentum=float(spec.momentum),
            optimizer=str(spec.optimizer),
            lr_factor_mean=m1,
            lr_factor_sq_mean=m2,
            data_ratio=float(spec.data_ratio),
            alpha=alpha,
        )


@dataclass(frozen=True)
class BoundPool:
    """A pool of experts to merge, the smoothness ``L`` and the merge rule.

    ``merge``: ``"mean"`` (``alpha_i = 1/N``), ``"task_arithmetic"`` (``alpha_i = lam``) or ``"weighted"``
    (each expert's ``alpha``). ``gram`` (optional) is the Gram matrix of the task gradients at theta_0
    (:class:`~mergelab.analysis.estimators.HeterogeneityResult`); when present, sub-pools and enlarged pools
    in :func:`predict_trends` recompute ``delta_i^2`` from it instead of keeping the measured values.
    """

    experts: tuple[BoundExpert, ...]
    smoothness: float
    merge: MergeRule = "mean"
    lam: float = 1.0
    gram: np.ndarray | None = field(default=None, repr=False, compare=False)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("a pool needs at least one expert")
        if not (self.smoothness > 0 and math.isfinite(self.smoothness)):
            raise ValueError(f"smoothness L must be positive and finite, got {self.smoothness}")
        if self.merge not in ("mean", "task_arithmetic", "weighted"):
            raise ValueError(f"unknown merge rule {self.merge!r}")
        if self.merge == "weighted" and any(e.alpha is None for e in self.experts):
            raise ValueError("merge='weighted' needs every expert's alpha")
        if self.gram is not None and np.shape(self.gram) != (len(self.experts), len(self.experts)):
            raise ValueError(f"gram must be [N, N] = [{len(self.experts)}] * 2, got {np.shape(self.gram)}")

    @property
    def size(self) -> int:
        return len(self.experts)

    def alphas(self) -> np.ndarray:
        """The merge weights ``alpha_i`` under the pool's rule."""
        n = len(self.experts)
        if self.merge == "mean":
            return np.full(n, 1.0 / n)
        if self.merge == "task_arithmetic":
            return np.full(n, float(self.lam))
        return np.array([float(e.alpha) for e in self.experts])  # type: ignore[arg-type]

    def with_experts(self, experts: Sequence[BoundExpert], gram: np.ndarray | None = None) -> BoundPool:
        return replace(self, experts=tuple(experts), gram=gram)

    def scaled(self, hyperparameter: str, factor: float) -> BoundPool:
        """Every expert's ``K``/``eta``/``b``/``n`` multiplied by ``factor`` (statistics at theta_0 unchanged)."""
        return replace(self, experts=tuple(e.scaled(hyperparameter, factor) for e in self.experts))

    @classmethod
    def from_measurement(cls, measurement: Any, experts: Sequence[Any], *, merge: MergeRule = "mean", lam: float = 1.0,
                         alphas: Sequence[float] | None = None, name: str = "") -> BoundPool:
        """From a :class:`~mergelab.analysis.estimators.PoolMeasurement` and the matching experts
        (``ExpertResult``s, in the same order as the measured tasks)."""
        if len(experts) != len(measurement.tasks):
            raise ValueError(f"{len(experts)} experts for {len(measurement.tasks)} measured tasks")
        stats = [
            BoundExpert.from_expert(e, sigma2=t.sigma2, delta2=d, init_loss=t.init_loss, n=t.n, name=t.name,
                                    alpha=None if alphas is None else float(alphas[i]))
            for i, (e, t, d) in enumerate(zip(experts, measurement.tasks, measurement.delta2))
        ]
        return cls(tuple(stats), float(measurement.smoothness), merge, lam, np.asarray(measurement.heterogeneity.gram), name)


@dataclass(frozen=True)
class BoundConstants:
    """Scale constants of the two terms: ``bound = c_opt * opt + c_stab * gen`` *(derived)*."""

    c_opt: float = 1.0
    c_stab: float = 1.0


# ---------------------------------------------------------------------------------------------------------
# formula pieces
# ---------------------------------------------------------------------------------------------------------
def per_expert_stability(eta: float, steps: float, sigma2: float, delta2: float, batch_size: float, n: float,
                         sq_factor: float = 1.0) -> float:
    """*(derived)* ``eps_i^2 = e * eta^2 * K * m2 * (sigma^2 + b * delta^2) / n`` (THEORY.md section 1)."""
    return math.e * eta * eta * steps * sq_factor * (sigma2 + batch_size * delta2) / n


def merged_stability(eps2: Sequence[float], alphas: Sequence[float], n: Sequence[float]) -> float:
    """*(derived)* ``eps_avg^2 = sum_i (n_i / n) alpha_i^2 eps_i^2`` with ``n = sum_i n_i``."""
    e, a, c = (np.asarray(v, dtype=np.float64) for v in (eps2, alphas, n))
    if not (e.shape == a.shape == c.shape):
        raise ValueError("eps2, alphas and n must have the same length")
    return float(np.sum(c / c.sum() * a * a * e))


def generalization_term(smoothness: float, train_loss: float, eps2: float) -> tuple[float, float]:
    """``(gen*, gamma*)``: ``min_gamma (L/gamma) F + ((L+gamma)/2) eps^2`` (Lei & Ying 2020, Thm 2).

    ``gamma* = sqrt(2 L F / eps^2)``, ``gen* = eps sqrt(2 L F) + L eps^2 / 2``. Edge cases: ``eps^2 = 0``
    gives ``gen* = 0`` (``gamma* = inf``); ``F = 0`` gives ``gen* = L eps^2 / 2`` (``gamma* = 0``, the infimum).
    """
    L, F, e2 = float(smoothness), max(float(train_loss), 0.0), max(float(eps2), 0.0)
    if e2 == 0.0:
        return 0.0, math.inf
    gamma = math.sqrt(2.0 * L * F / e2)
    return math.sqrt(e2) * math.sqrt(2.0 * L * F) + 0.5 * L * e2, gamma


def effective_weights(alphas: Sequence[float], progress: Sequence[float]) -> np.ndarray:
    """FedNova effective weights ``w_i = alpha_i S1_i / sum_j alpha_j S1_j`` (``S1_i = eta_i K_i`` for a constant
    schedule): the surrogate objective ``sum_i w_i F_i`` that heterogeneous local progress actually optimises."""
    a, s = np.asarray(alphas, dtype=np.float64), np.asarray(progress, dtype=np.float64)
    if np.any(a < 0) or np.any(s <= 0) or a.sum() <= 0:
        raise ValueError("effective_weights needs nonnegative alphas (not all 0) and positive progress")
    w = a * s
    return w / w.sum()


def chi2_divergence(alphas: Sequence[float], weights: Sequence[float]) -> float:
    """``chi^2(alpha || w) = sum_i (alpha_i - w_i)^2 / w_i`` (alpha normalised to sum 1 first; FedNova Thm 2)."""
    a, w = np.asarray(alphas, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if a.shape != w.shape or np.any(w <= 0) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError("chi2_divergence needs same-length nonnegative alphas and positive weights")
    a = a / a.sum()
    w = w / w.sum()
    chi2 = float(np.sum((a - w) ** 2 / w))
    return 0.0 if chi2 < 1e-12 else chi2  # alpha == w up to rounding


# ---------------------------------------------------------------------------------------------------------
# the bound
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundReport:
    """The bound for one pool and every intermediate quantity *(derived)*; ``to_dict()`` has ``"form": "derived"``."""

    bound: float
    raw_bound: float
    opt: float
    gen: float
    eps2: float
    gamma_star: float
    train_loss: float
    train_loss_source: str
    opt_init: float
    opt_var: float
    opt_het: float
    chi2: float
    alphas: tuple[float, ...]
    weights: tuple[float, ...]
    progress: float
    init_loss: float
    heterogeneity: float
    smoothness: float
    experts: tuple[dict[str, Any], ...]
    constants: BoundConstants
    all_valid: bool
    form: str = FORM
    formula: str = BOUND_FORMULA
    source: str = SOURCE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["constants"] = asdict(self.constants)
        d["experts"] = [dict(e) for e in self.experts]
        return d


def evaluate_bound(pool: BoundPool, constants: BoundConstants | None = None, *, train_loss: float | None = None,
                   heavy_ball: bool = True) -> BoundReport:
    """Evaluate the *(derived)* bound of the module docstring on ``pool``.

    Args:
        constants: scale constants (default ``c_opt = c_stab = 1``: the raw derived bound).
        train_loss: the merged model's measured training loss ``F_S(x_avg)`` for the generalisation term; by
            default the optimisation term ``opt`` stands in for it.
        heavy_ball: use ``lr / (1 - momentum)`` as the SGD learning rate (module docstring).
    """
    c = constants or BoundConstants()
    L = float(pool.smoothness)
    ex = pool.experts
    N = len(ex)
    alphas = pool.alphas()
    if np.any(alphas < 0) or alphas.sum() <= 0:
        raise ValueError("the bound needs nonnegative merge weights with a positive sum")
    a = alphas / alphas.sum()
    n = np.array([e.n for e in ex])
    p = n / n.sum()
    eta = np.array([e.eta(heavy_ball) for e in ex])
    K = np.array([e.steps for e in ex])
    b = np.array([e.batch_size for e in ex])
    s2 = np.array([e.sigma2 for e in ex])
    d2 = np.array([e.delta2 for e in ex])
    f0 = np.array([e.init_loss for e in ex])
    m1 = np.array([e.lr_factor_mean for e in ex])
    m2 = np.array([e.lr_factor_sq_mean for e in ex])
    S1 = eta * K * m1
    eps_i = np.array([per_expert_stability(eta[i], K[i], s2[i], d2[i], b[i], n[i], m2[i]) for i in range(N)])
    ratio = eta * L * K
    valid = ratio <= 1.0
    eps2 = merged_stability(eps_i, alphas, n)
    w = effective_weights(a, S1)
    chi2 = chi2_divergence(a, w)
    P = float(np.sum(a * S1))
    F0 = float(np.sum(p * f0))
    D = float(np.sum(p * d2))
    opt_init = F0 / math.sqrt(N * P)
    opt_var = L * float(np.sum(a * a * (S1 / K) * s2 / b))
    opt_het = chi2 * D
    opt = opt_init + opt_var + opt_het
    F = opt if train_loss is None else float(train_loss)
    gen, gamma = generalization_term(L, F, eps2)
    experts = tuple(
        {
            "name": e.name,
            "eta": float(eta[i]),
            "steps": float(K[i]),
            "batch_size": float(b[i]),
            "n": float(n[i]),
            "alpha": float(alphas[i]),
            "weight_w": float(w[i]),
            "eps2": float(eps_i[i]),
            "eta_L_K": float(ratio[i]),
            "valid": bool(valid[i]),
            "optimizer": e.optimizer,
            "note": "" if e.optimizer == "sgd" else f"{e.optimizer}: SGD-based bound applied with eta = lr (approximation)",
        }
        for i, e in enumerate(ex)
    )
    if not valid.all():
        log.info("(derived bound) %d of %d experts violate eta <= 1/(L K)", int((~valid).sum()), N)
    return BoundReport(
        bound=c.c_opt * opt + c.c_stab * gen,
        raw_bound=opt + gen,
        opt=opt,
        gen=gen,
        eps2=eps2,
        gamma_star=gamma,
        train_loss=F,
        train_loss_source="opt (proxy)" if train_loss is None else "measured",
        opt_init=opt_init,
        opt_var=opt_var,
        opt_het=opt_het,
        chi2=chi2,
        alphas=tuple(float(x) for x in alphas),
        weights=tuple(float(x) for x in w),
        progress=P,
        init_loss=F0,
        heterogeneity=D,
        smoothness=L,
        experts=experts,
        constants=c,
        all_valid=bool(valid.all()),
    )


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
        from mergelab.analysis.estimators import heterogeneity_from_gram

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


def _typical_expert(pool: BoundPool) -> BoundExpert:
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
    target = expert or _typical_expert(pool)
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


def bound_table(pools: Mapping[str, BoundPool], constants: BoundConstants | None = None) -> list[dict[str, Any]]:
    """One row per named pool: the bound and its terms *(derived)*."""
    rows = []
    for name, pool in pools.items():
        r = evaluate_bound(pool, constants)
        rows.append({"pool": name, "bound": r.bound, "opt": r.opt, "gen": r.gen, "eps2": r.eps2, "chi2": r.chi2,
                     "all_valid": r.all_valid, "form": FORM})
    return rows


# ---------------------------------------------------------------------------------------------------------
# the excess-loss form (THEORY.md section 1, "Where N enters") *(derived)*
# ---------------------------------------------------------------------------------------------------------
EXCESS_FORMULA = (
    "(derived) excess = c0 + c_opt * OPT + c_stab * STAB + c_het * HET;  "
    "STAB = (1/N) sum_i eps_i^2, eps_i^2 = e * eta_i^2 K_i m2_i (sigma_i^2 + b_i delta_i^2) / n_i;  "
    "OPT = F0 / sqrt(N sum_i a_i S1_i) + L sum_i a_i^2 (S1_i / K_i) sigma_i^2 / b_i + chi^2(a||w) D;  "
    "HET = (1/N) sum_i (L_i / 2) ||T(tau_i) - (1/N) sum_j T(tau_j)||^2  "
    "[T: the merge's operator on task vectors (TIES trim + sign consensus, DARE drop + rescale), identity for "
    "averaging / task arithmetic; L_i the task's smoothness at theta_0]"
)
#: The three terms of the excess-loss form, in design-matrix order.
EXCESS_TERMS: tuple[str, ...] = ("opt", "stab", "het")
#: merge method -> the Corollary-1 operator T of :func:`mergelab.analysis.diagnostics.apply_operator`
#: (methods not listed merge the task vectors as they are: T = identity).
MERGE_OPERATORS: dict[str, str] = {name: m.operator for name, m in METHODS.items() if m.operator is not None}


def stability_term(pool: BoundPool, *, heavy_ball: bool = True) -> float:
    """*(derived)* ``STAB = (1/N) sum_i eps_i^2`` with ``eps_i^2 = e eta_i^2 K_i m2_i (sigma_i^2 + b_i delta_i^2) / n_i``.

    The per-task average of the experts' own stability (:func:`per_expert_stability`): linear in ``K``,
    quadratic in ``eta``, ``~1/n``, ``b`` multiplying the heterogeneity part ``delta_i^2``. Unlike the merged
    stability ``sum_i p_i alpha_i^2 eps_i^2`` of :func:`evaluate_bound` (which falls as ``1/N`` under averaging
    because replacing one sample moves the merge by ``alpha_i``), it measures how unstable each task's
    solution is, per task, and is flat in ``N`` for identical experts.
    """
    eps = [per_expert_stability(e.eta(heavy_ball), e.steps, e.sigma2, e.delta2, e.batch_size, e.n, e.lr_factor_sq_mean)
           for e in pool.experts]
    return float(np.mean(eps))


def optimization_term(pool: BoundPool, *, heavy_ball: bool = True) -> float:
    """*(derived)* ``OPT``: the optimisation term ``opt`` of :func:`evaluate_bound` (module docstring; FedNova's
    ``F0 / sqrt(N eta K)`` decay, its minibatch-noise term and the chi^2 objective-inconsistency cost)."""
    bound_log = logging.getLogger(__name__)
    level = bound_log.level
    bound_log.setLevel(logging.WARNING)  # the validity note of evaluate_bound is about the stability term
    try:
        return float(evaluate_bound(pool, heavy_ball=heavy_ball).opt)
    finally:
        bound_log.setLevel(level)


def dispersion_from_gram(gram: np.ndarray) -> np.ndarray:
    """Per task ``||v_i - (1/N) sum_j v_j||^2`` from the Gram matrix ``G_ij = <v_i, v_j>``:
    ``G_ii - (2/N) sum_j G_ij + (1/N^2) sum_jk G_jk`` (clipped at 0 against rounding)."""
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {g.shape}")
    n = g.shape[0]
    d = np.diag(g) - 2.0 * g.sum(axis=1) / n + g.sum() / (n * n)
    return np.maximum(d, 0.0)


def task_vector_dispersion(vectors: Sequence[Any]) -> np.ndarray:
    """Per task ``||v_i - (1/N) sum_j v_j||^2`` (float64) for flat vectors (numpy arrays or torch tensors), or
    for mappings of tensor name -> tensor (summed over the names of the first mapping)."""
    if len(vectors) == 0:
        raise ValueError("need at least one task vector")
    if isinstance(vectors[0], Mapping):
        names = list(vectors[0])
        missing = [k for v in vectors for k in names if k not in v]
        if missing:
            raise ValueError(f"task vectors do not have the same tensors: missing {sorted(set(missing))[:3]}")
        flat = [np.concatenate([np.asarray(v[k], dtype=np.float64).ravel() for k in names]) for v in vectors]
    else:
        flat = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    stack = np.stack(flat)
    return ((stack - stack.mean(axis=0)) ** 2).sum(axis=1)


def heterogeneity_term(dispersion: Sequence[float], smoothness: float | Sequence[float]) -> float:
    """*(derived)* ``HET = (1/N) sum_i (L_i / 2) d_i`` with ``d_i = ||T(tau_i) - mean_j T(tau_j)||^2``.

    Second-order interference of the merge on task ``i``: the merge moves task ``i``'s solution by
    ``mean_j T(tau_j) - T(tau_i)`` (exactly, for averaging and ``T`` = identity), which costs at most
    ``(L_i / 2) d_i`` of loss at a stationary point. For ``N`` orthogonal task vectors of norm ``r``,
    ``d_i = (1 - 1/N) r^2``: it grows with ``N``, and a consensus operator that removes conflicting
    coordinates lowers it (Corollary 1's ``Delta_T``). ``smoothness``: one ``L`` or one per task.
    """
    d = np.asarray(dispersion, dtype=np.float64)
    L = np.broadcast_to(np.asarray(smoothness, dtype=np.float64), d.shape)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("dispersion must be a non-empty 1-D sequence (one value per task)")
    if np.any(d < 0) or not np.all(np.isfinite(d)) or np.any(~(L > 0)) or not np.all(np.isfinite(L)):
        raise ValueError("dispersion must be finite and nonnegative and the smoothness finite and positive")
    return float(np.mean(L * d / 2.0))


def merge_operator_vectors(method: str, parameters: Mapping[str, Any], taus: Sequence[Mapping[str, Any]],
                           weights: Sequence[float] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """``(operator, [T(tau_1), ..., T(tau_N)])`` for the merge ``method`` (:data:`MERGE_OPERATORS`).

    ``taus``: one mapping tensor name -> torch tensor per expert. ``ties``/``dare_ties``/``dare_linear``/
    ``breadcrumbs`` apply the operator of :func:`mergelab.analysis.diagnostics.apply_operator` with the
    method's parsed parameters (defaults of :mod:`mergelab.methods.catalog`: TIES density 0.2 trimmed over
    the whole model, DARE density 0.5 rescaled by 1/density, seeded as the merge seeds its masks); TIES's
    whole-model trim is applied to the concatenated task vector. Other methods return ``"identity"`` and
    the task vectors unchanged.
    """
    import torch

    from mergelab.analysis.diagnostics import DiagnosticsConfig, apply_operator
    from mergelab.methods import get_method

    op = MERGE_OPERATORS.get(method)
    if op is None:
        return "identity", [dict(t) for t in taus]
    p = get_method(method).parse_params(dict(parameters))
    cfg = DiagnosticsConfig(
        density=float(getattr(p, "density")),
        sign_election=getattr(p, "sign_election", "mass"),
        dare_rescale=getattr(p, "rescale", "inverse"),
        breadcrumbs_gamma=float(getattr(p, "gamma", 0.01)),
        seed=int(getattr(p, "seed", 0)),
    )
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    names = list(taus[0])
    if op == "ties" and getattr(p, "trim_scope", "tensor") == "global":
        flat = [torch.cat([t[k].reshape(-1) for k in names]) for t in taus]
        out_flat = apply_operator(op, flat, w, cfg, name="")
        shapes = [(k, taus[0][k].shape, taus[0][k].numel()) for k in names]
        out: list[dict[str, Any]] = []
        for v in out_flat:
            parts, start = {}, 0
            for k, shape, numel in shapes:
                parts[k] = v[start:start + numel].reshape(shape)
                start += numel
            out.append(parts)
        return op, out
    per_name = {k: apply_operator(op, [t[k] for t in taus], w, cfg, name=k) for k in names}
    return op, [{k: per_name[k][i] for k in names} for i in range(len(taus))]


@dataclass(frozen=True)
class ExcessTerms:
    """The three terms of the excess-loss form for one merge *(derived)* (:data:`EXCESS_FORMULA`).

    ``dispersion``: each task's ``||T(tau_i) - mean_j T(tau_j)||^2``; ``dispersion_identity`` the same before
    ``T`` (equal for averaging), so ``sum(dispersion_identity) - sum(dispersion)`` is Corollary 1's ``Delta_T``.
    """

    opt: float
    stab: float
    het: float
    n_tasks: int
    operator: str
    dispersion: tuple[float, ...]
    dispersion_identity: tuple[float, ...]
    form: str = FORM
    formula: str = EXCESS_FORMULA

    def vector(self) -> np.ndarray:
        """``[OPT, STAB, HET]`` (the design-matrix row, :data:`EXCESS_TERMS` order)."""
        return np.array([self.opt, self.stab, self.het], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def excess_terms(pool: BoundPool, dispersion: Sequence[float], *, smoothness: float | Sequence[float] | None = None,
                 dispersion_identity: Sequence[float] | None = None, operator: str = "identity",
                 heavy_ball: bool = True) -> ExcessTerms:
    """*(derived)* ``OPT``, ``STAB`` and ``HET`` of ``pool`` whose (operator-transformed) task vectors have the
    per-task ``dispersion`` (:func:`task_vector_dispersion`). ``smoothness``: ``L_i`` per task, or one ``L``
    (default: the pool's ``L``)."""
    if len(dispersion) != pool.size:
        raise ValueError(f"{len(dispersion)} dispersions for a pool of {pool.size} experts")
    L = pool.smoothness if smoothness is None else smoothness
    d = tuple(float(x) for x in dispersion)
    return ExcessTerms(
        opt=optimization_term(pool, heavy_ball=heavy_ball),
        stab=stability_term(pool, heavy_ball=heavy_ball),
        het=heterogeneity_term(d, L),
        n_tasks=pool.size,
        operator=operator,
        dispersion=d,
        dispersion_identity=d if dispersion_identity is None else tuple(float(x) for x in dispersion_identity),
    )


@dataclass(frozen=True)
class ExcessConstants:
    """Constants of the excess-loss form: ``excess = c0 + c_opt OPT + c_stab STAB + c_het HET`` *(derived)*,
    in the terms' own units (:func:`mergelab.analysis.bound_fit.fit_excess` converts from standardised ones)."""

    c0: float = 0.0
    c_opt: float = 1.0
    c_stab: float = 1.0
    c_het: float = 1.0

    def vector(self) -> np.ndarray:
        return np.array([self.c_opt, self.c_stab, self.c_het], dtype=np.float64)


def excess_bound(terms: ExcessTerms, constants: ExcessConstants | None = None) -> float:
    """*(derived)* ``c0 + c_opt OPT + c_stab STAB + c_het HET`` (unit constants and ``c0 = 0`` by default)."""
    c = constants or ExcessConstants()
    return float(c.c0 + c.vector() @ terms.vector())
