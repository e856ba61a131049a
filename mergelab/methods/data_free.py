"""The data-free merging methods, each a named composition of :mod:`mergelab.ops` operators.

Notation: base theta_0, experts theta_i with weights w_i, task vectors tau_i = theta_i - theta_0.
Each method's docstring states the formula, its defaults, and where the defaults come from.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from mergelab import ops
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

# --------------------------------------------------------------------------------------------- averaging


class WeightAverageParams(MethodParams):
    pass


def weight_average(inp: TensorInputs, p: WeightAverageParams) -> torch.Tensor:
    """Weight averaging / model soup (Wortsman et al. 2022): ``theta = sum_i w_i theta_i / sum_i w_i``.

    The base model is not part of the average (it only supplies the tensor order and config files).
    Computed as ``theta_1 + sum_i w_i (theta_i - theta_1) / sum_i w_i`` (algebraically equal), so merging
    identical models returns that model bit-exactly and rounding acts on the small differences only.
    """
    first = inp.experts[0].to(inp.compute_dtype)
    diffs = [e.to(inp.compute_dtype) - first for e in inp.experts]
    return first + ops.weighted_mean(diffs, inp.weights)


# ------------------------------------------------------------------------------------ task arithmetic


class TaskArithmeticParams(ScaledParams):
    pass


def task_arithmetic(inp: TensorInputs, p: TaskArithmeticParams) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta = theta_0 + lambda * sum_i w_i tau_i``.

    Default ``lambda = 1`` (the plain sum of task vectors); the paper tunes lambda on validation data
    (0.3-0.5 is typical for 8 vision tasks), so set it for your pool.
    """
    base = inp.base.to(inp.compute_dtype)
    merged = torch.zeros_like(base)
    tau = torch.empty_like(base)  # one reused buffer: tau_i = theta_i - theta_0, never all N at once
    for expert, w in zip(inp.experts, inp.weights):
        torch.sub(expert, base, out=tau)
        merged.add_(tau, alpha=w)
    return merged.mul_(p.lambda_).add_(base)


# ------------------------------------------------------------------------------------------------ TIES


class TiesParams(ScaledParams, DensityMixin):
    density: float = 0.2
    trim_scope: TrimScope = "global"
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"


def ties(inp: TensorInputs, p: TiesParams) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim -> elect_sign -> disjoint_mean -> scale.

    ``hat tau_i = trim(tau_i, density)``; ``gamma = sgn(sum_i w_i hat tau_i)``;
    ``theta = theta_0 + lambda * sum_{i in A} w_i hat tau_i / |A|`` over the models A agreeing with gamma.
    Defaults from the paper: density 0.2 (keep top 20%), trimming over the whole model
    (``trim_scope: global``, as in the paper's code and FusionBench; ``tensor`` trims each tensor separately,
    as mergekit does), election by mass, mean over agreeing entries (``disjoint_divisor: count``;
    ``weight`` divides by the agreeing weights, mergekit's ``normalize``), lambda 1.
    """
    thresholds = inp.thresholds if p.trim_scope == "global" else None
    if p.trim_scope == "global" and thresholds is None and p.density < 1.0 and inp.base.numel() > 0:
        raise ValueError(
            f"ties with trim_scope 'global' needs whole-model thresholds for tensor '{inp.name}'; "
            "merge through mergelab.engine.merge (which computes them) or use trim_scope 'tensor'"
        )
    quotas = inp.tie_quotas if thresholds is not None else None
    taus = [
        ops.trim(tau, p.density, threshold=None if thresholds is None else thresholds[i],
                 ties=None if quotas is None else quotas[i])
        for i, tau in enumerate(inp.task_vectors())
    ]
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor)
    return inp.base.to(inp.compute_dtype) + ops.scale(merged, p.lambda_)


def _ties_global_density(p: TiesParams) -> float | None:
    return p.density if p.trim_scope == "global" and p.density < 1.0 else None


# ------------------------------------------------------------------------------------------------ DARE


class DareLinearParams(ScaledParams, DensityMixin):
    density: float = 0.5
    rescale: RescaleRule = "inverse"
    seed: int = 0


def _dropped(inp: TensorInputs, density: float, rescale: str, seed: int) -> list[torch.Tensor]:
    return [
        ops.drop(tau, density, rescale=rescale, generator=inp.generator(seed, i))
        for i, tau in enumerate(inp.task_vectors())
    ]


def dare_linear(inp: TensorInputs, p: DareLinearParams) -> torch.Tensor:
    """DARE + task arithmetic (Yu et al. 2024): ``theta = theta_0 + lambda * sum_i w_i drop(tau_i)``.

    ``drop`` keeps each entry with probability ``density = 1 - p`` and rescales by ``1/density``
    (``rescale: inverse``, the paper's; ``l1`` matches the L1 norm as mergekit does). Default density 0.5:
    the paper sweeps drop rates 0.1-0.99 and mergekit requires it explicitly, so 0.5 is a neutral middle.
    The masks are reproducible: seeded by ``seed``, the expert's index and the tensor name.
    """
    merged = ops.weighted_sum(_dropped(inp, p.density, p.rescale, p.seed), inp.weights)
    return inp.base.to(inp.compute_dtype) + ops.scale(merged, p.lambda_)


class DareTiesParams(DareLinearParams):
    sign_election: SignElection = "mass"
    disjoint_divisor: DisjointDivisor = "count"


def dare_ties(inp: TensorInputs, p: DareTiesParams) -> torch.Tensor:
    """DARE + TIES consensus (Yu et al. 2024, sec. 4): drop -> elect_sign -> disjoint_mean -> scale.

    Same as :func:`ties` with the magnitude trim replaced by DARE's random drop and rescale.
    """
    taus = _dropped(inp, p.density, p.rescale, p.seed)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor)
    return inp.base.to(inp.compute_dtype) + ops.scale(merged, p.lambda_)


# ----------------------------------------------------------------------------------------- breadcrumbs


class BreadcrumbsParams(ScaledParams, DensityMixin):
    density: float = 0.9
    gamma: float = Field(0.01, description="fraction of largest-magnitude entries removed")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"gamma must be in [0, 1), got {v}")
        return v


def breadcrumbs(inp: TensorInputs, p: BreadcrumbsParams) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): ``theta_0 + lambda * sum_i w_i band(tau_i)``.

    ``band`` (:func:`mergelab.ops.trim_band`) removes per tensor the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping a ``density`` fraction. The paper tunes both per
    setting; defaults density 0.9 and gamma 0.01 are mergekit's.
    """
    taus = [ops.trim_band(tau, p.density, p.gamma) for tau in inp.task_vectors()]
    return inp.base.to(inp.compute_dtype) + ops.scale(ops.weighted_sum(taus, inp.weights), p.lambda_)


# ----------------------------------------------------------------------------------------- model stock


class ModelStockParams(MethodParams):
    pass


def model_stock(inp: TensorInputs, p: ModelStockParams) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), per tensor: ``theta = t * mean_i theta_i + (1 - t) * theta_0``.

    ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine between the task vectors of this
    tensor (:func:`mergelab.ops.model_stock_ratio`). Needs N >= 2 experts; per-model weights are not used.
    """
    taus = inp.task_vectors()
    t = ops.model_stock_ratio(taus)
    mean_tau = ops.weighted_mean(taus, [1.0] * len(taus))
    return inp.base.to(inp.compute_dtype) + ops.scale(mean_tau, t)


# ----------------------------------------------------------------------------------------------- SLERP


class SlerpParams(MethodParams):
    t: float = Field(0.5, description="interpolation position: 0 gives the first model, 1 the second")

    @field_validator("t")
    @classmethod
    def _t_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"t must be in [0, 1], got {v}")
        return v


def slerp(inp: TensorInputs, p: SlerpParams) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; as used for model merging by mergekit), per tensor.

    With one expert, interpolates from the base (t = 0) to the expert (t = 1); with two experts, from the
    first to the second (the base then only supplies tensor order and config files). Default t = 0.5.
    """
    if len(inp.experts) == 1:
        a, b = inp.base, inp.experts[0]
    else:
        a, b = inp.experts
    return ops.slerp(a.to(inp.compute_dtype), b.to(inp.compute_dtype), p.t)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("weight_average", "weighted mean of the models (model soup)", WeightAverageParams,
               weight_average, needs_base=False),
        Method("task_arithmetic", "theta_0 + lambda * sum of weighted task vectors", TaskArithmeticParams,
               task_arithmetic),
        Method("ties", "trim, elect sign, disjoint mean (TIES-Merging)", TiesParams, ties,
               global_trim_density=_ties_global_density),
        Method("dare_linear", "DARE drop-and-rescale, then task arithmetic", DareLinearParams, dare_linear),
        Method("dare_ties", "DARE drop-and-rescale, then TIES sign consensus", DareTiesParams, dare_ties),
        Method("breadcrumbs", "drop outliers and small entries per tensor, then task arithmetic",
               BreadcrumbsParams, breadcrumbs),
        Method("model_stock", "interpolate the average towards the base by the task vectors' angle",
               ModelStockParams, model_stock, min_models=2, uses_weights=False),
        Method("slerp", "spherical interpolation of two models", SlerpParams, slerp, needs_base=False,
               min_models=1, max_models=2, uses_weights=False),
    )
}

MethodName = Literal[
    "weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock", "slerp"
]
