"""The effective noise scale of an expert's training (THEORY.md section 2, Zhang et al. 2025).

The proxy ``eta / (B (1 - beta))`` (and ``eta / (B (1 - beta)^2)``) as the expert's sidecar records it, and,
with the per-sample gradient covariance's trace ``tr(Sigma) = sigma^2`` measured by
:func:`mergelab.analysis.estimators.gradient_statistics`, the noise scale ``T = eta / (B (1 - beta)) * tr(Sigma)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.analysis.estimators import LossFn, gradient_statistics, sample_indices
from mergelab.training.augment import random_affine


@dataclass(frozen=True)
class NoiseScaleReport:
    """Effective noise scale of one expert (THEORY.md section 2, Zhang et al. 2025).

    ``proxy = eta / (B (1 - beta))`` and ``proxy_squared = eta / (B (1 - beta)^2)`` as recorded by the
    training module (``beta`` = SGD momentum, or ``beta1`` for Adam/AdamW: ``beta_source``); with a measured
    ``trace_sigma = tr(Sigma) = sigma^2`` (per-sample gradient covariance, ``1/n`` normalisation):
    ``T = proxy * tr(Sigma)`` and ``T_squared = proxy_squared * tr(Sigma)``. For Adam/AdamW the update is
    normalised per coordinate, so the proxy compares runs of the same optimizer only (``note``).
    """

    proxy: float
    proxy_squared: float
    eta: float
    batch_size: int
    beta: float
    beta_source: str
    optimizer: str
    trace_sigma: float | None = None
    T: float | None = None
    T_squared: float | None = None
    note: str = ""
    form: str = "eta / (B * (1 - beta)) [* tr(Sigma)]"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def effective_noise_scale(expert: Any, trace_sigma: float | None = None) -> NoiseScaleReport:
    """Noise scale of ``expert``: an :class:`~mergelab.training.ExpertResult` (its sidecar's ``noise_scale``
    and spec) or an :class:`~mergelab.training.ExpertSpec`; multiplied by ``trace_sigma`` when given."""
    spec = getattr(expert, "spec", expert)
    ns = getattr(expert, "noise_scale", None)
    lr, bsz, beta, opt = float(spec.lr), int(spec.batch_size), float(spec.momentum), str(spec.optimizer)
    if ns is not None:
        proxy, proxy_sq, source = float(ns.value), float(ns.value_squared), str(ns.beta_source)
    else:
        proxy, proxy_sq = lr / (bsz * (1 - beta)), lr / (bsz * (1 - beta) ** 2)
        source = "sgd momentum" if opt == "sgd" else f"{opt} beta1"
    note = "" if opt == "sgd" else (
        f"{opt}: beta is beta1 and the update is normalised per coordinate; the proxy compares {opt} runs only"
    )
    t = None if trace_sigma is None else proxy * float(trace_sigma)
    t2 = None if trace_sigma is None else proxy_sq * float(trace_sigma)
    return NoiseScaleReport(proxy, proxy_sq, lr, bsz, beta, source, opt, trace_sigma, t, t2, note)


def measured_noise_scale(
    expert: Any,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    param_names: Sequence[str] | None = None,
    max_samples: int | None = 512,
    augment: bool | None = None,
    seed: int = 0,
) -> NoiseScaleReport:
    """:func:`effective_noise_scale` with ``tr(Sigma)`` measured on ``(x, y)`` at ``model``'s current weights.

    ``tr(Sigma) = sigma^2`` of :func:`gradient_statistics` (``1/n`` normalisation, eval mode) over
    ``param_names`` -- by default **all** parameters, since the optimizer updates the whole model (backbone and
    head) and its noise lives in all of them. Pass ``model`` at theta_0 with the starting head for the noise at
    the start of training, or a checkpoint for the noise along the run. With augmentation (``augment``, default
    the expert's ``spec.augment``), each sample gets one random draw of the training module's affine warp, so
    ``Sigma`` is the covariance over (sample, augmentation) pairs, as in training.
    """
    spec = getattr(expert, "spec", expert)
    use_aug = bool(getattr(spec, "augment", False)) if augment is None else augment
    idx = sample_indices(len(x), max_samples, seed)
    xs, ys = x[idx], y[idx]
    if use_aug:
        xs = random_affine(xs, seed, 0)
    stats = gradient_statistics(model, xs, ys, loss_fn, param_names=param_names, seed=seed)
    return effective_noise_scale(expert, trace_sigma=stats.sigma2)


__all__ = ["NoiseScaleReport", "effective_noise_scale", "measured_noise_scale"]
