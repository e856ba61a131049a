"""Inner products of whole tensors by blocks, and the coefficients the Gram-matrix methods take from them.

Model stock, SLERP, NuSLERP, Multi-SLERP, the Karcher mean (and SCE's energies) return a linear combination
``sum_i c_i x_i`` of their input vectors (models or task vectors, flattened), whose coefficients depend only on
the inner products ``G_ij = <x_i, x_j>``: every vector the algorithms form (unit vectors, means, tangent
vectors, iterates) lies in the span of the inputs, so they run on the ``N x N`` Gram matrix and the tensor is
read twice, once for ``G`` and once for the combination, both by cache-sized blocks.

**The Gram rule, one for the reference and every back-end.** ``G`` is the sum, in float64 and in block order,
of each block's dot products in the compute dtype (float32, float64 for float64 inputs), the blocks being
consecutive ranges of 2^18 entries (:data:`mergelab.ops.blocks.BLOCK`) of the flattened vectors, and a block's
dot product the float64 sum of the float32 dot products of its chunks of 8192 entries (:func:`block_dot`, the
only code that computes one: the torch reference calls it on ``.numpy()`` views, the torch block kernels and
the numpy back-end on their blocks, so all of them get the same bits). On vectors of equal-magnitude entries
at an angle of 0.01 rad (the worst case for a float32 sum) cos comes within 4e-7 of the exact value (one BLAS
``sdot`` over the block: 3.5e-5, in an order that may depend on the BLAS build and thread count; torch's
float32 dot: 1.3e-5; numpy's pairwise sum of the products: 1e-8 at 4x the time), for 0.03 ms per dot of a block here.
Until issue 14 these were torch's whole-tensor float32 reductions, which no block kernel can reproduce (and
which gave ``cos = 1.0078`` on the benchmark's embedding, exact 0.999949).

This module is torch-free: the numpy back-end uses it without importing torch. The tensor-level operators
are :mod:`mergelab.ops.spherical` (``gram``, ``combine``) and :mod:`mergelab.ops.interpolate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mergelab.errors import MethodError

Gram = list[list[float]]

#: Entries per chunk of a block's dot product (:func:`block_dot`).
CHUNK = 8192


def block_dot(x: Any, y: Any) -> float:
    """``<x, y>`` of two contiguous 1-D arrays of one float dtype (a block of each vector): the dot products of
    consecutive chunks of ``CHUNK`` entries (the last one shorter) in that dtype (``np.vecdot``, one call for
    all chunks), summed in float64 by numpy's pairwise summation, the short chunk's added last. The result depends on the values and on numpy's dot kernel for
    the CPU, not on any thread count."""
    n = x.shape[0]
    full = n - n % CHUNK
    total = 0.0
    if full:
        parts = np.vecdot(x[:full].reshape(-1, CHUNK), y[:full].reshape(-1, CHUNK))
        total = float(np.add.reduce(parts, dtype=np.float64))
    if full < n:
        total += float(np.vecdot(x[full:], y[full:]))
    return total


#: numpy releases the GIL in a gufunc call only above this many outer iterations (its
#: ``NPY_BEGIN_THREADS_THRESHOLDED``): one ``np.vecdot`` over a block's 32 chunks holds it, so the other
#: compute threads wait.
_GIL_FREE_CALL = 500


def gram_partials(blocks: Sequence[Any]) -> list[float]:
    """The upper triangle (row by row, diagonal included) of the Gram matrix of one block of each vector:
    ``<x_i[b], x_j[b]>`` for ``i <= j`` (:func:`block_dot`).

    ``blocks`` may be a 2-D array whose rows are the vectors' blocks (the numpy kernels build them so): when
    its full chunks number more than 500 per pair and vector (4 vectors of a 2^18 block: 4 * 4 * 32), every
    chunk's dot of every pair (both orders: ``k^2`` instead of ``k (k+1) / 2`` dots) is one ``np.vecdot``
    call, which runs without the GIL, so the block's other compute threads are not held up; each dot is the
    same BLAS call on the same chunk, summed per pair in the same order, so the result is :func:`block_dot`'s
    bit for bit (``tests/test_gram_matrix.py``)."""
    k = len(blocks)
    if isinstance(blocks, np.ndarray) and blocks.ndim == 2:
        n = blocks.shape[1]
        full = n - n % CHUNK
        if k * k * (full // CHUNK) > _GIL_FREE_CALL:
            chunks = blocks[:, :full].reshape(k, full // CHUNK, CHUNK)
            sums = np.add.reduce(np.vecdot(chunks[:, None], chunks[None, :]), axis=-1, dtype=np.float64)
            out = []
            for i in range(k):
                for j in range(i, k):
                    total = float(sums[i, j])
                    if full < n:
                        total += float(np.vecdot(blocks[i, full:], blocks[j, full:]))
                    out.append(total)
            return out
    return [block_dot(blocks[i], blocks[j]) for i in range(k) for j in range(i, k)]


def squared_norm_partials(blocks: Sequence[Any]) -> list[float]:
    """``<x_i[b], x_i[b]>`` per vector: the diagonal of :func:`gram_partials` (the same dots, the same bits)."""
    return [block_dot(x, x) for x in blocks]


def gram_from_partials(partials: Sequence[Sequence[float]], n: int) -> Gram:
    """The Gram matrix of ``n`` vectors from the per-block partials of :func:`gram_partials`, summed in
    float64 in block order."""
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


def _quad(g: Gram, a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    return sum(a[i] * g[i][j] * b[j] for i in range(n) for j in range(n))


# ------------------------------------------------------------------------------------------- SLERP


#: SLERP's default colinearity threshold on ``|cos Omega|`` (mergekit's is 0.9995).
PARALLEL = 1.0 - 1e-6


def slerp_coefficients_from_gram(g: Gram, t: float, parallel_threshold: float = PARALLEL) -> tuple[float, float]:
    """SLERP's coefficients ``(c_a, c_b)`` from the Gram matrix ``g`` of ``(a, b)`` (Shoemake 1985):
    ``|a| = sqrt(g_00)``, ``|b| = sqrt(g_11)``, ``cos Omega = g_01 / (|a| |b|)``,
    ``(sin((1-t) Omega) / sin Omega, sin(t Omega) / sin Omega)``; the linear ``(1 - t, t)`` for a zero vector or
    ``|cos Omega| > parallel_threshold`` (nearly (anti)parallel vectors)."""
    na, nb = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    if na == 0 or nb == 0:
        return 1.0 - t, t
    cos = g[0][1] / (na * nb)
    if abs(cos) > parallel_threshold:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


# ------------------------------------------------------------------------------------- model stock


def model_stock_ratio_from_gram(g: Gram, *, extrapolate: bool = False) -> float:
    """:func:`mergelab.ops.model_stock_ratio` from the Gram matrix ``g`` of the task vectors (:func:`mergelab.ops.gram`,
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
        denominator = 1.0 + (n - 1) * cos
        # cos = -1/(N-1) exactly (e.g. two scalars moved apart): the ratio is unbounded; the base (mergekit's
        # division writes Inf/NaN there)
        return n * cos / denominator if denominator != 0.0 else 0.0
    if min(norms) == 0:
        return 1.0
    cosines = [g[i][j] / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    if cos <= 0:
        return 0.0
    return n * cos / (1.0 + (n - 1) * cos)


# ------------------------------------------------------------------------------------------- NuSLERP


def nuslerp_t(weights: Sequence[float]) -> float:
    """NuSLERP's position from the two models' weights: ``t = w_1 / (w_0 + w_1)`` (0.5 when the sum is below
    1e-6 in magnitude, as mergekit)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


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
        raise MethodError("multislerp: the weighted sum of the unit vectors is zero (antipodal vectors whose "
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
