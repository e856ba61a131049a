"""The torch back-end's block kernels: one per data-free method of the catalog, on cache-sized blocks.

Each kernel computes, entry by entry, exactly what its method's reference composition of operators computes
(:mod:`mergelab.methods.catalog`; tested bit for bit), but block by block (:mod:`mergelab.ops.blocks`)
with the blocks split over the cores (:func:`mergelab.merging.pipeline.run_in_chunks`), rounding each
block once into ``inp.result_dtype``: their float32 temporaries are a few MiB whatever the tensor size.
Notation: base theta_0, experts theta_i with weights w_i, task vectors tau_i = theta_i - theta_0.

What a method needs of the whole tensor comes from a first pass, then the element-wise rest is applied
block by block:

- TIES and breadcrumbs: the k-th largest ``|tau_i|`` (exact selection over the blocks, never a sort or a
  float32 copy of the tensor: :class:`mergelab.ops.BlockKthLargest`; breadcrumbs' two band edges of an
  expert in one visit per block, :class:`mergelab.ops.BlockRanks`); with ``rescale: l1`` then each expert's
  L1 norms before and after its trim or band, per-block partials of the L1 block rule
  (:mod:`mergelab.ops.l1_rule`) from one more pass, summed in block order; Arcee Fusion: the three quartiles
  of its importance, likewise in one visit;
- DARE: nothing, but its masks come from one generator per expert, drawn in flat order, so the blocks go
  in order (the experts of a block in parallel); a draw of ``m`` then ``m'`` uniforms equals one draw of
  ``m + m'`` (torch's CPU generator is sequential), so the masks are the reference's. The ``l1``
  rescaling's two norms are torch's float32 sums over the whole tensor, so for bit-identity they are
  taken (expert by expert, on the calling thread) from tensor-sized float32 buffers, and the masks are
  drawn twice;
- DELLA: its keep probabilities are per row (ranks of ``|tau_i|``, :func:`mergelab.ops.descending_order`),
  so its blocks are of whole rows, and its masks are drawn as DARE's; with ``rescale: l1`` the masks are
  drawn first (experts on all cores) and kept as bits, the two norms come from one tensor-sized buffer,
  and the merge pass goes over the blocks on all cores;
- RAM+ (``ramplus_tl``): each model's numbers of shared and unique entries over the tensor, integers counted
  block by block (their sums are exact in any order), so both passes go by blocks on all cores;
- TSV-Merge, Iso-C and Iso-CTS: SVDs of a layer's whole matrices, so their kernels are their references
  on whole tensors, rounded once into the output dtype;
- model stock, SLERP, NuSLERP, Multi-SLERP, Karcher: norms and inner products, from the Gram matrix of
  fixed blocks' dot products summed in float64 in block order (the rule of :mod:`mergelab.ops.gram_matrix`, whose
  one dot function the references and both back-ends call), so a first pass over the blocks gives the
  coefficients and a second applies them (products rounded before they are added, as
  :func:`mergelab.ops.combine`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mergelab import ops
from mergelab.ops import selection
from mergelab.merging.pipeline import compute_workers, run_blocks, run_in_chunks
from mergelab.methods import catalog
from mergelab.methods.base import TensorInputs
from mergelab.methods.catalog import (
    ArceeFusionParams,
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    DellaLinearParams,
    DellaParams,
    KarcherParams,
    MultiSlerpParams,
    NearSwapParams,
    NuSlerpParams,
    PassthroughParams,
    RamParams,
    RamPlusParams,
    SceParams,
    DareLinearParams,
    DareTiesParams,
    ModelStockParams,
    SlerpParams,
    TaskArithmeticParams,
    TiesParams,
    WeightAverageParams,
)

#: A kernel: the merged tensor of one name from its inputs and resolved parameters.
Kernel = Callable[[TensorInputs, Any], torch.Tensor]

# --------------------------------------------------------------------------------------------- averaging


def weight_average(inp: TensorInputs, p: WeightAverageParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.weight_average` (formula there):
    ``theta_1 + (sum_i w_i (theta_i - theta_1)) / sum_i w_i`` (``normalize: false``: ``sum_i w_i theta_i`` as
    :func:`mergelab.ops.combine`), block by block, in ``inp.result_dtype``."""
    if not p.normalize:
        return _combination(inp, inp.weights, False, inp.experts[0].shape)
    total = float(sum(inp.weights))
    if total == 0:
        raise ValueError("weights sum to zero; a weighted mean is undefined")
    first_in = inp.experts[0].reshape(-1)
    flats = [e.reshape(-1) for e in inp.experts]
    out = torch.empty(inp.experts[0].shape, dtype=inp.result_dtype, device=first_in.device)
    out_flat = out.view(-1)
    n = first_in.numel()
    block = ops.block_size()

    def work(first_block: int, stop_block: int) -> None:
        buffers = ops.BlockBuffers(3, n, inp.compute_dtype, first_in.device)
        for j in range(first_block, stop_block):
            start, stop = j * block, min(n, (j + 1) * block)
            first, acc, diff = buffers.get(stop - start)
            first.copy_(first_in[start:stop])
            for i, (e, w) in enumerate(zip(flats, inp.weights)):
                diff.copy_(e[start:stop]).sub_(first)
                if i == 0:
                    torch.mul(diff, w, out=acc)
                else:
                    acc.add_(diff, alpha=w)
            out_flat[start:stop].copy_(acc.div_(total).add_(first))

    run_in_chunks(ops.block_count(n), work)
    return out


# ------------------------------------------------------------------------------------ task arithmetic


def task_arithmetic(inp: TensorInputs, p: TaskArithmeticParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.task_arithmetic` (formula and defaults there):
    ``lambda * sum_i w_i tau_i + theta_0`` in model order, each input converted once per block into three
    reused block buffers, rounded once into ``inp.result_dtype``."""
    base_in = inp.base.reshape(-1)
    flats = [e.reshape(-1) for e in inp.experts]
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)
    out_flat = out.view(-1)
    n = base_in.numel()
    block = ops.block_size()

    def work(first: int, stop_block: int) -> None:  # blocks are independent: split over the cores
        buffers = ops.BlockBuffers(3, n, inp.compute_dtype, base_in.device)
        for j in range(first, stop_block):
            start, stop = j * block, min(n, (j + 1) * block)
            base, acc, tau = buffers.get(stop - start)
            base.copy_(base_in[start:stop])
            acc.zero_()
            for e, w in zip(flats, inp.weights):
                tau.copy_(e[start:stop]).sub_(base)
                acc.add_(tau, alpha=w)
            if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
                acc.mul_(p.lambda_)
            out_flat[start:stop].copy_(acc.add_(base))

    run_in_chunks(ops.block_count(n), work)
    return out


# ------------------------------------------------------------------------------------------------ TIES


def ties(inp: TensorInputs, p: TiesParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.ties` (formula and defaults there).

    Two passes over cache-sized blocks, never holding a float32 copy of the tensor: pass 1 finds each
    expert's per-tensor threshold (k-th largest ``|tau_i|``) by exact sample-based selection
    (:class:`mergelab.ops.BlockKthLargest`); pass 2 recomputes ``tau_i`` block by block, trims it (entries
    tied at the threshold are kept first-come in flat order, so exactly k survive, as
    :func:`mergelab.ops.trim`), elects the sign and takes the disjoint mean with the same operators. Every
    operation is element-wise, so the result equals the reference composition bit for bit (tested).
    With ``rescale: l1`` a pass between the two (:func:`_trim_l1_factors`) takes each expert's L1 norms
    before and after its trim by blocks, and pass 2 scales each trimmed block by the expert's factor.
    """
    thresholds = inp.thresholds if p.trim_scope == "global" else None
    if p.trim_scope == "global" and thresholds is None and p.density < 1.0 and inp.base.numel() > 0:
        raise ValueError(
            f"ties with trim_scope 'global' needs whole-model thresholds for tensor '{inp.name}'; "
            "merge through mergelab.merge (which computes them) or use trim_scope 'tensor'"
        )
    base_in = inp.base.reshape(-1)
    flats = [e.reshape(-1) for e in inp.experts]
    n = base_in.numel()
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)
    if n == 0:
        return out
    trims: list[ops.BlockTrim] | None
    if thresholds is not None:
        quotas = inp.tie_quotas
        trims = [ops.BlockTrim(float(t), inp.compute_dtype, ties=None if quotas is None else quotas[i])
                 for i, t in enumerate(thresholds)]
    elif p.density < 1.0:
        trims = _tensor_trims(base_in, flats, p.density, inp.compute_dtype)
    else:
        trims = None  # density 1: nothing trimmed
    # a tie quota counted over the whole tensor is spent first come, first kept: blocks in order
    in_order = trims is not None and any(t.in_order for t in trims)
    factors: list[float | None] = [None] * len(flats)
    if p.rescale == "l1" and trims is not None:
        factors = _trim_l1_factors(base_in, flats, [copy.copy(t) for t in trims], inp.compute_dtype, in_order)
    out_flat = out.view(-1)

    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(len(flats) + 2, n, inp.compute_dtype, base_in.device)
        masks = ops.BlockBuffers(1, n, torch.bool, base_in.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            base, magnitude, *taus = buffers.get(end - start)
            (keep,) = masks.get(end - start)
            base.copy_(base_in[start:end])
            for i, e in enumerate(flats):
                tau = taus[i].copy_(e[start:end]).sub_(base)
                if trims is not None:
                    taus[i] = trims[i].apply(j, tau, magnitude, keep)
                    if factors[i] is not None:
                        taus[i].mul_(factors[i])
            sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
            merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)
            if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
                merged.mul_(p.lambda_)
            out_flat[start:end].copy_(merged.add_(base))

    run_in_chunks(ops.block_count(n), work, workers=1 if in_order else None)
    return out


def _l1_factors_by_blocks(base: torch.Tensor, experts: list[torch.Tensor], dtype: torch.dtype, masks: int,
                          transform: Callable[[int, int, torch.Tensor, torch.Tensor, list[torch.Tensor]],
                                              torch.Tensor],
                          which: Sequence[bool] | None = None, in_order: bool = False) -> list[float | None]:
    """Per expert, the ``rescale: l1`` factor ``||tau_i||_1 / ||T(tau_i)||_1`` of a trim or band T
    (:func:`mergelab.ops.l1_factor`; None: unscaled), by the L1 block rule (:mod:`mergelab.ops.l1_rule`): one
    pass over the blocks (on all cores; in order on this thread when ``in_order``) forming each
    ``tau_i = expert_i - base`` block in ``dtype`` in per-thread scratch; ``transform(i, j, tau, magnitude,
    masks)`` returns ``T(tau_i)`` of block j (``magnitude`` and the ``masks`` bool blocks: its scratch), for
    the experts ``which`` marks (default all; the others get no factor); then each expert's block norms summed
    in float64 in block order."""
    n = base.numel()
    block = ops.block_size()
    blocks = ops.block_count(n)
    parts: list[list[tuple[float, float]]] = [[(0.0, 0.0)] * len(experts) for _ in range(blocks)]

    def work(indices: Iterable[int]) -> None:
        buffers = ops.BlockBuffers(3, n, dtype, base.device)
        bools = ops.BlockBuffers(masks, n, torch.bool, base.device)
        for j in indices:
            start, end = j * block, min(n, (j + 1) * block)
            b, magnitude, tau = buffers.get(end - start)
            scratch = bools.get(end - start)
            b.copy_(base[start:end])
            for i, e in enumerate(experts):
                if which is None or which[i]:
                    tau.copy_(e[start:end]).sub_(b)
                    before = ops.block_l1(_host(tau))
                    parts[j][i] = (before, ops.block_l1(_host(transform(i, j, tau, magnitude, scratch))))

    if in_order:
        work(range(blocks))
    else:
        run_blocks(blocks, work)
    return [ops.l1_factor(ops.l1_from_partials([part[i][0] for part in parts]),
                          ops.l1_from_partials([part[i][1] for part in parts])) for i in range(len(experts))]


def _host(x: torch.Tensor) -> Any:
    """The 1-D numpy view of a block (copied to the host from another device) for :func:`mergelab.ops.block_l1`."""
    return ops.host_arrays([x])[0]


def _trim_l1_factors(base: torch.Tensor, experts: list[torch.Tensor], trims: list[ops.BlockTrim],
                     dtype: torch.dtype, in_order: bool) -> list[float | None]:
    """TIES's ``rescale: l1`` factors (:func:`mergelab.ops.rescale_l1` of :func:`mergelab.ops.trim`): the norms
    of ``tau_i`` and of its trim by ``trims[i]`` (consumed when they spend a tie quota: pass copies), block by
    block (in order when a tie quota is counted over the whole tensor)."""
    return _l1_factors_by_blocks(
        base, experts, dtype, 1,
        lambda i, j, tau, magnitude, masks: trims[i].apply(j, tau, magnitude, masks[0]), in_order=in_order)


def _tensor_trims(
    base: torch.Tensor, experts: list[torch.Tensor], density: float, dtype: torch.dtype
) -> list[ops.BlockTrim]:
    """Per-tensor trims of ``tau_i = expert_i - base`` (flat): each keeps the k = floor(density n) largest
    ``|tau_i|``, i.e. those above the k-th largest t_i and the first ``k - #{> t_i}`` tied at t_i. Exact;
    ``|tau_i|`` is only ever formed block by block, in one pass for all experts
    (:class:`mergelab.ops.BlockKthLargest`), except for small tensors and the rare bracket miss."""
    n = base.numel()
    k = ops.keep_count(n, density)

    def whole(expert: torch.Tensor) -> ops.BlockTrim:  # never in place: .to may alias the input
        mag = torch.sub(expert.to(dtype), base.to(dtype)).abs_()
        t = float(ops.kth_largest(mag, k))
        return ops.BlockTrim(t, dtype, ties=k - int(torch.count_nonzero(mag > t)))

    if n <= ops.select_small_size():
        return [whole(e) for e in experts]
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, n, (ops.select_sample_size(),), generator=gen).to(base.device)
    base_sample = base[idx].to(dtype)
    blocks = ops.block_count(n)
    selectors = [ops.BlockKthLargest(n, k, torch.sub(e[idx].to(dtype), base_sample).abs_(), blocks)
                 for e in experts]

    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(3, n, dtype, base.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            mag, b, scratch = buffers.get(end - start)
            b.copy_(base[start:end])
            for selector, e in zip(selectors, experts):
                selector.observe(j, mag.copy_(e[start:end]).sub_(b).abs_(), scratch)

    run_in_chunks(blocks, work)
    trims = []
    for selector, e in zip(selectors, experts):
        found = selector.result()
        if found is None:
            trims.append(whole(e))
            continue
        t, above = found
        block_ties = list(zip(selector.tie_quotas(k - above), selector.tie_counts()))
        trims.append(ops.BlockTrim(t, dtype, block_ties=block_ties))
    return trims


# ------------------------------------------------------------------------------------------ helpers


def _sum_into(acc: torch.Tensor, taus: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``acc = sum_i w_i taus[i]`` with :func:`mergelab.ops.weighted_sum`'s operations (``taus[0] * w_0``,
    then ``add_(tau_i, alpha=w_i)`` in model order: the same bits, signed zeros included)."""
    torch.mul(taus[0], weights[0], out=acc)
    for tau, w in zip(taus[1:], weights[1:]):
        acc.add_(tau, alpha=w)
    return acc


def _top_selections(
    base: torch.Tensor, experts: list[torch.Tensor], ks: Sequence[Sequence[int]], dtype: torch.dtype
) -> list[list[tuple[float, list[int], list[int]]]]:
    """Per expert i, for each k of ``ks[i]`` (its own ranks; may be empty): the exact k-th largest ``|tau_i|`` t
    (what :func:`mergelab.ops.kth_largest` returns on the whole ``|tau_i|``) and, per block of
    :func:`mergelab.ops.block_size` entries, how many of the entries tied at t the top k keeps (first in flat
    order: :func:`mergelab.ops.selection.split_ties`) and how many there are, so a block's top-k mask is
    ``keep_top_into(|tau_i|, t, quota, tied=count)`` (:func:`mergelab.ops.top_set`'s set). One pass over the
    blocks for all experts and ranks (:class:`mergelab.ops.BlockRanks`, all of an expert's ranks in one
    visit); small tensors and the rare bracket miss on the whole tensor."""
    n = base.numel()
    block = ops.block_size()
    blocks = ops.block_count(n)

    def whole(expert: torch.Tensor, k: int) -> tuple[float, list[int], list[int]]:  # never in place: .to may alias
        mag = torch.sub(expert.to(dtype), base.to(dtype)).abs_()
        t = float(ops.kth_largest(mag, k))
        tied = [int(torch.count_nonzero(mag[a:b] == t)) for a, b in ops.block_ranges(n, block)]
        return t, selection.split_ties(k - int(torch.count_nonzero(mag > t)), tied), tied

    if n <= ops.select_small_size():
        return [[whole(e, k) for k in ks_i] for e, ks_i in zip(experts, ks)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, n, (ops.quantile_sample_size(n),), generator=gen).to(base.device)
    base_sample = base[idx].to(dtype)
    ranks = [ops.BlockRanks(n, [n - k for k in ks_i], torch.sub(e[idx].to(dtype), base_sample).abs_(), blocks)
             if ks_i else None for e, ks_i in zip(experts, ks)]
    selected = [(r, e) for r, e in zip(ranks, experts) if r is not None]

    def work(indices: Iterator[int]) -> None:
        buffers = ops.BlockBuffers(2, n, dtype, base.device)
        for j in indices:
            start, end = j * block, min(n, (j + 1) * block)
            mag, b = buffers.get(end - start)
            b.copy_(base[start:end])
            for r, e in selected:
                r.observe(j, mag.copy_(e[start:end]).sub_(b).abs_())

    if selected:
        run_blocks(blocks, work)
    values = []
    for r, e, ks_i in zip(ranks, experts, ks):
        row = []
        for i, k in enumerate(ks_i):
            t = r.result()[i]  # type: ignore[union-attr]
            if t is None:
                row.append(whole(e, k))
                continue
            below, tied = r.split(i)  # type: ignore[union-attr]
            above = n - below - sum(tied)
            row.append((t, selection.split_ties(k - above, tied), tied))
        values.append(row)
    return values


# ------------------------------------------------------------------------------------------------ DARE


def _l1_factors(inp: TensorInputs, base: torch.Tensor, experts: list[torch.Tensor], p: DareLinearParams
                ) -> list[float | None]:
    """Per expert, the ``l1`` rescaling factor ``||tau_i||_1 / ||m_i * tau_i||_1`` of :func:`mergelab.ops.drop`
    (None where either norm is below 1e-7: no rescaling), the norms being torch's float32 sums over the whole
    tensor as in the reference: formed in two tensor-sized buffers, one expert at a time, on this thread
    (torch's reduction order depends on its thread count)."""
    n, dtype, shape = base.numel(), inp.compute_dtype, inp.base.shape  # type: ignore[union-attr]
    tau = torch.empty(n, dtype=dtype, device=base.device)
    kept = torch.empty_like(tau)
    draws = torch.empty(min(n, ops.block_size()))
    factors: list[float | None] = []
    for i, e in enumerate(experts):
        gen = inp.generator(p.seed, i)
        for start, end in ops.block_ranges(n, ops.block_size()):
            t = tau[start:end].copy_(e[start:end]).sub_(base[start:end].to(dtype))
            u = torch.rand(end - start, generator=gen, out=draws[: end - start])
            torch.mul(t, (u < p.density).to(t.device), out=kept[start:end])
        before = float(tau.view(shape).abs_().sum())
        after = float(kept.view(shape).abs_().sum())
        factors.append(ops.l1_factor(before, after))
    return factors


def _dare(inp: TensorInputs, p: DareLinearParams, combine: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
          ) -> torch.Tensor:
    """DARE's drop and rescale (:func:`mergelab.ops.drop`) block by block, then ``combine(dropped, acc)``:
    the block of the merged task vector (``acc``: a scratch block). Blocks in order (the masks are drawn
    from each expert's generator in flat order), a block's experts on all cores."""
    base_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    flats = [e.reshape(-1) for e in inp.experts]
    n = base_in.numel()
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)  # type: ignore[union-attr]
    if n == 0:
        return out
    dtype = inp.compute_dtype
    dropping = p.density < 1.0
    factors = _l1_factors(inp, base_in, flats, p) if dropping and p.rescale == "l1" else [None] * len(flats)
    gens = [inp.generator(p.seed, i) for i in range(len(flats))] if dropping else []
    buffers = ops.BlockBuffers(len(flats) + 2, n, dtype, base_in.device)
    draws = ops.BlockBuffers(len(flats), n, torch.float32, "cpu")
    masks = ops.BlockBuffers(len(flats), n, torch.bool, "cpu")
    out_flat = out.view(-1)
    for start, end in ops.block_ranges(n, ops.block_size()):
        m = end - start
        base, acc, *taus = buffers.get(m)
        base.copy_(base_in[start:end])
        us, keeps = draws.get(m), masks.get(m)

        def expert(first: int, stop: int) -> None:
            for i in range(first, stop):
                tau = taus[i].copy_(flats[i][start:end]).sub_(base)
                if not dropping:
                    continue
                torch.rand(m, generator=gens[i], out=us[i])
                tau.mul_(torch.lt(us[i], p.density, out=keeps[i]).to(tau.device))
                if p.rescale == "inverse":
                    tau.div_(p.density)
                elif factors[i] is not None:
                    tau.mul_(factors[i])

        run_in_chunks(len(flats), expert)
        merged = combine(taus, acc)
        if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
            merged.mul_(p.lambda_)
        out_flat[start:end].copy_(merged.add_(base))
    return out


def dare_linear(inp: TensorInputs, p: DareLinearParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.dare_linear`: ``theta_0 + lambda sum_i w_i drop(tau_i)``."""
    return _dare(inp, p, lambda taus, acc: _sum_into(acc, taus, inp.weights))


def dare_ties(inp: TensorInputs, p: DareTiesParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.dare_ties`: drop -> elect_sign -> disjoint_mean -> scale."""

    def combine(taus: list[torch.Tensor], acc: torch.Tensor) -> torch.Tensor:
        sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
        return ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)

    return _dare(inp, p, combine)


# ----------------------------------------------------------------------------------------- breadcrumbs


def _band(inp: TensorInputs, p: BreadcrumbsParams,
          combine: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Breadcrumbs' band (:func:`mergelab.ops.trim_band`) block by block, then ``combine(banded, acc)``: the
    block of the merged task vector (``acc``: a scratch block).

    Each expert's ``density`` and ``gamma`` are its own (``inp.per_model``, as :func:`mergelab.methods.catalog.banded`
    reads them; a density of 1 keeps its task vector whole). Pass 1 finds each banded expert's two edges (the
    ``(n_top + n_keep)``-th and ``n_top``-th largest ``|tau_i|``, :func:`mergelab.ops.band_ranks`) with each
    block's share of the entries tied at them, by exact selection over the blocks; pass 2 keeps the top
    ``n_top + n_keep`` minus the top ``n_top`` (ties first in flat order, :func:`mergelab.ops.band_mask`) and
    combines, block by block on all cores. With ``rescale: l1`` a pass between the two takes each banded
    expert's L1 norms before and after its band by blocks (:func:`_l1_factors_by_blocks`), and pass 2 scales
    each banded block by the expert's factor.
    """
    base_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    flats = [e.reshape(-1) for e in inp.experts]
    n = base_in.numel()
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)  # type: ignore[union-attr]
    if n == 0:
        return out
    dtype = inp.compute_dtype
    ranks: list[list[int]] = []
    for i in range(len(flats)):
        density = inp.per_model(i, "density", p.density)
        if density >= 1.0:
            ranks.append([])  # trim_band keeps the whole task vector
            continue
        n_top, n_edge = ops.band_ranks(n, density, inp.per_model(i, "gamma", p.gamma))
        ranks.append([n_edge, n_top] if n_top > 0 else [n_edge])
    edges = _top_selections(base_in, flats, ranks, dtype)
    out_flat = out.view(-1)
    block = ops.block_size()

    def band_into(i: int, j: int, tau: torch.Tensor, magnitude: torch.Tensor, keep: torch.Tensor,
                  top: torch.Tensor) -> None:
        """Expert i's band of block j of its task vector ``tau``, in place (``magnitude``, ``keep``, ``top``:
        scratch of the block's size)."""
        torch.abs(tau, out=magnitude)
        (low, low_quotas, low_tied), *outliers = edges[i]
        ops.keep_top_into(magnitude, low, low_quotas[j], keep, low_tied[j])
        for high, high_quotas, high_tied in outliers:
            ops.keep_top_into(magnitude, high, high_quotas[j], top, high_tied[j])
            ops.remove_into(keep, top)
        ops.apply_mask_(tau, keep)

    factors: list[float | None] = [None] * len(flats)
    if p.rescale == "l1":
        def banded(i: int, j: int, tau: torch.Tensor, magnitude: torch.Tensor,
                   masks: list[torch.Tensor]) -> torch.Tensor:
            band_into(i, j, tau, magnitude, *masks)
            return tau

        # density 1 (no edges): neither banded nor rescaled
        factors = _l1_factors_by_blocks(base_in, flats, dtype, 2, banded, which=[bool(e) for e in edges])

    def work(indices: Iterator[int]) -> None:
        buffers = ops.BlockBuffers(len(flats) + 3, n, dtype, base_in.device)
        masks = ops.BlockBuffers(2, n, torch.bool, base_in.device)
        for j in indices:
            start, end = j * block, min(n, (j + 1) * block)
            base, acc, magnitude, *taus = buffers.get(end - start)
            keep, top = masks.get(end - start)
            base.copy_(base_in[start:end])
            for i, e in enumerate(flats):
                tau = taus[i].copy_(e[start:end]).sub_(base)
                if edges[i]:
                    band_into(i, j, tau, magnitude, keep, top)
                    if factors[i] is not None:
                        tau.mul_(factors[i])
            merged = combine(taus, acc)
            if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
                merged.mul_(p.lambda_)
            out_flat[start:end].copy_(merged.add_(base))

    run_blocks(ops.block_count(n), work)
    return out


def breadcrumbs(inp: TensorInputs, p: BreadcrumbsParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.breadcrumbs`: ``theta_0 + lambda sum_i w_i band(tau_i)``
    (the band by exact selection over the blocks, :func:`_band`)."""
    return _band(inp, p, lambda taus, acc: _sum_into(acc, taus, inp.weights))


def breadcrumbs_ties(inp: TensorInputs, p: BreadcrumbsTiesParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.breadcrumbs_ties`: band -> elect_sign -> disjoint_mean
    -> scale (:func:`_band`)."""

    def combine(taus: list[torch.Tensor], acc: torch.Tensor) -> torch.Tensor:
        sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
        return ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)

    return _band(inp, p, combine)


# ----------------------------------------------------------------------------------- model stock, SLERP


def model_stock(inp: TensorInputs, p: ModelStockParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.model_stock`: ``theta_0 + t mean_i tau_i``.

    Two passes over cache-sized blocks, the task vectors formed in each block as the reference forms them:
    the block Gram matrix of the task vectors (:func:`_gram`, the reference's :func:`mergelab.ops.gram`)
    gives the ratio t (:func:`mergelab.ops.model_stock_ratio_from_gram`), then the mean and the interpolation.
    No tensor-sized temporaries, whatever the number of experts.
    """
    if p.filter_wise and inp.base.dim() >= 2:  # type: ignore[union-attr]
        return catalog.model_stock(inp, p)  # one ratio per row: the reference
    if len(inp.experts) < 2:
        raise ValueError("model stock needs at least two fine-tuned models")
    t = ops.model_stock_ratio_from_gram(_gram(inp, origin=True), extrapolate=p.extrapolate)
    n, vectors_of = _sphere_blocks(inp, origin=True)
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=inp.base.device)  # type: ignore[union-attr]
    out_flat = out.view(-1)
    ones = [1.0] * len(inp.experts)
    total = float(len(inp.experts))
    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(len(inp.experts) + 2, n, inp.compute_dtype, out.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            acc, *rest = buffers.get(end - start)
            base, taus = vectors_of(start, end, rest)
            mean = _sum_into(acc, taus, ones).div_(total)
            out_flat[start:end].copy_(mean.mul_(t).add_(base))  # type: ignore[arg-type]

    run_in_chunks(ops.block_count(n), work)
    return out


def slerp(inp: TensorInputs, p: SlerpParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.slerp`: ``c_a a + c_b b`` (``(1 - t) a + t b`` when linear).

    Two passes over cache-sized blocks of the float32 ends, converted in each block: the block Gram matrix
    of ``(a, b)`` (the reference's :func:`mergelab.ops.gram`) gives the coefficients
    (:func:`mergelab.ops.slerp_coefficients_from_gram`), then the combination. No tensor-sized temporaries.
    """
    a_in, b_in = (inp.base, inp.experts[0]) if len(inp.experts) == 1 else inp.experts
    a, b = a_in.reshape(-1), b_in.reshape(-1)  # type: ignore[union-attr]
    dtype = inp.compute_dtype
    n = a.numel()
    blocks = ops.block_count(n)
    block = ops.block_size()
    partials: list[list[float]] = [[] for _ in range(blocks)]

    def gram_work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(2, n, dtype, a.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            x, y = buffers.get(end - start)
            partials[j] = ops.gram_partials(ops.host_arrays([x.copy_(a[start:end]), y.copy_(b[start:end])]))

    run_in_chunks(blocks, gram_work)
    coefficients = ops.slerp_coefficients_from_gram(ops.gram_from_partials(partials, 2), p.t, p.parallel_threshold)
    out = torch.empty(a_in.shape, dtype=inp.result_dtype, device=a.device)  # type: ignore[union-attr]
    out_flat = out.view(-1)

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(4, n, dtype, a.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            x, y, u, v = buffers.get(end - start)
            out_flat[start:end].copy_(_combine_into(x, y, [u.copy_(a[start:end]), v.copy_(b[start:end])],
                                                    coefficients))

    run_in_chunks(blocks, work)
    return out


def _whole_tensor(reference: Kernel) -> Kernel:
    """A whole-tensor kernel: ``reference`` (a spectral method, whose SVD needs the whole matrix), rounded
    once into ``inp.result_dtype``. Its temporaries are a few copies of one layer's matrix."""

    def run(inp: TensorInputs, p: Any) -> torch.Tensor:
        return reference(inp, p).to(inp.result_dtype)

    run.__name__ = run.__qualname__ = reference.__name__
    run.__doc__ = f"Whole-tensor kernel of :func:`mergelab.methods.catalog.{reference.__name__}` (formula there)."
    return run


#: TSV-Merge, Iso-C and Iso-CTS work per layer on whole matrices (SVDs), so their kernels are their references.
tsv_merge, iso_c, iso_cts = (_whole_tensor(catalog.tsv_merge), _whole_tensor(catalog.iso_c),
                             _whole_tensor(catalog.iso_cts))


# ------------------------------------------------------------------------ issue 15: mergekit's methods


def _row_blocks(n: int, row: int) -> list[tuple[int, int]]:
    """``(start, stop)`` entry ranges of whole rows of ``row`` entries, about a block's worth each."""
    step = max(1, ops.block_size() // max(row, 1)) * row
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _della(inp: TensorInputs, p: DellaLinearParams,
           combine: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """DELLA's MAGPRUNE (:func:`mergelab.ops.magprune`) on blocks of whole rows, then ``combine(pruned, acc)``
    (``acc``: a scratch block), ``lambda`` and the base: the merged block, rounded once into the output dtype.

    Expert i (its own ``density`` and ``epsilon`` when the spec gives per-model values) keeps entry j with
    probability ``q_ij = table_i[r_ij]``, ``r_ij`` the descending rank of ``|tau_ij|`` in its row (ties by
    position) and ``table_i`` :func:`mergelab.ops.magprune_rank_probabilities`; the mask ``u_ij < q_ij`` takes
    ``u`` from expert i's generator in flat order, so each expert's blocks are drawn in order (a draw of
    ``m`` then ``m'`` uniforms equals one of ``m + m'``: the reference's masks). The ranks come from
    :func:`mergelab.ops.descending_order` (a radix sort of the magnitudes' bits) and
    :func:`mergelab.ops.by_rank` (one scatter), on each row block.

    - ``rescale: l1`` (``m_i tau_i ||tau_i||_1 / ||m_i tau_i||_1``): the two norms are torch's float32 sums
      over the whole tensor, as the reference's (their order cannot be reproduced block by block), so a
      first pass draws every expert's mask (experts on all cores, each walking its blocks in order), kept as
      bits (one per entry and expert, numpy's ``packbits`` on the CPU); then, expert by expert, one
      tensor-sized buffer holds ``|tau_i|`` (filled on all cores) for the first sum and ``m_i |tau_i|`` for
      the second; the last pass, over independent blocks on all cores, applies masks and factors and
      combines. Temporaries: ``n / 8`` bytes per pruned expert, one ``n``-entry buffer of the compute dtype
      (at its peak, the benchmark's 65.5M-entry embedding: 33 MB of masks and 262 MB), and blocks;
    - ``inverse`` (``m_ij tau_ij / q_ij``) and ``none``: one pass, blocks in order, a block's experts on all
      cores, then its combination split over the cores.
    """
    shape = inp.base.shape  # type: ignore[union-attr]
    base_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    flats = [e.reshape(-1) for e in inp.experts]
    n = base_in.numel()
    device = base_in.device
    out = torch.empty(shape, dtype=inp.result_dtype, device=device)
    if n == 0:
        return out
    out_flat = out.view(-1)
    dtype = inp.compute_dtype
    row = n // shape[0] if len(shape) >= 2 else n
    ranges = _row_blocks(n, row)
    densities = [inp.per_model(i, "density", p.density) for i in range(len(flats))]
    epsilons = [inp.per_model(i, "epsilon", p.epsilon) for i in range(len(flats))]
    tables = {i: ops.magprune_rank_probabilities(row, d, epsilons[i], p.spacing).to(device)
              for i, d in enumerate(densities) if d < 1.0}  # the pruned experts (density 1: tau_i as is)

    def task_vector(i: int, a: int, b: int, base: torch.Tensor) -> torch.Tensor:
        return flats[i][a:b].to(dtype) - base  # never in place: .to may alias the input

    def mask(i: int, tau: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert i's keep mask ``u < q`` on a row block (``u`` drawn next from ``gen``) and ``q``."""
        q = ops.by_rank(ops.descending_order(tau.view(-1, row).abs()), tables[i]).view(-1)
        return torch.rand(tau.numel(), generator=gen, device=device) < q, q

    def finish(a: int, b: int, base: torch.Tensor, taus: list[torch.Tensor]) -> None:
        merged = combine(taus, torch.empty(b - a, dtype=dtype, device=device))
        if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
            merged.mul_(p.lambda_)
        out_flat[a:b].copy_(merged.add_(base))

    if p.rescale == "l1" and tables:
        pruned = sorted(tables)
        masks: dict[int, list[Any]] = {i: [None] * len(ranges) for i in pruned}  # per expert and block
        packed = device.type == "cpu"  # masks kept as bits (numpy's packbits): n / 8 bytes per expert

        def keep_of(i: int, j: int) -> torch.Tensor:
            a, b = ranges[j]
            stored = masks[i][j]
            return torch.from_numpy(np.unpackbits(stored, count=b - a).view(np.bool_)) if packed else stored

        def draw(first: int, stop: int) -> None:
            for i in pruned[first:stop]:
                gen = inp.generator(p.seed, i)
                for j, (a, b) in enumerate(ranges):
                    keep, _ = mask(i, task_vector(i, a, b, base_in[a:b].to(dtype)), gen)
                    masks[i][j] = np.packbits(keep.numpy()) if packed else keep

        run_in_chunks(len(pruned), draw)
        factors: dict[int, float | None] = {}
        whole = torch.empty(n, dtype=dtype, device=device)
        for i in pruned:

            def magnitudes(blocks: Iterator[int], i: int = i) -> None:
                for j in blocks:
                    a, b = ranges[j]
                    torch.sub(flats[i][a:b].to(dtype), base_in[a:b].to(dtype), out=whole[a:b]).abs_()

            def masked(blocks: Iterator[int], i: int = i) -> None:
                for j in blocks:
                    a, b = ranges[j]
                    whole[a:b].mul_(keep_of(i, j))

            run_blocks(len(ranges), magnitudes)
            before = float(whole.view(shape).sum())
            run_blocks(len(ranges), masked)
            after = float(whole.view(shape).sum())
            factors[i] = ops.l1_factor(before, after)
        del whole

        def merge(blocks: Iterator[int]) -> None:
            for j in blocks:
                a, b = ranges[j]
                base = base_in[a:b].to(dtype)
                taus = []
                for i in range(len(flats)):
                    tau = task_vector(i, a, b, base)
                    if i in masks:
                        tau.mul_(keep_of(i, j))
                        if factors[i] is not None:
                            tau.mul_(factors[i])
                    taus.append(tau)
                finish(a, b, base, taus)

        run_blocks(len(ranges), merge)
        return out

    gens = {i: inp.generator(p.seed, i) for i in tables}
    for a, b in ranges:
        base = base_in[a:b].to(dtype)
        taus: list[torch.Tensor] = [None] * len(flats)  # type: ignore[list-item]

        def expert(first: int, stop: int) -> None:
            for i in range(first, stop):
                tau = task_vector(i, a, b, base)
                if i in tables:
                    keep, q = mask(i, tau, gens[i])
                    tau.mul_(keep)
                    if p.rescale == "inverse":
                        tau.div_(q)
                taus[i] = tau

        run_in_chunks(len(flats), expert)
        step = -(-(b - a) // compute_workers())  # the combination is entry-wise: any split will do

        def part(first: int, stop: int) -> None:
            for s in range(first * step, min(b - a, stop * step), step):
                t = min(b - a, s + step)
                finish(a + s, a + t, base[s:t], [tau[s:t] for tau in taus])

        run_in_chunks(-(-(b - a) // step), part)
    return out


def della(inp: TensorInputs, p: DellaParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.della`: MAGPRUNE -> elect_sign -> disjoint_mean -> scale."""

    def combine(taus: list[torch.Tensor], acc: torch.Tensor) -> torch.Tensor:
        sign = ops.elect_sign(taus, inp.weights, by=p.sign_election, zero=p.zero_sign)
        return ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor, test=p.sign_test)

    return _della(inp, p, combine)


def della_linear(inp: TensorInputs, p: DellaLinearParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.della_linear`: ``theta_0 + lambda sum_i w_i magprune(tau_i)``."""
    return _della(inp, p, lambda taus, acc: _sum_into(acc, taus, inp.weights))


def _sphere_blocks(inp: TensorInputs, origin: bool):
    """``(n, origin_in, flats, vectors_of)`` for the coefficient methods: ``vectors_of(start, end, buffers)``
    fills a block of the vectors they combine (task vectors when ``origin``, else the models) in the compute
    dtype, the reference's values entry by entry, and returns ``(origin_block or None, vectors)``."""
    flats = [e.reshape(-1) for e in inp.experts]
    origin_in = inp.base.reshape(-1) if origin else None  # type: ignore[union-attr]
    n = flats[0].numel()

    def vectors_of(start: int, end: int, buffers: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        o, *vs = buffers
        if origin_in is not None:
            o.copy_(origin_in[start:end])
            return o, [v.copy_(e[start:end]).sub_(o) for v, e in zip(vs, flats)]
        return None, [v.copy_(e[start:end]) for v, e in zip(vs, flats)]

    return n, vectors_of


def _gram(inp: TensorInputs, origin: bool) -> ops.Gram:
    """:func:`mergelab.ops.gram` of the vectors of :func:`_sphere_blocks`, block partials on all cores."""
    n, vectors_of = _sphere_blocks(inp, origin)
    blocks = ops.block_count(n)
    partials: list[list[float]] = [[] for _ in range(blocks)]
    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(len(inp.experts) + 1, n, inp.compute_dtype, inp.experts[0].device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            _, vs = vectors_of(start, end, buffers.get(end - start))
            partials[j] = ops.gram_partials(ops.host_arrays(vs))

    run_in_chunks(blocks, work)
    return ops.gram_from_partials(partials, len(inp.experts))


def _combine_into(acc: torch.Tensor, tmp: torch.Tensor, vectors: Sequence[torch.Tensor],
                  coefficients: Sequence[float]) -> torch.Tensor:
    """``acc = sum_i c_i v_i`` with :func:`mergelab.ops.combine`'s operations (``v_0 c_0``, then ``+ v_i c_i``
    with each product rounded: the same bits); ``tmp``: scratch of the same size."""
    torch.mul(vectors[0], coefficients[0], out=acc)
    for v, c in zip(vectors[1:], coefficients[1:]):
        acc.add_(torch.mul(v, c, out=tmp))
    return acc


def _combination(inp: TensorInputs, coefficients: Sequence[float], origin: bool, shape: torch.Size) -> torch.Tensor:
    """``sum_i c_i v_i`` (+ the origin) block by block, in :func:`mergelab.ops.combine`'s order."""
    n, vectors_of = _sphere_blocks(inp, origin)
    out = torch.empty(shape, dtype=inp.result_dtype, device=inp.experts[0].device)
    out_flat = out.view(-1)
    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(len(inp.experts) + 3, n, inp.compute_dtype, inp.experts[0].device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            acc, tmp, *rest = buffers.get(end - start)
            o, vs = vectors_of(start, end, rest)
            merged = _combine_into(acc, tmp, vs, coefficients)
            out_flat[start:end].copy_(merged if o is None else merged.add_(o))

    run_in_chunks(ops.block_count(n), work)
    return out


def nuslerp(inp: TensorInputs, p: NuSlerpParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.nuslerp`: the Gram matrix by blocks, the two
    coefficients, the combination by blocks (per-row interpolation, without ``flatten``: the reference)."""
    shape = inp.experts[0].shape
    if not (p.flatten or len(shape) < 2) or inp.experts[0].numel() == 0:
        return catalog.nuslerp(inp, p)
    origin = inp.base is not None
    t = ops.nuslerp_t(inp.weights)
    return _combination(inp, ops.nuslerp_coefficients(_gram(inp, origin), t), origin, shape)


def multislerp(inp: TensorInputs, p: MultiSlerpParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.multislerp`: Gram matrix, coefficients, combination."""
    shape = inp.experts[0].shape
    origin = inp.base is not None
    if len(inp.experts) == 1 or inp.experts[0].numel() == 0:
        return _combination(inp, [1.0], origin, shape)
    c = ops.multislerp_coefficients(_gram(inp, origin), inp.weights, normalize_weights=p.normalize_weights,
                                    eps=p.eps)
    return _combination(inp, c, origin, shape)


def karcher(inp: TensorInputs, p: KarcherParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.karcher`: Gram matrix, the iteration on coefficients,
    combination."""
    shape = inp.experts[0].shape
    if len(inp.experts) == 1 or inp.experts[0].numel() == 0:
        return _combination(inp, [1.0], False, shape)
    c = ops.karcher_coefficients(_gram(inp, False), inp.weights, max_iter=p.max_iter, tol=p.tol)
    return _combination(inp, c, False, shape)


def _elementwise(inp: TensorInputs, f: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
                 shape: torch.Size) -> torch.Tensor:
    """``f(base block, model block)`` (compute dtype; base None without one) block by block on all cores."""
    x_in = inp.experts[0].reshape(-1)
    base_in = None if inp.base is None else inp.base.reshape(-1)
    n = x_in.numel()
    out = torch.empty(shape, dtype=inp.result_dtype, device=x_in.device)
    out_flat = out.view(-1)
    block = ops.block_size()

    def work(first: int, stop: int) -> None:
        buffers = ops.BlockBuffers(2, n, inp.compute_dtype, x_in.device)
        for j in range(first, stop):
            start, end = j * block, min(n, (j + 1) * block)
            a, x = buffers.get(end - start)
            x.copy_(x_in[start:end])
            out_flat[start:end].copy_(f(None if base_in is None else a.copy_(base_in[start:end]), x))

    run_in_chunks(ops.block_count(n), work)
    return out


def nearswap(inp: TensorInputs, p: NearSwapParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.nearswap` (element-wise)."""
    return _elementwise(inp, lambda a, b: ops.nearswap(a, b, p.t), inp.experts[0].shape)


def passthrough(inp: TensorInputs, p: PassthroughParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.passthrough`: the model (times ``scale``) by blocks."""
    return _elementwise(inp, lambda a, x: x if p.scale == 1.0 else x.mul_(p.scale), inp.experts[0].shape)


def sce(inp: TensorInputs, p: SceParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.sce`, by passes over the blocks (never a float32 copy
    of a task vector): the variances' nonzero count, then their exact k-th largest with each block's share of
    the ties (exact selection: :class:`mergelab.ops.BlockKthLargest`), then the selected task vectors'
    energies (the block partials of :func:`mergelab.ops.gram`'s diagonal, summed in float64 in block order),
    then sign election and the weighted disjoint mean."""
    base_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    flats = [e.reshape(-1) for e in inp.experts]
    n, n_exp, dtype = base_in.numel(), len(inp.experts), inp.compute_dtype
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)  # type: ignore[union-attr]
    if n == 0:
        return out
    block, blocks = ops.block_size(), ops.block_count(n)

    def taus_of(start: int, end: int, buffers: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, *vs = buffers
        b.copy_(base_in[start:end])
        return b, [v.copy_(e[start:end]).sub_(b) for v, e in zip(vs, flats)]

    def passes(fn: Callable[[int, torch.Tensor, list[torch.Tensor]], None]) -> None:
        def work(first: int, stop: int) -> None:
            buffers = ops.BlockBuffers(n_exp + 1, n, dtype, base_in.device)
            for j in range(first, stop):
                start, end = j * block, min(n, (j + 1) * block)
                fn(j, *taus_of(start, end, buffers.get(end - start)))

        run_in_chunks(blocks, work)

    select: tuple[float, list[int]] | None = None  # (t, per-block tie quotas); None: every entry kept
    none_kept = False
    if p.select_topk < 1.0:
        nonzero = [0] * blocks
        passes(lambda j, b, taus: nonzero.__setitem__(j, int(torch.count_nonzero(ops.expert_variance(taus)))))
        k = ops.select_count(sum(nonzero), p.select_topk)
        if k == 0:
            none_kept = True
        elif n <= ops.select_small_size():
            whole = [e.to(dtype) - base_in.to(dtype) for e in flats]
            var = ops.expert_variance(whole)
            t = float(ops.kth_largest(var, k))
            tied = [int(torch.count_nonzero(var[a:b] == t)) for a, b in ops.block_ranges(n, block)]
            select = (t, selection.split_ties(k - int(torch.count_nonzero(var > t)), tied))
        else:
            gen = torch.Generator(device="cpu").manual_seed(0)
            idx = torch.randint(0, n, (ops.select_sample_size(),), generator=gen).to(base_in.device)
            b_sample = base_in[idx].to(dtype)
            sample = ops.expert_variance([e[idx].to(dtype) - b_sample for e in flats])
            selector = ops.BlockKthLargest(n, k, sample, blocks)
            passes(lambda j, b, taus: selector.observe(j, ops.expert_variance(taus)))
            found = selector.result()
            if found is None:
                var = ops.expert_variance([e.to(dtype) - base_in.to(dtype) for e in flats])
                t = float(ops.kth_largest(var, k))
                tied = [int(torch.count_nonzero(var[a:b] == t)) for a, b in ops.block_ranges(n, block)]
                select = (t, selection.split_ties(k - int(torch.count_nonzero(var > t)), tied))
            else:
                select = (found[0], selector.tie_quotas(k - found[1]))

    def selected(j: int, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        if none_kept:
            return [tau.mul_(0.0) for tau in taus]
        if select is None:
            return taus
        var = ops.expert_variance(taus)
        mask = torch.empty(var.shape, dtype=torch.bool, device=var.device)
        ops.keep_top_into(var, select[0], select[1][j], mask)
        return [tau.mul_(mask) for tau in taus]

    energy = [[0.0] * n_exp for _ in range(blocks)]

    def energies(j: int, b: torch.Tensor, taus: list[torch.Tensor]) -> None:
        energy[j] = ops.squared_norm_partials(ops.host_arrays(selected(j, taus)))

    passes(energies)
    sums = [0.0] * n_exp
    for part in energy:
        for i, v in enumerate(part):
            sums[i] += v
    weights = ops.energy_weights(sums, n, p.min_energy)
    out_flat = out.view(-1)
    ones = [1.0] * n_exp

    def combine(j: int, b: torch.Tensor, taus: list[torch.Tensor]) -> None:
        taus = selected(j, taus)
        sign = ops.elect_sign(taus, ones, by="mass", zero=p.zero_sign)
        merged = ops.disjoint_mean(taus, sign, weights, divisor="weight")
        out_flat[j * block: j * block + b.numel()].copy_(merged.add_(b))

    passes(combine)
    return out


def arcee_fusion(inp: TensorInputs, p: ArceeFusionParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.arcee_fusion`, on blocks of whole rows (last axis): pass 1
    each row's KL divergence (one float per row), pass 2 the importance block by block, counted once against
    the brackets of all three quantiles (:class:`mergelab.ops.BlockRanks`, the reference's
    :func:`mergelab.ops.kth_largest_many`), pass 3 ``a + (b - a) [s >= threshold]`` (:func:`mergelab.ops.fusion_merge`)
    with the difference and importance recomputed. Passes on all cores."""
    shape = inp.base.shape  # type: ignore[union-attr]
    a_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    b_in = inp.experts[0].reshape(-1)
    n, dtype = a_in.numel(), inp.compute_dtype
    out = torch.empty(shape, dtype=inp.result_dtype, device=a_in.device)
    if n == 0:
        return out
    row = shape[-1]
    ranges = _row_blocks(n, row)
    divergence = torch.empty(n // row, dtype=dtype, device=a_in.device)

    def rows_of(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return a_in[start:end].to(dtype).view(-1, row), b_in[start:end].to(dtype).view(-1, row)

    def over_blocks(fn: Callable[[int, int, int], None]) -> None:
        run_blocks(len(ranges), lambda indices: [fn(j, *ranges[j]) for j in indices])

    def kl(j: int, start: int, end: int) -> None:
        divergence[start // row: end // row].copy_(ops.fusion_row_divergence(*rows_of(start, end)))

    def importance(start: int, end: int) -> torch.Tensor:
        a, b = rows_of(start, end)
        return ops.fusion_importance(a, b, divergence[start // row: end // row]).view(-1)

    over_blocks(kl)
    ks = ops.quantile_ranks(n)
    if n <= ops.select_small_size():
        q1, median, q3 = ops.kth_largest_many(torch.cat([importance(a, b) for a, b in ranges]), ks)
    else:
        gen = torch.Generator(device="cpu").manual_seed(0)
        idx = torch.randint(0, n, (ops.quantile_sample_size(n),), generator=gen).to(a_in.device)
        sample = torch.sub(b_in[idx].to(dtype), a_in[idx].to(dtype)).abs_().mul_(divergence[idx // row])
        ranks = ops.BlockRanks(n, [n - k for k in ks], sample, len(ranges))
        over_blocks(lambda j, start, end: ranks.observe(j, importance(start, end)))
        found = ranks.result()
        if any(f is None for f in found):
            whole = torch.cat([importance(a, b) for a, b in ranges])
            found = [float(ops.kth_largest(whole, k)) if f is None else f for f, k in zip(found, ks)]
        q1, median, q3 = found  # type: ignore[misc]
    threshold = ops.fusion_threshold(q1, median, q3)
    out_flat = out.view(-1)

    def fuse(j: int, start: int, end: int) -> None:
        a, b = rows_of(start, end)
        difference = torch.sub(b, a)
        s = ops.fusion_importance_of(difference, divergence[start // row: end // row])
        out_flat[start:end].copy_(ops.fusion_merge(a, difference, s, threshold).view(-1))

    over_blocks(fuse)
    return out


def _overlap_passes(inp: TensorInputs) -> tuple[torch.Tensor, Callable[[Callable[..., None]], None]]:
    """The output tensor and ``passes(fn)``: ``fn(j, base_block, taus_block)`` for every block j on all cores, the
    task vectors formed in the compute dtype as :meth:`TensorInputs.task_vectors` forms them (entry by entry)."""
    base_in = inp.base.reshape(-1)  # type: ignore[union-attr]
    flats = [e.reshape(-1) for e in inp.experts]
    n, dtype = base_in.numel(), inp.compute_dtype
    out = torch.empty(inp.base.shape, dtype=inp.result_dtype, device=base_in.device)  # type: ignore[union-attr]
    block = ops.block_size()

    def passes(fn: Callable[..., None]) -> None:
        def work(first: int, stop: int) -> None:
            buffers = ops.BlockBuffers(len(flats) + 1, n, dtype, base_in.device)
            for j in range(first, stop):
                start, end = j * block, min(n, (j + 1) * block)
                b, *vs = buffers.get(end - start)
                b.copy_(base_in[start:end])
                fn(j, b, [v.copy_(e[start:end]).sub_(b) for v, e in zip(vs, flats)])

        run_in_chunks(ops.block_count(n), work)

    return out, passes


def _overlap(epsilon: float, scales: Sequence[float] | None,
             passes: Callable[[Callable[..., None]], None], out: torch.Tensor) -> torch.Tensor:
    """RAM's merge pass: ``theta_0 + overlap_merge(tau, m, c, scales)`` block by block (every operation is
    entry by entry, so the blocks' results are the reference's)."""
    out_flat = out.view(-1)
    block = ops.block_size()

    def merge_block(j: int, b: torch.Tensor, taus: list[torch.Tensor]) -> None:
        masks = ops.active_masks(taus, epsilon)
        merged = ops.overlap_merge(taus, masks, ops.active_count(masks, b.dtype), scales)
        out_flat[j * block: j * block + b.numel()].copy_(merged.add_(b))

    if out.numel():
        passes(merge_block)
    return out


def ram(inp: TensorInputs, p: RamParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.ram`: one pass, entry by entry."""
    out, passes = _overlap_passes(inp)
    return _overlap(p.epsilon, None, passes, out)


def ramplus_tl(inp: TensorInputs, p: RamPlusParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.ramplus_tl`, in two passes over the blocks: each model's
    numbers of shared and unique entries (integers: the blocks' counts add up to the tensor's exactly, in any
    order), then the factors ``lambda_i`` and the merge pass. Never a tensor-sized temporary."""
    out, passes = _overlap_passes(inp)
    if out.numel() == 0:
        return out
    per_block: dict[int, list[tuple[int, int]]] = {}

    def count_block(j: int, b: torch.Tensor, taus: list[torch.Tensor]) -> None:
        masks = ops.active_masks(taus, p.epsilon)
        per_block[j] = ops.shared_unique_counts(masks, ops.active_count(masks, b.dtype))

    passes(count_block)
    totals = [(sum(c[i][0] for c in per_block.values()), sum(c[i][1] for c in per_block.values()))
              for i in range(len(inp.experts))]
    scales = [ops.unique_scale(s, u, p.r, p.alpha) for s, u in totals]
    return _overlap(p.epsilon, scales, passes, out)


#: The torch back-end's kernels, by method: block kernels tested against the catalog's references
#: (tests/test_streaming.py). A catalog method without one runs as its reference, on whole tensors.
KERNELS: dict[str, Kernel] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "model_stock": model_stock,
    "slerp": slerp,
    "tsv_merge": tsv_merge,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "della": della,
    "della_linear": della_linear,
    "sce": sce,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "nearswap": nearswap,
    "arcee_fusion": arcee_fusion,
    "passthrough": passthrough,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
}

#: Kernels that read the models' own parameters (``inp.per_model``) as their references do: the engine runs
#: them on a spec with per-model values too (the others then run their references, on whole tensors).
PER_MODEL_KERNELS: frozenset[str] = frozenset({"breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})
