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

**Predictions** from this bound (its shape along K, eta, b, n and N, and a merge-friendly setting for the next
expert) are :mod:`mergelab.analysis.bound_predictions`; the **excess-loss form**, where N enters, is
:mod:`mergelab.analysis.excess_bound`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from mergelab.training.schedule import lr_factor

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

MergeRule = Literal["mean", "task_arithmetic", "weighted"]

# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def schedule_moments(steps: int, schedule: str = "constant", warmup_frac: float = 0.0, decay_frac: float = 0.2,
                     min_lr_ratio: float = 0.0) -> tuple[float, float]:
    """``(m1, m2) = (mean_t f(t), mean_t f(t)^2)`` of the training module's learning-rate schedule factor."""
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


def bound_table(pools: Mapping[str, BoundPool], constants: BoundConstants | None = None) -> list[dict[str, Any]]:
    """One row per named pool: the bound and its terms *(derived)*."""
    rows = []
    for name, pool in pools.items():
        r = evaluate_bound(pool, constants)
        rows.append({"pool": name, "bound": r.bound, "opt": r.opt, "gen": r.gen, "eps2": r.eps2, "chi2": r.chi2,
                     "all_valid": r.all_valid, "form": FORM})
    return rows


__all__ = [
    "BOUND_FORMULA",
    "BoundConstants",
    "BoundExpert",
    "BoundPool",
    "BoundReport",
    "FORM",
    "SOURCE",
    "bound_table",
    "chi2_divergence",
    "effective_weights",
    "evaluate_bound",
    "generalization_term",
    "merged_stability",
    "per_expert_stability",
    "schedule_moments",
]
