"""The torch back-end's block kernels: weight averaging, task arithmetic and TIES on cache-sized blocks.

Each kernel computes, entry by entry, exactly what its method's reference composition of operators computes
(:mod:`mergelab.methods.catalog`; tested bit for bit), but block by block (:mod:`mergelab.ops.blocks`)
with the blocks split over the cores (:func:`mergelab.merging.pipeline.run_in_chunks`), rounding each
block once into ``inp.result_dtype``: their float32 temporaries are a few MiB whatever the tensor size.
Notation: base theta_0, experts theta_i with weights w_i, task vectors tau_i = theta_i - theta_0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergelab import ops
from mergelab.merging.pipeline import run_in_chunks
from mergelab.methods.base import TensorInputs
from mergelab.methods.catalog import TaskArithmeticParams, TiesParams, WeightAverageParams

#: A kernel: the merged tensor of one name from its inputs and resolved parameters.
Kernel = Callable[[TensorInputs, Any], torch.Tensor]

# --------------------------------------------------------------------------------------------- averaging


def weight_average(inp: TensorInputs, p: WeightAverageParams) -> torch.Tensor:
    """Block kernel of :func:`mergelab.methods.catalog.weight_average` (formula there):
    ``theta_1 + (sum_i w_i (theta_i - theta_1)) / sum_i w_i``, block by block, in ``inp.result_dtype``."""
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
            sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
            merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor)
            if p.lambda_ != 1.0:  # x * 1 == x exactly: skip the pass
                merged.mul_(p.lambda_)
            out_flat[start:end].copy_(merged.add_(base))

    run_in_chunks(ops.block_count(n), work, workers=1 if in_order else None)
    return out


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


#: The torch back-end's kernels, by method: block kernels tested against the catalog's references
#: (tests/test_streaming.py). Every other catalog method runs as its reference, on whole tensors.
KERNELS: dict[str, Kernel] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
}
