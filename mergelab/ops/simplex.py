"""Euclidean projections onto the simplex (for coefficients that must form a convex combination).

Two sets, both of "radius" ``z > 0``, projected along the last dimension (leading dimensions are a batch):

* the probability simplex ``Delta_z = {x : x_j >= 0, sum_j x_j = z}`` (:func:`project_simplex`);
* the solid simplex ``S_z = conv{0, z e_1, ..., z e_n} = {x : x_j >= 0, sum_j x_j <= z}``
  (:func:`project_solid_simplex`).

:func:`project_simplex` is the exact sort-based algorithm of Held, Wolfe & Crowder (1974), as given in
Duchi, Shalev-Shwartz, Singer & Chandra (ICML 2008, "Efficient Projections onto the l1-Ball for Learning in
High Dimensions", Fig. 1); O(n log n) per row. With ``u`` the entries of ``v`` sorted in decreasing order::

    rho = max { j in 1..n : u_j - (sum_{r<=j} u_r - z) / j > 0 }
    tau = (sum_{r<=rho} u_r - z) / rho
    x   = max(v - tau, 0)

``j = 1`` always satisfies the condition (``u_1 - (u_1 - z) = z > 0``), so ``rho`` exists for every input.
The result is the unique minimiser of ``||x - v||_2`` over the set (it is a strictly convex problem on a
closed convex set): the KKT conditions give ``x_j = max(v_j - tau, 0)`` for the multiplier ``tau`` that makes
the entries sum to ``z``, and the sort finds that ``tau``.

:func:`project_solid_simplex`: if ``max(v, 0)`` (the projection onto the non-negative orthant) already sums
to at most ``z`` it is feasible, hence the projection; otherwise the constraint ``sum x <= z`` is active at
the optimum and the answer is the projection onto ``Delta_z``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["project_simplex", "project_solid_simplex"]


def _check(v: torch.Tensor, radius: float) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"simplex projection needs a floating tensor, got {v.dtype}")
    if v.ndim == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"simplex projection needs at least one entry along the last dimension, got shape {tuple(v.shape)}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"simplex radius must be a finite number > 0, got {radius!r}")
    if not torch.isfinite(v).all():
        raise ValueError("cannot project a vector holding NaN or Inf onto the simplex")
    # half precision loses the cumulative sums: compute in float32 at least
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


def project_simplex(v: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """``argmin_x ||x - v||_2`` subject to ``x >= 0``, ``sum(x) = radius``, along the last dimension.

    Held-Wolfe-Crowder / Duchi et al. (2008) sort-based algorithm (see the module docstring). Returns a new
    tensor of ``v``'s shape and dtype; leading dimensions are independent rows.
    """
    w = _check(v, radius)
    n = w.shape[-1]
    u, _ = torch.sort(w, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - radius
    j = torch.arange(1, n + 1, dtype=w.dtype, device=w.device)
    cond = (u - css / j) > 0
    # rho = the largest j satisfying the condition (the condition holds on a prefix 1..rho)
    index = torch.arange(n, device=w.device)
    rho = torch.where(cond, index, torch.zeros_like(index)).amax(-1, keepdim=True)
    tau = torch.gather(css, -1, rho) / (rho + 1).to(w.dtype)
    return torch.clamp(w - tau, min=0).to(v.dtype)


def project_solid_simplex(v: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """``argmin_x ||x - v||_2`` subject to ``x >= 0``, ``sum(x) <= radius``, along the last dimension.

    ``max(v, 0)`` when that sums to at most ``radius``, else :func:`project_simplex` (module docstring).
    """
    w = _check(v, radius)
    clamped = torch.clamp(w, min=0)
    inside = clamped.sum(-1, keepdim=True) <= radius
    if bool(inside.all()):
        return clamped.to(v.dtype)
    return torch.where(inside, clamped, project_simplex(w, radius)).to(v.dtype)
