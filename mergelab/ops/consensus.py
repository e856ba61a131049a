"""Combining operators over the task vectors of one tensor: sums, means and TIES sign consensus.

Every function takes a sequence of task vectors ``taus`` (same shape) and per-model ``weights`` and returns
one tensor; nothing is stacked, so memory is one accumulator plus the inputs the caller already holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

SignRule = Literal["mass", "count"]
ZeroSign = Literal["drop", "positive"]
Divisor = Literal["count", "weight", "none"]
SignTest = Literal["tau", "weighted"]


def _check(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(taus) == 0:
        raise ValueError("need at least one task vector")
    if len(weights) != len(taus):
        raise ValueError(f"got {len(taus)} task vectors but {len(weights)} weights")


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i tau_i`` (task arithmetic's sum, Ilharco et al. 2023), accumulated in ``taus[0]``'s dtype."""
    _check(taus, weights)
    out = taus[0] * weights[0]
    for tau, w in zip(taus[1:], weights[1:]):
        out.add_(tau, alpha=w)
    return out


def weighted_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` (model soup / weight averaging, Wortsman et al. 2022)."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError("weights sum to zero; a weighted mean is undefined")
    return weighted_sum(taus, weights).div_(total)


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * x`` (the scaling coefficient lambda of task arithmetic and TIES)."""
    return x * factor


def elect_sign(
    taus: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, by: SignRule = "mass",
    zero: ZeroSign = "drop",
) -> torch.Tensor:
    """TIES sign election (Yadav et al. 2023, step 2), entry by entry.

    - ``mass`` (paper; default): ``gamma = sgn(sum_i w_i tau_i)``: the sign with the larger total magnitude;
    - ``count``: ``gamma = sgn(sum_i sgn(tau_i))``: the majority sign by number of models.

    Returns a tensor of -1, 0, +1 in the task vectors' dtype. An exact tie (a sum of exactly zero, either
    signed zero) elects, with ``zero``:

    - ``drop`` (default): 0, so no model agrees there and the merged entry is 0 (``sgn(0) = 0``, as the
      paper's formula);
    - ``positive``: +1, so the models with ``tau_i > 0`` there agree (mergekit's TIES family and SCE:
      ``sum >= 0`` elects +1).

    A NaN in a task vector reaches the merged entry either way (:func:`disjoint_mean` multiplies it in).

    The mass is summed as ``P + N`` with ``P = sum_i w_i max(tau_i, 0)`` and ``N = sum_i w_i min(tau_i, 0)``
    (each in model order): the same sum, rounded once where positive and negative parts meet, and ``P`` and
    ``N`` are exactly the numerators :func:`disjoint_mean` forms on each side, which lets the numpy engine
    (:mod:`mergelab.merging.numpy_kernels`) compute TIES from the two parts alone with the same result.
    """
    weights = [1.0] * len(taus) if weights is None else weights
    _check(taus, weights)
    if zero not in ("drop", "positive"):
        raise ValueError(f"zero sign must be 'drop' or 'positive', got {zero!r}")
    if by == "mass":
        positive = weighted_sum([tau.clamp_min(0) for tau in taus], weights)
        negative = weighted_sum([tau.clamp_max(0) for tau in taus], weights)
        sign = torch.sign(positive.add_(negative))
    elif by == "count":
        votes = torch.sign(taus[0])
        for tau in taus[1:]:
            votes.add_(torch.sign(tau))
        sign = torch.sign(votes)
    else:
        raise ValueError(f"sign election must be 'mass' or 'count', got {by!r}")
    if zero == "positive":  # +-0 -> 1; -1 and 1 unchanged
        if sign.device.type == "cpu" and sign.dtype != torch.bfloat16:
            s = sign.numpy()  # numpy's comparison and add are vectorised, torch's boolean ones are not
            np.add(s, np.equal(s, 0), out=s)
        else:
            sign.add_(sign == 0)
    return sign


def disjoint_mean(
    taus: Sequence[torch.Tensor],
    sign: torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    divisor: Divisor = "count",
    test: SignTest = "tau",
) -> torch.Tensor:
    """TIES disjoint merge (Yadav et al. 2023, step 3), entry by entry.

    With ``A_j`` the models agreeing with the elected sign ``gamma_j``:

    - ``test: tau`` (paper; default): ``A_j = {i : sgn(tau_ij) = gamma_j, tau_ij != 0}``;
    - ``test: weighted`` (mergekit): ``A_j = {i : sgn(w_i tau_ij) = gamma_j, w_i tau_ij != 0}``; the two
      differ only for negative weights (a model with ``w_i < 0`` joins the side its weighted vector is on);

    and the divisor

    - ``count`` (paper; default): ``sum_{i in A_j} w_i tau_ij / |A_j|``;
    - ``weight`` (mergekit's ``normalize: true``): ``sum_{i in A_j} w_i tau_ij / sum_{i in A_j} w_i``;
    - ``none`` (mergekit's ``normalize: false``, FusionBench's ``merge_func: sum``): ``sum_{i in A_j} w_i tau_ij``.

    Entries with no agreeing model are 0. With unit weights ``count`` and ``weight`` coincide.
    """
    weights = [1.0] * len(taus) if weights is None else weights
    _check(taus, weights)
    if divisor not in ("count", "weight", "none"):
        raise ValueError(f"disjoint divisor must be 'count', 'weight' or 'none', got {divisor!r}")
    if test not in ("tau", "weighted"):
        raise ValueError(f"sign test must be 'tau' or 'weighted', got {test!r}")
    numerator = torch.zeros_like(taus[0])
    denominator = torch.zeros_like(taus[0])
    agree = torch.empty_like(taus[0])
    for tau, w in zip(taus, weights):
        # tau_ij * gamma_j > 0  <=>  sgn(tau_ij) = gamma_j and tau_ij != 0 (gamma_j = 0 agrees with nobody)
        torch.mul(tau, sign, out=agree)
        if test == "weighted" and w < 0:
            agree.lt_(0)  # sgn(w tau) = -sgn(tau) for w < 0
        else:
            agree.gt_(0)
        numerator.addcmul_(tau, agree, value=w)
        if divisor != "none":
            denominator.add_(agree, alpha=(1.0 if divisor == "count" else w))
    if divisor == "none":
        return numerator
    # Entries with no agreeing model have numerator +-0 and denominator 0. A count is >= 1 elsewhere, and
    # so is a sum of weights >= tiny when every weight is: clamping the denominator makes those entries
    # +-0 / clamp = 0 with the other entries unchanged, in one float op (masked_fill is not vectorized).
    tiny = torch.finfo(denominator.dtype).tiny
    if divisor == "count":
        return numerator.div_(denominator.clamp_min_(1.0))
    if min(weights) >= tiny:
        return numerator.div_(denominator.clamp_min_(tiny))
    empty = denominator == 0  # agreeing weights may cancel: the entry is 0
    return numerator.masked_fill_(empty, 0.0).div_(denominator.masked_fill_(empty, 1.0))
