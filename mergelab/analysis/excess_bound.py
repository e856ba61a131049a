"""The excess-loss form of the stability bound *(derived)*: where N enters.

THEORY.md section 1, "Where N enters". Written as above,
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
intercept on standardised columns (:mod:`mergelab.analysis.bound_fit`). The form of :mod:`mergelab.analysis.bound` (:func:`~mergelab.analysis.bound.evaluate_bound`)
is kept for the pool report, the calibration study and :func:`~mergelab.analysis.bound_predictions.recommend`, which rank pools of fixed ``N``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mergelab.analysis.bound import FORM, BoundPool, evaluate_bound, per_expert_stability
from mergelab.methods import get_method
from mergelab.methods.catalog import METHODS, TRIM_RESCALED, DellaMixin

log = logging.getLogger(__name__)


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
    ``breadcrumbs``/``della``/``della_linear``/``breadcrumbs_ties`` apply the operator of :func:`mergelab.analysis.diagnostics.apply_operator` with the
    method's parsed parameters (defaults of :mod:`mergelab.methods.catalog`: TIES density 0.2 trimmed over
    the whole model, DARE density 0.5 rescaled by 1/density, seeded as the merge seeds its masks); TIES's
    whole-model trim is applied to the concatenated task vector. Other methods return ``"identity"`` and
    the task vectors unchanged.
    """
    # deferred: torch and diagnostics (the torch back-end); the bound's modules import numpy only
    import torch

    from mergelab.analysis.diagnostics import DiagnosticsConfig, apply_operator

    op = MERGE_OPERATORS.get(method)
    if op is None:
        return "identity", [dict(t) for t in taus]
    p = get_method(method).parse_params(dict(parameters))
    cfg = DiagnosticsConfig(
        density=float(getattr(p, "density")),
        sign_election=getattr(p, "sign_election", "mass"),
        dare_rescale=getattr(p, "rescale", "inverse") if not isinstance(p, TRIM_RESCALED) else "inverse",
        trim_rescale=p.rescale if isinstance(p, TRIM_RESCALED) else "none",
        breadcrumbs_gamma=float(getattr(p, "gamma", 0.01)),
        della_epsilon=float(p.epsilon) if isinstance(p, DellaMixin) else DiagnosticsConfig.della_epsilon,
        della_spacing=p.spacing if isinstance(p, DellaMixin) else "paper",
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


__all__ = ["EXCESS_FORMULA", "EXCESS_TERMS", "MERGE_OPERATORS", "ExcessConstants", "ExcessTerms",
           "dispersion_from_gram", "excess_bound", "excess_terms", "heterogeneity_term", "merge_operator_vectors",
           "optimization_term", "stability_term", "task_vector_dispersion"]
