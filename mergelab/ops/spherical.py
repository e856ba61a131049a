"""Means on the sphere from a Gram matrix: NuSLERP, Multi-SLERP and the Karcher mean, as coefficients.

Each of these methods returns a linear combination ``sum_i c_i x_i`` of its input vectors (models or task
vectors, flattened) whose coefficients depend only on their inner products: every vector the algorithms
form (unit vectors, means, tangent vectors, iterates) lies in the span of the inputs, so the algorithm can
run on the coefficients with the ``N x N`` Gram matrix ``G_ij = <x_i, x_j>`` in float64 and the tensor is
touched twice: one pass for ``G`` (:func:`gram`), one for the combination. Both passes go by cache-sized
blocks, so a block kernel and a whole-tensor reference compute the same bits: :func:`gram` sums fixed-size
blocks' float64 dot products (:func:`gram_partials`) in block order, whoever calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergelab.ops.blocks import block_ranges, block_size

Gram = list[list[float]]


def gram_partials(blocks: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] | None = None, *,
                  wide: bool = True) -> list[float]:
    """The upper triangle (row by row, diagonal included) of the Gram matrix of one block of each vector:
    ``<x_i[b], x_j[b]>`` for ``i <= j``, as Python floats. ``wide``: the dot products of the blocks widened
    to float64 (into ``buffers``, float64 tensors of the blocks' size a block kernel reuses, else new ones:
    the same values either way); else of the blocks as given (float32 for model stock and SLERP: each
    block's dot is accurate to about 1e-7 relative, ample for an angle or a ratio, at a third of the cost)."""
    if not wide:
        vs = list(blocks)
    elif buffers is None:
        vs = [b.double() for b in blocks]
    else:
        vs = [w.copy_(b) for w, b in zip(buffers, blocks)]
    return [float(torch.dot(vs[i], vs[j])) for i in range(len(vs)) for j in range(i, len(vs))]


def gram_from_partials(partials: Sequence[Sequence[float]], n: int) -> Gram:
    """The Gram matrix from the per-block partials of :func:`gram_partials`, summed in block order."""
    upper = [0.0] * (n * (n + 1) // 2)
    for part in partials:
        for k, v in enumerate(part):
            upper[k] += v
    g = [[0.0] * n for _ in range(n)]
    k = 0
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = upper[k]
            k += 1
    return g


def gram(vectors: Sequence[torch.Tensor], *, wide: bool = True) -> Gram:
    """``G_ij = <x_i, x_j>`` of the flattened ``vectors``: the dot products of blocks of
    :func:`mergelab.ops.blocks.block_size` entries (in float64, or with ``wide=False`` in the vectors' dtype:
    :func:`gram_partials`), summed in float64 in block order (the block kernels' order)."""
    flats = [v.reshape(-1) for v in vectors]
    n = flats[0].numel()
    parts = [gram_partials([f[a:b] for f in flats], wide=wide) for a, b in block_ranges(n, block_size())]
    return gram_from_partials(parts, len(flats))


def combine(vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i x_i`` in the vectors' dtype, in model order (``x_0 c_0``, then ``add_(x_i, alpha=c_i)``)."""
    out = vectors[0] * coefficients[0]
    for x, c in zip(vectors[1:], coefficients[1:]):
        out.add_(x, alpha=c)
    return out


def _quad(g: Gram, a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    return sum(a[i] * g[i][j] * b[j] for i in range(n) for j in range(n))


# ------------------------------------------------------------------------------------------- NuSLERP


def nuslerp_coefficients(g: Gram, t: float, *, eps: float = 1e-8, norm_eps: float = 1e-7) -> tuple[float, float]:
    """The coefficients ``(c_0, c_1)`` of NuSLERP of two flattened vectors (mergekit's ``nuslerp``, flatten):

    ``cos theta = <v_0, v_1> / (max(|v_0|, 1e-7) max(|v_1|, 1e-7))`` clamped to [-1, 1];
    ``(sin((1-t) theta), sin(t theta)) / sin theta``, or the linear ``(1 - t, t)`` where ``|sin theta| < 1e-8``
    (colinear). A zero vector gives ``cos = 0`` (theta = pi/2), as mergekit."""
    n0 = max(math.sqrt(max(g[0][0], 0.0)), norm_eps)
    n1 = max(math.sqrt(max(g[1][1], 0.0)), norm_eps)
    cos = max(-1.0, min(1.0, g[0][1] / (n0 * n1)))
    theta = math.acos(cos)
    s = math.sin(theta)
    if abs(s) < eps:
        return 1.0 - t, t
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def nuslerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int, *, eps: float = 1e-8,
                 norm_eps: float = 1e-7) -> torch.Tensor:
    """NuSLERP slice by slice along ``dim`` (mergekit's ``nuslerp`` without flatten: ``dim=-1`` interpolates
    each row, ``dim=0`` each column): the formula of :func:`nuslerp_coefficients` per slice, its
    coefficients in float64 from float64 reductions, the combination in the inputs' dtype."""
    a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    a64, b64 = a.double(), b.double()
    n0 = a64.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
    n1 = b64.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
    cos = ((a64 * b64).sum(dim=-1, keepdim=True) / (n0 * n1)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    colinear = s.abs() < eps
    safe = torch.where(colinear, torch.ones_like(s), s)
    c0 = torch.where(colinear, torch.full_like(s, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / safe)
    out = a * c0.to(a.dtype) + b * c1.to(b.dtype)
    return out.transpose(dim, -1).contiguous()


# ---------------------------------------------------------------------------------------- Multi-SLERP


def multislerp_coefficients(g: Gram, weights: Sequence[float], *, normalize_weights: bool = True,
                            eps: float = 1e-8) -> list[float]:
    """The coefficients of Multi-SLERP (Goddard 2025, mergekit's ``multislerp``): barycentric interpolation
    on the hypersphere through the tangent space at the weighted mean direction.

    With ``w`` normalised to sum 1 (``normalize_weights``), ``n_i = |x_i|``, ``u_i = x_i / (n_i + eps)``,
    ``m' = sum_i w_i u_i`` and ``m = m' / |m'|``: the tangent vectors ``u_i - <u_i, m> m`` have the weighted sum
    ``m' - <m', m> m = 0``, so the exponential map returns ``m`` itself and the result is
    ``(sum_i w_i n_i) m = sum_i c_i x_i`` with ``c_i = (sum_j w_j n_j) w_i / ((n_i + eps) |m'|)`` (mergekit's
    explicit tangent step adds only its rounding). ``|m'| < eps``: two vectors interpolate linearly
    (``c = w``), more are an error (antipodal inputs balancing out), as in mergekit; all-zero vectors (a
    tensor no model changed) give zero.
    """
    w = list(weights)
    if normalize_weights:
        total = sum(w)
        w = [v / total for v in w]
    n = len(w)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    a = [w[i] / (norms[i] + eps) for i in range(n)]
    mean_norm = math.sqrt(max(_quad(g, a, a), 0.0))
    if mean_norm < eps:
        if all(ni == 0.0 for ni in norms):
            return [0.0] * n  # every vector zero (a tensor no model changed): zero (mergekit raises for N > 2)
        if n == 2:
            return w
        raise ValueError("multislerp: the weighted sum of the unit vectors is zero (antipodal vectors whose "
                         "weights balance out); use different weights")
    scale = sum(wi * ni for wi, ni in zip(w, norms)) / mean_norm
    return [scale * ai for ai in a]


# --------------------------------------------------------------------------------------- Karcher mean


def karcher_coefficients(g: Gram, weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """The coefficients of the Karcher (Frechet) mean on the unit sphere, scaled by the weighted mean norm
    (Karcher 1977; mergekit's ``karcher``), iterated on the coefficients of the span (float64).

    ``alpha_i = w_i / sum_j w_j``; vectors with ``|x_i| <= tol`` leave the mean (the others' alphas
    renormalised) but count in the scale. ``u_i = x_i / |x_i|``; start ``u = normalise(sum_i a_i u_i)`` (the
    first unit vector if that is shorter than ``tol``); repeat up to ``max_iter`` times: ``d_i = <u, u_i>``
    clamped, ``theta_i = arccos d_i``, ``T = sum_{theta_i >= tol} a_i theta_i / sin(theta_i) (u_i - d_i u)``
    (the Riemannian gradient, the mean of the log maps); stop when ``|T| < tol``, else
    ``u <- cos|T| u + sin|T| T / |T|`` (the exponential map), renormalised. The result is
    ``(sum_i alpha_i |x_i|) u``. Returns ``c`` with result ``sum_i c_i x_i``; all zeros when every vector is
    (near) zero.
    """
    n = len(weights)
    total = float(sum(weights))
    alphas = [w / total for w in weights]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    a_sum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / a_sum for i in valid}
    # Gram matrix of the unit vectors u_i (valid ones; others never enter)
    unit = [[g[i][j] / (norms[i] * norms[j]) if i in a and j in a else 0.0 for j in range(n)] for i in range(n)]
    c = [a.get(i, 0.0) for i in range(n)]  # u = sum_i c_i u_i
    norm_u = math.sqrt(max(_quad(unit, c, c), 0.0))
    if norm_u < tol:
        c = [1.0 if i == valid[0] else 0.0 for i in range(n)]
    else:
        c = [v / norm_u for v in c]
    for _ in range(max_iter):
        dots = [sum(unit[i][j] * c[j] for j in range(n)) for i in range(n)]
        step = [0.0] * n
        for i in valid:
            d = max(-1.0, min(1.0, dots[i]))
            theta = math.acos(d)
            if theta < tol:
                continue
            k = a[i] * theta / math.sin(theta)
            step[i] += k
            for j in range(n):
                step[j] -= k * d * c[j]
        norm_t = math.sqrt(max(_quad(unit, step, step), 0.0))
        if norm_t < tol:
            break
        cs, sn = math.cos(norm_t), math.sin(norm_t)
        c = [cs * c[j] + sn * step[j] / norm_t for j in range(n)]
        norm_u = math.sqrt(max(_quad(unit, c, c), 0.0))
        if norm_u > tol:
            c = [v / norm_u for v in c]
    scale = sum(alphas[i] * norms[i] for i in range(n))
    return [scale * c[i] / norms[i] if i in a else 0.0 for i in range(n)]
