"""The spec's merge as the *(derived)* stability bound sees it: the coefficients ``alpha_i`` of the task vectors
(from the catalog's :attr:`~mergelab.methods.base.Method.combination`) and the bound's pool."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mergelab.analysis.bound import BoundPool
from mergelab.errors import SpecError
from mergelab.methods import get_method
from mergelab.methods.catalog import METHODS

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.analysis.estimators import PoolMeasurement
    from mergelab.training.result import ExpertResult


@dataclass(frozen=True)
class MergeCoefficients:
    """The coefficients ``alpha_i`` of ``tau_i`` in the spec's merge as the bound sees them, and the
    :class:`~mergelab.analysis.bound.BoundPool` rule expressing them (``mean``/``task_arithmetic`` when the
    spec's weights are equal, so that sub-pools in the N trend keep the rule's meaning)."""

    alphas: tuple[float, ...]
    rule: str
    lam: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_coefficients(method: str, parameters: Mapping[str, Any], weights: Sequence[float]) -> MergeCoefficients:
    """``alpha_i`` for the spec's ``method``, ``parameters`` and model weights ``w_i``.

    * averaging (weight_average; model_stock and slerp approximately): ``alpha_i = w_i / sum_j w_j``;
    * task arithmetic, DARE-linear, breadcrumbs: ``alpha_i = lambda w_i`` (sparsification changes tau_i, not
      alpha: Corollary 1's Delta_T is in the operators section);
    * TIES, DARE-TIES (disjoint mean): ``alpha_i ~ lambda w_i / sum_j w_j`` (exact where all experts agree);
    * TSV-Merge, Iso-C, Iso-CTS (spectral): ``alpha_i ~ lambda w_i`` (their matrices are about the sum);
    * data-informed methods choose their coefficients from data: the bound is evaluated for the simple average.
    """
    w = np.asarray([float(v) for v in weights], dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise SpecError("models: the bound needs nonnegative merge weights with a positive sum")
    lam = 1.0
    try:
        params = get_method(method).parse_params(dict(parameters))
        lam = float(getattr(params, "lambda_", 1.0))
    except Exception:  # noqa: BLE001 - data-informed methods are not in the data-free registry
        params = None
    equal = bool(np.allclose(w, w[0]))
    # how the method combines the task vectors: a trait of the catalog (Method.combination)
    combination = METHODS[method].combination if method in METHODS else None
    if combination == "sum":
        alphas = lam * w
        note = f"{method}: alpha_i = lambda * w_i (lambda = {lam:g})"
        rule = "task_arithmetic" if equal else "weighted"
    elif combination == "spectral":
        alphas = lam * w
        note = (f"{method}: alpha_i ~ lambda * w_i (lambda = {lam:g}; on matrices the merge keeps the task "
                "matrices' singular subspaces with a re-weighted spectrum, other tensors take lambda * w_i / N)")
        rule = "task_arithmetic" if equal else "weighted"
    elif combination == "disjoint_mean":
        alphas = lam * w / w.sum()
        note = (f"{method}: alpha_i ~ lambda * w_i / sum_j w_j (lambda = {lam:g}; the disjoint mean divides by the "
                "number of agreeing experts per coordinate, so this is exact only where all agree)")
        rule = "mean" if equal and lam == 1.0 else "weighted"  # sub-pools keep sum alpha = lambda
    elif combination in ("mean", "interpolation"):
        alphas = w / w.sum()
        note = f"{method}: alpha_i = w_i / sum_j w_j" + ("" if combination == "mean" else " (approximation)")
        rule = "mean" if equal else "weighted"
    else:
        alphas = np.full(len(w), 1.0 / len(w))
        note = (f"{method}: a data-informed method chooses its coefficients from data; the bound is evaluated for "
                "the simple average alpha_i = 1/N")
        rule = "mean"
    lam_rule = float(alphas[0]) if rule == "task_arithmetic" else 1.0
    return MergeCoefficients(tuple(float(a) for a in alphas), rule, lam_rule, note)


def bound_pool(measurement: PoolMeasurement, experts: Sequence[ExpertResult], coefficients: MergeCoefficients,
               name: str = "") -> BoundPool:
    """The :class:`~mergelab.analysis.bound.BoundPool` of ``experts`` measured by ``measurement`` *(derived)*."""
    if not (measurement.smoothness > 0 and math.isfinite(measurement.smoothness)):
        raise SpecError("the bound needs the smoothness L: run with at least one Hessian power iteration")
    return BoundPool.from_measurement(measurement, experts, merge=coefficients.rule,  # type: ignore[arg-type]
                                      lam=coefficients.lam, alphas=coefficients.alphas, name=name)
