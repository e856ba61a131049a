"""RAM's split of the task vectors into shared and unique entries (Yuan et al. 2026, "Behavior Knowledge Merge in
Reinforced Agentic Models", arXiv 2601.13572): which models changed an entry, how many did, each model's count of
shared and unique entries, the rescaling of unique entries, and the merge that averages the shared entries and
keeps the unique ones.

Notation: task vectors ``tau_i`` (one tensor, or one block of it), ``m_ij = [|tau_ij| > epsilon]`` (model i
changed entry j), ``c_j = sum_i m_ij`` (how many models changed it). An entry is *unique* when ``c_j = 1``,
*shared* when ``c_j >= 2``, unchanged when ``c_j = 0``. Every operator is entry by entry except the counts of
:func:`shared_unique_counts`, which are integers: summed over blocks they are the whole tensor's, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def active_masks(taus: Sequence[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """``m_ij = |tau_ij| > epsilon`` (bool), one mask per task vector: the entries model i changed. A NaN is not
    above any threshold (the back-ends check the inputs of methods that can drop a non-finite entry)."""
    return [tau.abs() > epsilon for tau in taus]


def active_count(masks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``c_j = sum_i m_ij``, the number of models that changed entry j, in ``dtype`` (exact: a small integer)."""
    if len(masks) == 0:
        raise ValueError("need at least one mask")
    count = masks[0].to(dtype)
    for m in masks[1:]:
        count.add_(m)
    return count


def shared_unique_counts(masks: Sequence[torch.Tensor], count: torch.Tensor) -> list[tuple[int, int]]:
    """Per model i, ``(S_i, U_i)``: ``S_i = #{j : m_ij, c_j >= 2}`` its changed entries other models changed too,
    ``U_i = #{j : m_ij, c_j = 1}`` those only it changed. Integers, so the counts of a tensor's blocks add up to
    the tensor's."""
    unique = count == 1
    out = []
    for m in masks:
        u = int(torch.count_nonzero(m & unique))
        out.append((int(torch.count_nonzero(m)) - u, u))
    return out


def unique_scale(shared: int, unique: int, r: float, alpha: float) -> float:
    """RAM+'s factor on a model's unique entries: ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)`` with the overlap
    ratio ``rho_i = S_i / U_i`` (:func:`shared_unique_counts`), in float32 arithmetic (``S_i`` and ``U_i`` rounded
    to float32, the quotient, the clamp, the product and the sum each rounded to float32, as mergekit's
    ``ramplus_tl`` computes it). A model with no unique entry (``U_i = 0``) has nothing to scale; its factor is
    ``1 + r alpha`` if it changed any entry, else 1."""
    s = torch.tensor(float(shared), dtype=torch.float32)
    u = torch.tensor(float(unique), dtype=torch.float32)
    if unique == 0:
        rho = torch.tensor(float("inf") if shared > 0 else 0.0, dtype=torch.float32)
    else:
        rho = s / u
    return float(1 + r * rho.clamp(min=0, max=alpha))


def overlap_merge(taus: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], count: torch.Tensor,
                  scales: Sequence[float] | None = None) -> torch.Tensor:
    """RAM's merge of the task vectors, entry by entry:

    ``merged_j = sum_i m_ij * (lambda_i tau_ij if c_j = 1 else tau_ij / c_j)``

    so a unique entry passes through (times its model's ``lambda_i``; 1 without ``scales``: RAM), a shared entry
    is the mean of the models that changed it, an unchanged entry is 0. Each model's term is
    ``(t u) lambda_i + (t s) / max(c, 1)`` with ``t = tau_i m_i``, ``u = [c = 1]``, ``s = [c >= 2]`` (the other
    products are signed zeros), and the terms are summed in model order: the operations of mergekit's ``ram``
    and ``ramplus_tl``, whose sum over the stacked models is this order for up to four models.
    """
    if len(taus) == 0 or len(taus) != len(masks):
        raise ValueError(f"need one mask per task vector, got {len(taus)} task vectors and {len(masks)} masks")
    if scales is not None and len(scales) != len(taus):
        raise ValueError(f"need one scale per task vector, got {len(scales)} for {len(taus)}")
    unique = count == 1
    shared = count > 1
    divisor = count.clamp_min(1.0)
    out = torch.empty_like(taus[0])
    term = torch.empty_like(taus[0])
    part = torch.empty_like(taus[0])
    for i, (tau, m) in enumerate(zip(taus, masks)):
        torch.mul(tau, m, out=part)  # t = tau_i m_i
        target = out if i == 0 else term
        torch.mul(part, unique, out=target)
        if scales is not None and scales[i] != 1.0:  # x * 1 == x exactly: skip the pass
            target.mul_(scales[i])
        target.add_(part.mul_(shared).div_(divisor))
        if i > 0:
            out.add_(term)
    return out
