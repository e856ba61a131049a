"""Geometric operators between whole weight tensors: spherical interpolation and Model Stock's ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_PARALLEL = 1.0 - 1e-6


def slerp_coefficients(
    a: torch.Tensor, b: torch.Tensor, t: float, parallel_threshold: float = _PARALLEL
) -> tuple[float, float] | None:
    """The coefficients ``(sin((1-t) Omega)/sin(Omega), sin(t Omega)/sin(Omega))`` of :func:`slerp`, or None
    where it interpolates linearly (a zero vector, or ``|cos Omega| > parallel_threshold``). The whole-tensor part of
    SLERP (two norms and a dot product, torch's reductions on ``a`` and ``b`` as given); the rest is
    element-wise, so a kernel may apply it block by block."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return None
    cos = float((a.reshape(-1) @ b.reshape(-1)) / (na * nb))
    if abs(cos) > parallel_threshold:
        return None
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, parallel_threshold: float = _PARALLEL) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of two tensors treated as flat vectors.

    ``Omega = arccos(<a, b> / (|a| |b|))``; ``slerp = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b``.
    The angle comes from the normalised vectors, the result interpolates the unnormalised ones (as in
    mergekit). Nearly (anti)parallel vectors (``|cos Omega| > parallel_threshold``, default ``1 - 1e-6``;
    mergekit's is 0.9995) or a zero vector fall back to linear interpolation ``(1-t) a + t b``. ``t = 0``
    gives ``a``, ``t = 1`` gives ``b``.
    """
    coefficients = slerp_coefficients(a, b, t, parallel_threshold)
    if coefficients is None:
        return torch.lerp(a, b, t)
    ca, cb = coefficients
    return a * ca + b * cb


def model_stock_ratio(taus: Sequence[torch.Tensor], *, extrapolate: bool = False) -> float:
    """Model Stock's interpolation ratio (Jang et al. 2024, "Model Stock", eq. 6 generalised to N models).

    ``cos theta`` is the mean pairwise cosine similarity of the N >= 2 task vectors, and
    ``t = N cos theta / (1 + (N - 1) cos theta)``; the merged weight is ``t * mean_i theta_i + (1 - t) theta_0``.
    If a task vector is zero the cosine is undefined; the ratio is then 1 (plain averaging). The paper's
    derivation assumes ``cos theta > 0``; for task vectors pointing apart on average (``cos theta <= 0``) the
    formula would extrapolate away from the experts without bound, so the ratio is 0 (the pretrained weights).

    ``extrapolate=True`` is mergekit's rule: the formula for every ``cos theta`` (negative ratios move away
    from the experts; ``cos theta -> -1/(N-1)`` diverges), each cosine ``<tau_i, tau_j> / max(|tau_i| |tau_j|,
    1e-6)`` clamped to [-1, 1], so a zero task vector gives ``cos = 0`` and ratio 0.
    """
    n = len(taus)
    if n < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    flat = [t.reshape(-1) for t in taus]
    norms = [float(f.norm()) for f in flat]
    if extrapolate:
        cosines = [
            max(-1.0, min(1.0, float(flat[i] @ flat[j]) / max(norms[i] * norms[j], 1e-6)))
            for i in range(n) for j in range(i + 1, n)
        ]
        cos = sum(cosines) / len(cosines)
        return n * cos / (1.0 + (n - 1) * cos)
    if min(norms) == 0:
        return 1.0
    cosines = [
        float(flat[i] @ flat[j]) / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    if cos <= 0:
        return 0.0
    return n * cos / (1.0 + (n - 1) * cos)
