"""Gradient heterogeneity of a pool from the Gram matrix of its task gradients (numpy only).

With task gradients ``g_i = grad F_i(theta)``, sample counts ``n_i`` and ``p = n / sum(n)``, the heterogeneity of
task ``i`` is ``delta_i^2 = ||g_i - sum_j p_j g_j||^2``. Expanded in the Gram matrix ``G_ij = <g_i, g_j>``,

    ``delta_i^2 = G_ii - 2 sum_j p_j G_ij + sum_jk p_j p_k G_jk``,

so the heterogeneity of any sub-pool follows from the rows and columns of ``G`` it keeps, without new
gradients. The gradients and ``G`` are measured by :func:`mergelab.analysis.estimators.gradient_heterogeneity`
(torch); this module is the part the bound's numpy-only modules (:mod:`mergelab.analysis.bound_predictions`)
need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["heterogeneity_from_gram"]


def heterogeneity_from_gram(gram: np.ndarray, n: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(delta2, p)`` from the Gram matrix of task gradients and the sample counts ``n``.

    ``delta_i^2 = G_ii - 2 sum_j p_j G_ij + sum_jk p_j p_k G_jk`` with ``p = n / sum(n)`` (clipped at 0 against
    rounding).
    """
    g = np.asarray(gram, dtype=np.float64)
    p = np.asarray(n, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] != p.shape[0]:
        raise ValueError(f"gram must be [N, N] with N = len(n); got {g.shape} and {p.shape[0]} counts")
    if np.any(p <= 0):
        raise ValueError("sample counts must be positive")
    p = p / p.sum()
    delta2 = np.diag(g) - 2.0 * g @ p + float(p @ g @ p)
    return np.maximum(delta2, 0.0), p
