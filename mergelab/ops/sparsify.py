"""Sparsifying operators on one task vector: ``trim`` (TIES), ``trim_band`` (breadcrumbs), ``drop`` (DARE),
``magprune`` (DELLA).

Each takes a task vector ``tau`` (any shape, floating point) and returns a new tensor of the same shape;
inputs are never modified. All three are the "sparsification operator" T of Corollary 1 in THEORY.md.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from mergelab.ops.blocks import block_ranges, block_size
from mergelab.ops.l1_rule import block_l1, l1_factor, l1_from_partials
from mergelab.ops.select import keep_count, kth_largest

Rescale = Literal["inverse", "l1", "none"]
#: The rescaling of a magnitude trim (TIES) or band (breadcrumbs): ``none`` or mergekit's ``l1``.
TrimRescale = Literal["none", "l1"]


def _check_trim_rescale(rescale: str) -> None:
    if rescale not in ("none", "l1"):
        raise ValueError(f"rescale must be 'none' or 'l1', got {rescale!r}")


def _check_density(density: float) -> None:
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1], got {density}")


def keep_top(magnitude: torch.Tensor, threshold: float, ties: int | None) -> torch.Tensor:
    """Boolean mask of the entries kept by a top-k selection with k-th value ``threshold``.

    All entries with ``magnitude > threshold``, plus the first ``ties`` entries equal to it in flat order
    (all of them when ``ties`` is None). Breaking ties by position keeps exactly k entries even when many
    values tie at the threshold, as they do in bf16 task vectors (with ``>=`` a density of 0.5 kept 65% of
    the entries of a bf16 model).
    """
    keep = magnitude > threshold
    if ties is None:
        return keep | (magnitude == threshold)
    if ties > 0:
        equal = (magnitude == threshold).reshape(-1)
        n_equal = int(torch.count_nonzero(equal))
        if ties >= n_equal:
            keep |= equal.view_as(keep)
        else:
            first = torch.nonzero(equal).squeeze(1)[:ties]
            keep.view(-1)[first] = True
    return keep


def keep_top_into(
    magnitude: torch.Tensor, threshold: float, ties: int | None, out: torch.Tensor, tied: int | None = None
) -> int:
    """:func:`keep_top` written into the preallocated boolean ``out`` (same shape as ``magnitude``).

    For block-wise trimming, ``ties`` is how many entries tied at ``threshold`` may still be kept (the
    first ones in flat order), None to keep all of them. Returns how many tied entries this call kept, so
    a caller walking the blocks of a tensor in order subtracts it and keeps exactly what a whole-tensor
    :func:`keep_top` keeps. ``tied``, when known, is how many entries equal ``threshold`` (saves counting
    them). On the CPU the comparisons are numpy's on the same memory (vectorised, unlike torch's boolean
    comparisons): the same mask.
    """
    if (magnitude.device.type == "cpu" and out.device.type == "cpu" and magnitude.dtype != torch.bfloat16
            and out.is_contiguous()):
        x, o = magnitude.numpy(), out.numpy()
        t = x.dtype.type(threshold)
        if ties is not None and ties > 0 and tied is None:
            tied = int(np.count_nonzero(np.equal(x, t, out=o)))
        if ties is None or (ties > 0 and ties >= tied):  # type: ignore[operator]
            np.greater_equal(x, t, out=o)
            return 0 if ties is None else tied  # type: ignore[return-value]
        np.greater(x, t, out=o)
        if ties <= 0:
            return 0
        o.reshape(-1)[np.flatnonzero(x == t)[:ties]] = True
        return ties
    torch.gt(magnitude, threshold, out=out)
    if ties is None:
        out |= magnitude == threshold
        return 0
    if ties <= 0:
        return 0
    equal = magnitude == threshold
    n_equal = int(torch.count_nonzero(equal)) if tied is None else tied
    if ties >= n_equal:
        out |= equal
        return n_equal
    first = torch.nonzero(equal.reshape(-1)).squeeze(1)[:ties]
    out.view(-1)[first] = True
    return ties


def apply_mask_(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tau * keep`` in place (``keep`` boolean, same shape): the kept entries, and a zero of each dropped
    entry's sign. On the CPU numpy's product (vectorised; torch's by a boolean tensor is not)."""
    if tau.device.type == "cpu" and keep.device.type == "cpu" and tau.dtype != torch.bfloat16:
        x = tau.numpy()
        np.multiply(x, keep.numpy(), out=x)
        return tau
    return tau.mul_(keep)


def remove_into(keep: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``keep &= ~removed`` (boolean masks of one shape), numpy's on the CPU; ``removed`` is unchanged."""
    if keep.device.type == "cpu" and removed.device.type == "cpu":
        k = keep.numpy()
        np.greater(k, removed.numpy(), out=k)  # True > False: kept and not removed
        return keep
    keep &= removed.logical_not()
    return keep


class BlockTrim:
    """The trim of one task vector (:func:`trim` with a given threshold), applied block by block.

    ``threshold`` t and how the entries tied at it are kept: ``block_ties`` lists, per block in order,
    ``(kept, tied)`` (from :meth:`mergelab.ops.BlockKthLargest.tie_quotas` / ``tie_counts``), so blocks
    may be trimmed in any order; else ``ties`` is the number kept over the whole tensor, first come first
    kept, and blocks must come in order (None keeps them all). The common cases (a block keeps none or all
    of its tied entries) are one ``hardshrink`` (``x`` where ``|x| > lambda``, else 0), with lambda = t or
    the next float below t; only a block where the quota runs out needs the exact tie mask.
    """

    def __init__(self, threshold: float, dtype: torch.dtype, *, ties: int | None = None,
                 block_ties: list[tuple[int, int]] | None = None) -> None:
        t = torch.tensor(threshold, dtype=dtype)
        self.threshold = float(t)
        self.below = float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))) if threshold > 0 else 0.0
        self.remaining = ties
        self.block_ties = block_ties

    @property
    def in_order(self) -> bool:
        """Whether blocks must be trimmed in order (a tie quota over the whole tensor)."""
        return self.block_ties is None and self.remaining is not None

    def apply(self, index: int, tau: torch.Tensor, magnitude: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trimmed block ``index`` of the task vector (``tau``, consumed); ``magnitude`` (float) and ``mask``
        (bool) are scratch buffers of the block's size."""
        if self.block_ties is not None:
            kept, tied = self.block_ties[index]
        elif self.remaining is None:
            kept = tied = 0
            return torch.hardshrink(tau, self.below)
        else:
            kept, tied = self.remaining, -1  # unknown count: the exact path below counts it
        if kept == 0:
            return torch.hardshrink(tau, self.threshold)
        if kept == tied:
            return torch.hardshrink(tau, self.below)
        torch.abs(tau, out=magnitude)
        used = keep_top_into(magnitude, self.threshold, kept, mask)
        if self.block_ties is None:
            self.remaining = kept - used
        return tau.mul_(mask)


def trim(tau: torch.Tensor, density: float, *, threshold: float | None = None, ties: int | None = None,
         rescale: TrimRescale = "none") -> torch.Tensor:
    """Magnitude trimming (TIES step 1, Yadav et al. 2023, "TIES-Merging", eq. "Trim").

    Keeps the ``k = floor(density * numel)`` (at least 1) entries of largest ``|tau_j|`` and zeroes the rest:
    ``trim(tau)_j = tau_j`` if ``|tau_j| > t``, or ``|tau_j| = t`` and j is among the first entries tied at
    ``t`` needed to make k, else 0; ``t`` is the k-th largest magnitude, found by exact sample-based
    selection (never by sorting). Exactly k entries survive, as in mergekit; the TIES paper's code keeps
    every entry tied at ``t``, which is the same for continuous values but not for bf16 models.

    With ``threshold`` given, ``t`` is that value instead and ``ties`` says how many entries equal to it to
    keep (None: all): the whole-model scope of the paper, where ``t`` is the k-th largest magnitude over all
    tensors of the model and the engine's streaming pass assigns each tensor its share of the ties.

    ``rescale``: ``none`` (default; the paper's) or ``l1`` (mergekit's ``rescale: true``, its ``magnitude``
    sparsification): ``trim(tau) * ||tau||_1 / ||trim(tau)||_1`` (:func:`rescale_l1`), the norms of this
    tensor by the L1 block rule (:mod:`mergelab.ops.l1_rule`), unscaled when either is below 1e-7; with a
    whole-model ``threshold`` too the norms are this tensor's (mergekit has no whole-model trim).
    ``density == 1`` returns a copy of ``tau`` (nothing removed, nothing rescaled, as mergekit).
    """
    _check_density(density)
    _check_trim_rescale(rescale)
    if threshold is None:
        if density >= 1.0 or tau.numel() == 0:
            return tau.clone()
        magnitude = tau.abs()
        k = keep_count(tau.numel(), density)
        threshold = float(kth_largest(magnitude, k))
        ties = k - int(torch.count_nonzero(magnitude > threshold))
    else:
        magnitude = tau.abs()
    out = tau * keep_top(magnitude, threshold, ties)
    return rescale_l1(out, tau) if rescale == "l1" else out


def band_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """The ranks of :func:`trim_band`'s two thresholds in a tensor of ``n > 0`` entries: ``(n_top, n_top +
    n_keep)`` with ``n_top = min(floor(gamma n), n - n_keep)`` and ``n_keep = floor(density n)`` (at least
    1): the band keeps the top ``n_top + n_keep`` entries by magnitude minus the top ``n_top`` (none removed
    when ``n_top`` is 0), ties by flat position (:func:`band_mask`)."""
    n_keep = keep_count(n, density)
    n_top = min(int(math.floor(gamma * n)), n - n_keep)
    return n_top, n_top + n_keep


def top_set(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries of largest ``magnitude`` (0 <= k <= numel), ties at the k-th largest
    value kept first in flat order: :func:`trim`'s rule (exact selection, :func:`keep_top`)."""
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = float(kth_largest(magnitude, k))
    return keep_top(magnitude, threshold, k - int(torch.count_nonzero(magnitude > threshold)))


def band_mask(magnitude: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' band as a boolean mask of ``magnitude`` (n > 0 entries): the entries of ranks
    ``n_top .. n_top + n_keep - 1`` in the order of decreasing magnitude, ties in flat order
    (:func:`band_ranks`): the top ``n_top + n_keep`` set minus the top ``n_top`` set (:func:`top_set`), so
    exactly ``n_keep`` entries are kept whatever the ties."""
    n_top, n_edge = band_ranks(magnitude.numel(), density, gamma)
    keep = top_set(magnitude, n_edge)
    if n_top > 0:
        keep &= ~top_set(magnitude, n_top)
    return keep


def trim_band(tau: torch.Tensor, density: float, gamma: float, *, rescale: TrimRescale = "none") -> torch.Tensor:
    """Breadcrumbs masking (Davari & Belilovsky 2023, "Model Breadcrumbs"), per tensor.

    Removes the ``gamma`` fraction of largest-magnitude entries (outliers) and then the smallest ones, so
    that a ``density`` fraction is kept: with ``n_top = floor(gamma * n)`` and ``n_keep = floor(density * n)``
    (at least 1; ``n_top`` reduced if ``n_top + n_keep > n``), the kept entries are those of ranks
    ``n_top .. n_top + n_keep - 1`` when sorted by decreasing ``|tau|``, ties broken by flat position
    (:func:`band_mask`): exactly ``n_keep`` survive, as in mergekit (its sort), and with the same tie rule as
    :func:`trim`. (Until issue 15 the band was kept by value, ``low <= |tau| < high``, which on tied
    magnitudes (bf16) kept far fewer: on a tensor of equal ``|tau|`` none at all.)
    ``rescale``: ``none`` (default; the paper's) or ``l1`` (mergekit's ``rescale: true``, its
    ``magnitude_outliers`` sparsification): ``band(tau) * ||tau||_1 / ||band(tau)||_1`` (:func:`rescale_l1`).
    ``density == 1`` returns a copy (nothing removed, nothing rescaled, as in mergekit).
    """
    _check_density(density)
    _check_trim_rescale(rescale)
    if not (0.0 <= gamma < 1.0):
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if density >= 1.0 or tau.numel() == 0:
        return tau.clone()
    out = tau * band_mask(tau.abs(), density, gamma)
    return rescale_l1(out, tau) if rescale == "l1" else out


MagpruneSpacing = Literal["paper", "mergekit"]


#: Index of the low 16-bit word of a 32-bit value in memory.
_LOW_WORD = 0 if sys.byteorder == "little" else 1


def descending_order(magnitude: torch.Tensor) -> torch.Tensor:
    """Per row of the 2-D ``magnitude`` (entries >= 0), its column positions by decreasing value, ties by
    increasing position: ``torch.sort(magnitude.float(), dim=1, descending=True, stable=True).indices``
    (int64), the rank order of MAGPRUNE (:func:`magprune_keep_probabilities`). Values are compared as
    float32.

    On the CPU, without a comparison sort of floats: float32 values ``>= 0`` order as their bit patterns
    read as integers, so the key ``0x7fffffff - bits`` (sign bit cleared: -0 ties with +0) sorts ascending
    in the wanted order, and stable sorts of it keep tied entries in position order. First a stable sort
    by the key's high 16 bits (numpy's stable argsort of 16-bit integers is a radix sort); then

    - nothing when every low half is ``0xffff`` (values exact in bf16, as task vectors of bf16 models mostly
      are): the high half is the whole key;
    - when at most 1/16 of the entries have another low half: a stable sort of the whole key in that order
      (numpy's merge sort finds it almost sorted: only values tied in their high half move);
    - otherwise a least-significant-digit radix sort: stably by the low half, then by the high half.

    One thread, blocks of 128 rows of 2048: 9 ns an entry on the benchmark's task vectors (0.5% of them off
    bf16), 6 on bf16 values, 12 and 8 on uniform and narrow-range float32 values; torch's stable sort takes
    55 on all of them. Other devices: ``torch.sort``.
    """
    values = magnitude.float()
    if values.device.type != "cpu":
        return torch.sort(values, dim=1, descending=True, stable=True).indices
    key = 0x7FFFFFFF - (values.contiguous().view(torch.int32) & 0x7FFFFFFF)
    high = (key >> 16).to(torch.int16)  # 0 .. 0x7fff: orders as the unsigned half

    def stable_argsort(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.argsort(x.numpy(), axis=1, kind="stable"))

    # entries whose key's low half is not 0xffff, i.e. whose float bits' low 16 bits are not all 0: the
    # first 16-bit word of each value on a little-endian machine, counted on a strided view
    other = int(torch.count_nonzero(values.contiguous().view(torch.int16)[..., _LOW_WORD::2]))
    if other == 0:
        return stable_argsort(high)
    if other * 16 <= key.numel():
        first = stable_argsort(high)
        return torch.gather(first, 1, stable_argsort(torch.gather(key, 1, first)))
    first = torch.from_numpy(np.argsort((key & 0xFFFF).numpy().astype(np.uint16), axis=1, kind="stable"))
    return torch.gather(first, 1, stable_argsort(torch.gather(high, 1, first)))


def magprune_rank_probabilities(n: int, density: float, epsilon: float, spacing: MagpruneSpacing = "paper"
                                ) -> torch.Tensor:
    """DELLA's keep probability ``1 - p_r`` of each descending rank ``r = 0 .. n-1`` in a row of ``n`` entries
    (Deep et al. 2024, "DELLA-Merging", MAGPRUNE), float32, as a vector indexed by rank:

    - ``paper``: drop probability ``p_r = p_min + epsilon r / n`` with ``p_min = p - epsilon / 2`` and
      ``p = 1 - density`` (``r = 0`` the largest magnitude): ``p_r`` spans ``[p - epsilon/2, p + epsilon/2)``,
      larger magnitudes dropped less;
    - ``mergekit``: ascending rank ``s = n - 1 - r`` (0 for the smallest) normalised to ``s / (n - 1)`` (0 for a
      row of one entry), keep probability ``density - epsilon + 2 epsilon s / (n - 1)``: spans
      ``[density - epsilon, density + epsilon]`` (mergekit's ``epsilon`` is the half width).

    Computed in float32 from the float32 ranks, operation by operation.
    """
    r = torch.arange(n).to(torch.float32)
    if spacing == "paper":
        drop = (1.0 - density) - epsilon / 2.0 + r * (epsilon / n)
        return 1.0 - drop
    if spacing == "mergekit":
        ascending = (n - 1) - r
        norm = ascending / (n - 1) if n > 1 else torch.zeros_like(ascending)
        return (density - epsilon) + norm * (2.0 * epsilon)
    raise ValueError(f"spacing must be 'paper' or 'mergekit', got {spacing!r}")


def by_rank(order: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[i, order[i, k]] = table[k]``: a per-rank value (``table``, one per rank of a row) placed at the
    entry of that rank (``order`` from :func:`descending_order`), i.e. ``table[rank]`` without forming the
    ranks (one scatter, the inverse permutation)."""
    rows, n = order.shape
    out = torch.empty((rows, n), dtype=table.dtype, device=order.device)
    return out.scatter_(1, order, table.to(order.device).expand(rows, n))


def magprune_keep_probabilities(magnitude: torch.Tensor, density: float, epsilon: float,
                                spacing: MagpruneSpacing = "paper") -> torch.Tensor:
    """DELLA's per-entry keep probabilities ``1 - p_i`` (MAGPRUNE), ranked within each row of ``magnitude``
    (a 2-D ``(rows, n)`` view: the paper ranks each node's, i.e. output row's, delta parameters), float32:
    entry ``i`` of descending rank ``r_i`` (0 for the largest magnitude, ties by position:
    :func:`descending_order`) gets :func:`magprune_rank_probabilities`'s value of ``r_i``."""
    _, n = magnitude.shape
    return by_rank(descending_order(magnitude), magprune_rank_probabilities(n, density, epsilon, spacing))


def rows_of(tau: torch.Tensor) -> torch.Tensor:
    """The 2-D row view MAGPRUNE ranks in: ``(shape[0], -1)`` for a tensor of 2 or more axes, one row for a
    1-D tensor (flat order is kept, so a row block is a contiguous range of entries)."""
    return tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)


def magprune(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    spacing: MagpruneSpacing = "paper",
    rescale: Rescale = "inverse",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA's MAGPRUNE (Deep et al. 2024): drop each entry with a magnitude-ranked probability, rescale.

    Keep probabilities ``q_i = 1 - p_i`` from :func:`magprune_keep_probabilities` (per row), mask
    ``m_i = [u_i < q_i]`` with ``u ~ U[0, 1)`` drawn in flat order from ``generator`` (one draw of the
    tensor's size, as :func:`drop`), then

    - ``inverse`` (paper; default): ``m_i tau_i / q_i`` (``1/(1 - p_i)``), so ``E[magprune(tau)] = tau``;
    - ``l1`` (mergekit's ``rescale: true``): ``m * tau * ||tau||_1 / ||m * tau||_1``;
    - ``none``: ``m * tau``.

    ``density == 1`` returns a copy (as mergekit).
    """
    _check_density(density)
    if rescale not in ("inverse", "l1", "none"):
        raise ValueError(f"rescale must be 'inverse', 'l1' or 'none', got {rescale!r}")
    if density >= 1.0 or tau.numel() == 0:
        return tau.clone()
    rows = rows_of(tau)
    keep_p = magprune_keep_probabilities(rows.abs(), density, epsilon, spacing).reshape(tau.shape)
    mask = torch.rand(tau.shape, generator=generator, device=tau.device) < keep_p
    out = tau * mask
    if rescale == "inverse":
        out.div_(keep_p.to(out.dtype))
    elif rescale == "l1":
        _match_l1(out, tau)
    return out


def _match_l1(out: torch.Tensor, tau: torch.Tensor, norm: Callable[[torch.Tensor], float] | None = None
              ) -> torch.Tensor:
    """mergekit's ``rescale``: ``out`` scaled in place by :func:`mergelab.ops.l1_rule.l1_factor` of
    ``(||tau||_1, ||out||_1)``, so that ``||out||_1 = ||tau||_1`` (left alone when either norm is below
    1e-7). The norms are ``norm``'s; by default torch's float32 sums over the whole tensor (DARE and DELLA,
    whose kernels reproduce them)."""
    l1 = norm if norm is not None else (lambda x: float(x.abs().sum()))
    factor = l1_factor(l1(tau), l1(out))
    if factor is not None:
        out.mul_(factor)
    return out


def l1_norm(x: torch.Tensor) -> float:
    """``||x||_1`` of the flattened ``x`` (float32 or float64) by the L1 block rule of
    :mod:`mergelab.ops.l1_rule`: blocks of :func:`mergelab.ops.blocks.block_size` entries
    (:func:`mergelab.ops.l1_rule.block_l1`), summed in float64 in block order (the block kernels' order)."""
    flat = x.detach().reshape(-1)
    return l1_from_partials([block_l1(flat[a:b].cpu().numpy()) for a, b in block_ranges(flat.numel(), block_size())])


def rescale_l1(out: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``out`` (a trim or band of ``tau``) scaled in place by ``||tau||_1 / ||out||_1`` (mergekit's
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``), the norms by the L1 block rule (:func:`l1_norm`)
    that the block kernels reproduce from per-block partials; unscaled when either norm is below 1e-7."""
    return _match_l1(out, tau, l1_norm)


def drop(
    tau: torch.Tensor,
    density: float,
    *,
    rescale: Rescale = "inverse",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: random drop and rescale (Yu et al. 2024, "Language Models are Super Mario", eq. 2).

    Each entry is kept independently with probability ``density = 1 - p`` (``m_j ~ Bernoulli(density)``),
    then the survivors are rescaled:

    - ``inverse`` (paper, PEFT, FusionBench; default): ``drop(tau) = m * tau / density``, so
      ``E[drop(tau)] = tau``;
    - ``l1`` (mergekit's ``rescale``): ``m * tau * ||tau||_1 / ||m * tau||_1``, matching the L1 norm;
    - ``none``: ``m * tau``.

    ``density == 1`` returns a copy. ``generator`` makes the mask reproducible.
    """
    _check_density(density)
    if rescale not in ("inverse", "l1", "none"):
        raise ValueError(f"rescale must be 'inverse', 'l1' or 'none', got {rescale!r}")
    if density >= 1.0:
        return tau.clone()
    mask = torch.rand(tau.shape, generator=generator, device=tau.device) < density
    out = tau * mask
    if rescale == "inverse":
        out.div_(density)
    elif rescale == "l1":
        _match_l1(out, tau)
    return out
