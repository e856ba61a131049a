"""Geometric operators between whole weight tensors: spherical interpolation and Model Stock's ratio.

Both take the norms and inner products of whole tensors from the block Gram matrix (:func:`mergelab.ops.gram`,
the rule of :mod:`mergelab.ops.gram_matrix`: float32 dot products of fixed blocks summed in float64 in block order),
so a block kernel of either back-end computes the same coefficients in one cache-resident pass, and the
rest is a linear combination, entry by entry. The coefficient formulas are torch-free
(:func:`mergelab.ops.slerp_coefficients_from_gram`, :func:`mergelab.ops.model_stock_ratio_from_gram`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.ops.gram_matrix import PARALLEL, model_stock_ratio_from_gram, slerp_coefficients_from_gram
from mergelab.ops.spherical import combine, gram


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float, parallel_threshold: float = PARALLEL
                       ) -> tuple[float, float]:
    """The coefficients ``(c_a, c_b)`` of :func:`slerp` (its whole-tensor part, from the block Gram matrix of
    ``a`` and ``b``: :func:`mergelab.ops.slerp_coefficients_from_gram`); the rest is element-wise, so a kernel
    may apply it block by block."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return slerp_coefficients_from_gram(gram([a, b]), t, parallel_threshold)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, parallel_threshold: float = PARALLEL) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of two tensors treated as flat vectors.

    ``Omega = arccos(<a, b> / (|a| |b|))``; ``slerp = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b``.
    The angle comes from the normalised vectors, the result interpolates the unnormalised ones (as in
    mergekit). Nearly (anti)parallel vectors (``|cos Omega| > parallel_threshold``, default ``1 - 1e-6``;
    mergekit's is 0.9995) or a zero vector fall back to linear interpolation ``(1-t) a + t b`` (mergekit's
    formula, each product rounded: :func:`mergelab.ops.combine`). ``t = 0`` gives ``a``, ``t = 1`` gives ``b``.
    """
    return combine([a, b], slerp_coefficients(a, b, t, parallel_threshold))


def model_stock_ratio(taus: Sequence[torch.Tensor], *, extrapolate: bool = False) -> float:
    """Model Stock's interpolation ratio (Jang et al. 2024, "Model Stock", eq. 6 generalised to N models).

    ``cos theta`` is the mean pairwise cosine similarity of the N >= 2 task vectors, and
    ``t = N cos theta / (1 + (N - 1) cos theta)``; the merged weight is ``t * mean_i theta_i + (1 - t) theta_0``.
    If a task vector is zero the cosine is undefined; the ratio is then 1 (plain averaging). The paper's
    derivation assumes ``cos theta > 0``; for task vectors pointing apart on average (``cos theta <= 0``) the
    formula would extrapolate away from the experts without bound, so the ratio is 0 (the pretrained weights).

    ``extrapolate=True`` is mergekit's rule: the formula for every ``cos theta`` (negative ratios move away
    from the experts; ``cos theta -> -1/(N-1)`` diverges; exactly there the ratio is 0, the base, where
    mergekit writes Inf/NaN), each cosine ``<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)`` clamped to [-1, 1],
    so a zero task vector gives ``cos = 0`` and ratio 0.
    """
    if len(taus) < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    return model_stock_ratio_from_gram(gram(taus), extrapolate=extrapolate)


