"""SCE's select and calculate steps (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", sec. 3.3):
variance-based selection of the entries where the task vectors differ most, and per-model weights from the
task vectors' energy. The erase step is TIES's sign consensus (:mod:`mergelab.ops.consensus`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergelab.ops.sparsify import top_set


def expert_variance(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entry by entry, the population variance of the N task vectors:
    ``var_j = sum_i (tau_ij - mean_j)^2 / N`` with ``mean_j = sum_i tau_ij / N`` (model order; ``torch.var``
    with ``unbiased=False`` over the experts, as mergekit)."""
    n = len(taus)
    mean = taus[0].clone()
    for tau in taus[1:]:
        mean.add_(tau)
    mean.div_(n)
    var = torch.zeros_like(mean)
    diff = torch.empty_like(mean)
    for tau in taus:
        torch.sub(tau, mean, out=diff)
        var.addcmul_(diff, diff)
    return var.div_(n)


def select_count(nonzero: int, select_topk: float) -> int:
    """How many entries SCE's select step keeps: ``floor(select_topk * #{var_j != 0})`` (mergekit's
    ``int(nonzero * density)``; 0 keeps none)."""
    return int(math.floor(select_topk * nonzero))


def select_mask(variance: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE's select step: the ``k`` (:func:`select_count`) entries of largest variance, ties kept first in flat
    order (:func:`mergelab.ops.sparsify.top_set`, TIES's rule; mergekit's ``topk`` breaks them arbitrarily)."""
    k = select_count(int(torch.count_nonzero(variance)), select_topk)
    return top_set(variance, k)


def energy_weights(sum_squares: Sequence[float], numel: int, min_energy: float = 0.0) -> list[float]:
    """SCE's calculate step: ``w_i = E_i / sum_j E_j`` with ``E_i = mean_j tau_ij^2 = sum_squares[i] / numel``
    (the selected task vectors' energy); equal weights ``1/N`` when ``sum_j E_j`` is 0 or below ``min_energy``
    (mergekit: ``1e-6``)."""
    n = len(sum_squares)
    energy = [s / numel for s in sum_squares] if numel else [0.0] * n
    total = sum(energy)
    if total == 0.0 or total < min_energy:
        return [1.0 / n] * n
    return [e / total for e in energy]
