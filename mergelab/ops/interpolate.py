"""Geometric operators between whole weight tensors: spherical interpolation and Model Stock's ratio.

Both need norms and inner products of whole tensors. They take them from the block Gram matrix of
:func:`mergelab.ops.gram` with ``wide=False``: float32 dot products (torch's) of fixed blocks of
:func:`mergelab.ops.block_size` entries of the float32 vectors, summed in float64 in block order, so a
block kernel computes exactly the same coefficients in one cache-resident pass without tensor-sized
copies (``*_from_gram``). Until issue 14 they were torch's whole-tensor float32 reductions (``norm``, a
BLAS dot), whose summation order no block kernel can reproduce, so the kernels held a float32 copy of
every input and read it 10 more times (model stock with 4 experts: 7.5 s and 2.2 GB on the benchmark,
mergekit 11.8 s; SLERP 1.25 GB). Float32 sums of 2^18 terms per block put cos within ~1e-5 of the exact
value for nearly parallel vectors (fine-tunes of one base: SLERP of the benchmark's embedding, exact cos
0.999949, blocks 0.999941, while the whole-tensor float32 reductions gave 1.0078 and fell back to
linear interpolation); float64 partials (``wide=True``, as NuSLERP's) would be exact for 25% more CPU
time. On the benchmark the outputs differ from before (an intended change, recorded in the digests): SLERP's
in 17% of the entries by one bf16 ulp, model stock's in 697 of 672M entries by at most 4.8e-7 (near zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergelab.ops.spherical import Gram, gram

_PARALLEL = 1.0 - 1e-6


def slerp_coefficients(
    a: torch.Tensor, b: torch.Tensor, t: float, parallel_threshold: float = _PARALLEL
) -> tuple[float, float] | None:
    """The coefficients ``(sin((1-t) Omega)/sin(Omega), sin(t Omega)/sin(Omega))`` of :func:`slerp`, or None
    where it interpolates linearly (a zero vector, or ``|cos Omega| > parallel_threshold``): the whole-tensor
    part of SLERP, from the block Gram matrix of ``a`` and ``b`` (``wide=False``, see the module docstring) (:func:`slerp_coefficients_from_gram`);
    the rest is element-wise, so a kernel may apply it block by block."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return slerp_coefficients_from_gram(gram([a, b], wide=False), t, parallel_threshold)


def slerp_coefficients_from_gram(g: Gram, t: float, parallel_threshold: float = _PARALLEL
                                 ) -> tuple[float, float] | None:
    """:func:`slerp_coefficients` from the Gram matrix ``g`` of ``(a, b)``: ``|a| = sqrt(g_00)``,
    ``|b| = sqrt(g_11)``, ``cos Omega = g_01 / (|a| |b|)``."""
    na, nb = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    if na == 0 or nb == 0:
        return None
    cos = g[0][1] / (na * nb)
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
    if len(taus) < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    return model_stock_ratio_from_gram(gram(taus, wide=False), extrapolate=extrapolate)


def model_stock_ratio_from_gram(g: Gram, *, extrapolate: bool = False) -> float:
    """:func:`model_stock_ratio` from the Gram matrix ``g`` of the task vectors (:func:`mergelab.ops.gram`,
    ``wide=False``):
    ``|tau_i| = sqrt(g_ii)``, ``<tau_i, tau_j> = g_ij``."""
    n = len(g)
    if n < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    if extrapolate:
        cosines = [
            max(-1.0, min(1.0, g[i][j] / max(norms[i] * norms[j], 1e-6)))
            for i in range(n) for j in range(i + 1, n)
        ]
        cos = sum(cosines) / len(cosines)
        return n * cos / (1.0 + (n - 1) * cos)
    if min(norms) == 0:
        return 1.0
    cosines = [g[i][j] / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    if cos <= 0:
        return 0.0
    return n * cos / (1.0 + (n - 1) * cos)
