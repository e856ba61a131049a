"""Spectral operators on the task matrices of one layer: TSV-Merge and isotropic merging (Iso-C, Iso-CTS).

These methods act on a weight *matrix* ``M_i = w_i tau_i`` (m x n, rank at most r = min(m, n)) through its
thin SVD ``M_i = U_i diag(s_i) V_i^T``; every function returns the merged task matrix (before the method's
scaling ``lambda``). Which tensors are matrices, and how the others are merged, is the catalog's business
(:func:`mergelab.methods.catalog.tsv_merge`).

Two rules make the results well defined where the papers' code (and FusionBench's port of it) depends on
the arbitrary singular vectors LAPACK returns for zero singular values:

- **numerical rank** (:func:`svd_components`): the components whose singular value is at most
  ``max(m, n) * eps * s_max`` (numpy's ``matrix_rank`` tolerance) are dropped. Their singular vectors span
  an arbitrary basis of the null space; the papers' code keeps them, and although they carry a zero singular
  value they enter the orthogonalisation of the others (TSV, Iso-CTS) or, in Iso-C, get the mean singular
  value. For full-rank task matrices (fine-tuned weights) nothing is dropped and the results are the papers'.
- **orthogonalisation** (:func:`polar`): the orthonormal factor of ``X = P diag(sigma) Q^T`` is ``P Q^T``
  over the nonzero ``sigma`` only (a partial isometry), i.e. ``X (X^T X)^{+1/2}``, unique; the papers'
  ``P Q^T`` from the full thin SVD equals it when X has full column rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _tolerance(s: torch.Tensor, shape: tuple[int, int]) -> float:
    """The numerical-rank cut of singular values ``s`` (descending) of an ``shape`` matrix."""
    if s.numel() == 0:
        return 0.0
    return float(s[0]) * max(shape) * torch.finfo(s.dtype).eps


def svd_components(m: torch.Tensor, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``m = U diag(s) V^T`` restricted to the numerical rank (singular values above
    ``max(m, n) * eps * s_max``), and to the ``limit`` largest if given. Returns ``(U, s, V^T)`` with
    ``U`` m x rho, ``s`` rho, ``V^T`` rho x n (rho may be 0)."""
    if m.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(m.shape)}")
    if m.numel() == 0:
        return m.new_zeros(m.shape[0], 0), m.new_zeros(0), m.new_zeros(0, m.shape[1])
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rho = int((s > _tolerance(s, tuple(m.shape))).sum())
    if limit is not None:
        rho = min(rho, limit)
    return u[:, :rho], s[:rho], vh[:rho]


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of ``x`` (m x K): with ``x = P diag(sigma) Q^T`` (thin SVD), ``P Q^T`` over
    the nonzero ``sigma`` (numerical rank), i.e. ``x (x^T x)^{+1/2}``: the matrix with orthonormal columns
    (on x's column space) nearest to ``x`` in Frobenius norm (orthogonal Procrustes). This is TSV's and
    Iso-CTS's decorrelation of the concatenated singular vectors (Gargiulo et al. 2025: the whitening of the task singular vectors)."""
    p, _, qh = svd_components(x)
    return p @ qh


def task_singular_vectors(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-Merge of the task matrices ``taus`` (Gargiulo et al., CVPR 2025), without lambda.

    With T matrices m x n, r = min(m, n) and k = floor(r / T): each ``tau_i = U_i diag(s_i) V_i^T`` keeps
    its k leading components (the task singular vectors); they are concatenated,
    ``U = [U_1[:, :k] ... U_T[:, :k]]``, ``S = diag(s_1[:k] ... s_T[:k])``, ``V = [V_1[:, :k] ... V_T[:, :k]]``,
    decorrelated by orthogonalisation, ``U_perp = polar(U)``, ``V_perp = polar(V)``, and recombined:
    ``tau = U_perp S V_perp^T``. If the tasks' subspaces are mutually orthogonal (and each task has rank
    <= k) this is ``sum_i tau_i``, task arithmetic; in general it is the sum of the rank-k truncations with
    the interference between tasks' singular vectors removed. k = 0 (r < T) gives the zero matrix, as in
    the papers' code. Components beyond a task's numerical rank are not kept (module docstring).
    """
    if not taus:
        raise ValueError("need at least one task matrix")
    shape = tuple(taus[0].shape)
    k = min(shape) // len(taus)
    parts = [svd_components(t, limit=k) for t in taus]
    s = torch.cat([p[1] for p in parts])
    if s.numel() == 0:
        return taus[0].new_zeros(shape)
    u_perp = polar(torch.cat([p[0] for p in parts], dim=1))
    vh_perp = polar(torch.cat([p[2] for p in parts], dim=0).T).T
    return torch.linalg.multi_dot((u_perp, torch.diag(s), vh_perp))


def isotropic(total: torch.Tensor) -> torch.Tensor:
    """Iso-C's isotropic spectrum (Marczak et al., ICML 2025), without lambda: with the task-arithmetic
    sum ``total = U diag(s) V^T`` of numerical rank rho, ``sigma_bar U V^T`` where ``sigma_bar`` is the mean
    of its rho singular values: same singular subspaces, every direction scaled equally (a flat spectrum).
    The Frobenius norm becomes ``sigma_bar sqrt(rho) <= |total|_F``. A zero matrix stays zero."""
    u, s, vh = svd_components(total)
    if s.numel() == 0:
        return total.new_zeros(total.shape)
    return (u * s.mean()) @ vh


def common_and_specific_sizes(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's subspace sizes ``(c, d)`` for rank r and T tasks (the authors' code): ``c = floor(f r)``,
    then the task-specific total ``round((r - c) / T) T`` (Python's rounding, half to even) so that it
    divides equally, ``c = r - T d``; ``d`` is capped at ``floor(r / T)`` so that ``c >= 0`` (the code's
    rounding can ask for more than r when r is small)."""
    c = int(r * common_space_fraction)
    d = min(round((r - c) / n_tasks), r // n_tasks)
    return r - n_tasks * d, d


def isotropic_common_specific(taus: Sequence[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025), without lambda.

    With the task-arithmetic sum ``total = sum_i tau_i = U diag(s) V^T`` and sizes ``(c, d)`` from
    :func:`common_and_specific_sizes`: the common subspace is ``U_c = U[:, :c]`` (with ``s[:c]``,
    ``V[:, :c]``); each task's residual outside it, ``R_i = tau_i - U_c U_c^T tau_i``, contributes its d
    leading components ``U_i^R, s_i^R, V_i^R``. The left vectors ``[U_1^R ... U_T^R, U_c]`` and the right
    ones are orthogonalised (:func:`polar`) and the spectrum made isotropic:
    ``tau = sigma_bar U_perp V_perp^T`` with ``sigma_bar`` the mean of all the kept singular values
    (``s[:c]`` and every ``s_i^R``). With d = 0 (fraction 1, or r small) this is :func:`isotropic`
    restricted to the c leading directions.
    """
    if not taus:
        raise ValueError("need at least one task matrix")
    shape = tuple(taus[0].shape)
    total = taus[0].clone()
    for t in taus[1:]:
        total.add_(t)
    c, d = common_and_specific_sizes(min(shape), len(taus), common_space_fraction)
    u_c, s_c, vh_c = svd_components(total, limit=c)
    us, ss, vhs = [], [], []
    if d > 0:
        for t in taus:
            residual = t - u_c @ (u_c.T @ t)
            u_r, s_r, vh_r = svd_components(residual, limit=d)
            us.append(u_r)
            ss.append(s_r)
            vhs.append(vh_r)
    s = torch.cat([*ss, s_c])
    if s.numel() == 0:
        return total.new_zeros(shape)
    u_perp = polar(torch.cat([*us, u_c], dim=1))
    vh_perp = polar(torch.cat([*vhs, vh_c], dim=0).T).T
    return (u_perp * s.mean()) @ vh_perp


__all__ = ["common_and_specific_sizes", "isotropic", "isotropic_common_specific", "polar", "svd_components",
           "task_singular_vectors"]
