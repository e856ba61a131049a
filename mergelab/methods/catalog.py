"""The data-free merging methods as a catalog: names, parameters (validated, with the papers' defaults) and
what each needs (a base model, how many experts, per-model weights).

The computations live in :mod:`mergelab.methods.data_free` and are imported, with torch, on the first
call of a method's ``merge``: reading this catalog to validate a spec, or to merge with the numpy engine
(:mod:`mergelab.numpy_engine`), does not import torch. The defaults and their sources are stated in each
computation's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from mergelab.methods.base import (
    DensityMixin,
    DisjointDivisor,
    Method,
    MethodParams,
    RescaleRule,
    ScaledParams,
    SignElection,
    TensorInputs,
    TrimScope,
)


def _computed_by(function: str) -> Callable[[TensorInputs, Any], Any]:
    """``mergelab.methods.data_free.<function>``, imported on the first call."""

    def merge(inp: TensorInputs, params: Any) -> Any:
        from mergelab.methods import data_free

        return getattr(data_free, function)(inp, params)

    merge.__name__ = merge.__qualname__ = function
    return merge


class WeightAverageParams(MethodParams):
    pass


class TaskArithmeticParams(ScaledParams):
    pass


class TiesParams(ScaledParams, DensityMixin):
    density: float = 0.2
    trim_scope: TrimScope = "global"
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"


def ties_global_density(p: TiesParams) -> float | None:
    """The density of TIES's whole-model trim (``trim_scope: global`` below density 1), else None."""
    return p.density if p.trim_scope == "global" and p.density < 1.0 else None


class DareLinearParams(ScaledParams, DensityMixin):
    density: float = 0.5
    rescale: RescaleRule = "inverse"
    seed: int = 0


class DareTiesParams(DareLinearParams):
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"


class BreadcrumbsParams(ScaledParams, DensityMixin):
    density: float = 0.9
    gamma: float = Field(0.01, description="fraction of largest-magnitude entries removed")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"gamma must be in [0, 1), got {v}")
        return v


class ModelStockParams(MethodParams):
    pass


class SlerpParams(MethodParams):
    t: float = Field(0.5, description="interpolation position: 0 gives the first model, 1 the second")

    @field_validator("t")
    @classmethod
    def _t_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"t must be in [0, 1], got {v}")
        return v


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("weight_average", "weighted mean of the models (model soup)", WeightAverageParams,
               _computed_by("weight_average"), needs_base=False, propagates_nonfinite=True),
        Method("task_arithmetic", "theta_0 + lambda * sum of weighted task vectors", TaskArithmeticParams,
               _computed_by("task_arithmetic"), propagates_nonfinite=True),
        Method("ties", "trim, elect sign, disjoint mean (TIES-Merging)", TiesParams, _computed_by("ties"),
               global_trim_density=ties_global_density),
        Method("dare_linear", "DARE drop-and-rescale, then task arithmetic", DareLinearParams,
               _computed_by("dare_linear"), propagates_nonfinite=True),
        Method("dare_ties", "DARE drop-and-rescale, then TIES sign consensus", DareTiesParams,
               _computed_by("dare_ties")),
        Method("breadcrumbs", "drop outliers and small entries per tensor, then task arithmetic",
               BreadcrumbsParams, _computed_by("breadcrumbs")),
        Method("model_stock", "interpolate the average towards the base by the task vectors' angle",
               ModelStockParams, _computed_by("model_stock"), min_models=2, uses_weights=False),
        Method("slerp", "spherical interpolation of two models", SlerpParams, _computed_by("slerp"),
               needs_base=False, min_models=1, max_models=2, uses_weights=False),
    )
}

MethodName = Literal[
    "weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock", "slerp"
]
