"""The data-free merging methods, each a named composition of :mod:`mergelab.ops` operators.

Notation: base theta_0, experts theta_i with weights w_i, task vectors tau_i = theta_i - theta_0.
Each method's docstring states the formula, its defaults, and where the defaults come from; their names,
parameters and requirements are in :mod:`mergelab.methods.catalog`.
"""

from __future__ import annotations

import torch

from mergelab import ops
from mergelab.methods.base import TensorInputs
from mergelab.methods.catalog import (  # noqa: F401  (re-exported: the parameters live in the catalog)
    METHODS,
    BreadcrumbsParams,
    DareLinearParams,
    DareTiesParams,
    MethodName,
    ModelStockParams,
    SlerpParams,
    TaskArithmeticParams,
    TiesParams,
    WeightAverageParams,
    ties_global_density,
)

# --------------------------------------------------------------------------------------------- averaging


def weight_average(inp: TensorInputs, p: WeightAverageParams) -> torch.Tensor:
    """Weight averaging / model soup (Wortsman et al. 2022): ``theta = sum_i w_i theta_i / sum_i w_i``.

    The base model is not part of the average (it only supplies the tensor order and config files).
    Computed as ``theta_1 + (sum_i w_i (theta_i - theta_1)) / sum_i w_i`` (algebraically equal), so merging
    identical models returns that model bit-exactly and rounding acts on the small differences only.
    Computed in cache-sized blocks (:mod:`mergelab.ops.blocks`); the result is in ``inp.result_dtype``.
    """
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

    ops.run_in_chunks(ops.block_count(n), work)
    return out


# ------------------------------------------------------------------------------------ task arithmetic


def task_arithmetic(inp: TensorInputs, p: TaskArithmeticParams) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta = theta_0 + lambda * sum_i w_i tau_i``.

    Default ``lambda = 1`` (the plain sum of task vectors); the paper tunes lambda on validation data
    (0.3-0.5 is typical for 8 vision tasks), so set it for your pool.

    Computed in the expanded form, entry by entry in ``compute_dtype``: ``tau_i = theta_i - theta_0``
    (exact for bf16 inputs of similar magnitude), ``s = sum_i w_i tau_i`` accumulated in model order,
    ``theta = lambda * s + theta_0``, rounded once to ``inp.result_dtype``. (The folded form
    ``(1 - lambda sum_i w_i) theta_0 + lambda sum_i w_i theta_i`` rounds at the scale of theta instead of
    tau and does not return the base bit-exactly for identical models.) Each input is converted once, in
    cache-sized blocks (:mod:`mergelab.ops.blocks`), into three reused block buffers.
    """
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

    ops.run_in_chunks(ops.block_count(n), work)
    return out


# ------------------------------------------------------------------------------------------------ TIES


def ties(inp: TensorInputs, p: TiesParams) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim -> elect_sign -> disjoint_mean -> scale.

    ``hat tau_i = trim(tau_i, density)``; ``gamma = sgn(sum_i w_i hat tau_i)``;
    ``theta = theta_0 + lambda * sum_{i in A} w_i hat tau_i / |A|`` over the models A agreeing with gamma.
    Defaults from the paper: density 0.2 (keep top 20%), trimming over the whole model
    (``trim_scope: global``, as in the paper's code and FusionBench; ``tensor`` trims each tensor separately,
    as mergekit does), election by mass, mean over agreeing entries (``disjoint_divisor: count``;
    ``weight`` divides by the agreeing weights, mergekit's ``normalize``), lambda 1.

    Computed in two passes over cache-sized blocks (:mod:`mergelab.ops.blocks`), never holding a float32
    copy of the tensor: pass 1 finds each expert's per-tensor threshold (k-th largest ``|tau_i|``) by exact
    sample-based selection (:class:`mergelab.ops.BlockKthLargest`); pass 2 recomputes ``tau_i`` block by
    block, trims it (entries tied at the threshold are kept first-come in flat order, so exactly k survive,
    as :func:`mergelab.ops.trim`), elects the sign and takes the disjoint mean. Every operation is
    element-wise, so the result equals the whole-tensor composition of the operators bit for bit.
    """
    thresholds = inp.thresholds if p.trim_scope == "global" else None
    if p.trim_scope == "global" and thresholds is None and p.density < 1.0 and inp.base.numel() > 0:
        raise ValueError(
            f"ties with trim_scope 'global' needs whole-model thresholds for tensor '{inp.name}'; "
            "merge through mergelab.engine.merge (which computes them) or use trim_scope 'tensor'"
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

    ops.run_in_chunks(ops.block_count(n), work, workers=1 if in_order else None)
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

    ops.run_in_chunks(blocks, work)
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


# ------------------------------------------------------------------------------------------------ DARE


def _dropped(inp: TensorInputs, density: float, rescale: str, seed: int) -> list[torch.Tensor]:
    return [
        ops.drop(tau, density, rescale=rescale, generator=inp.generator(seed, i))
        for i, tau in enumerate(inp.task_vectors())
    ]


def dare_linear(inp: TensorInputs, p: DareLinearParams) -> torch.Tensor:
    """DARE + task arithmetic (Yu et al. 2024): ``theta = theta_0 + lambda * sum_i w_i drop(tau_i)``.

    ``drop`` keeps each entry with probability ``density = 1 - p`` and rescales by ``1/density``
    (``rescale: inverse``, the paper's; ``l1`` matches the L1 norm as mergekit does). Default density 0.5:
    the paper sweeps drop rates 0.1-0.99 and mergekit requires it explicitly, so 0.5 is a neutral middle.
    The masks are reproducible: seeded by ``seed``, the expert's index and the tensor name.
    """
    merged = ops.weighted_sum(_dropped(inp, p.density, p.rescale, p.seed), inp.weights)
    return inp.base.to(inp.compute_dtype) + ops.scale(merged, p.lambda_)


def dare_ties(inp: TensorInputs, p: DareTiesParams) -> torch.Tensor:
    """DARE + TIES consensus (Yu et al. 2024, sec. 4): drop -> elect_sign -> disjoint_mean -> scale.

    Same as :func:`ties` with the magnitude trim replaced by DARE's random drop and rescale.
    """
    taus = _dropped(inp, p.density, p.rescale, p.seed)
    sign = ops.elect_sign(taus, inp.weights, by=p.sign_election)
    merged = ops.disjoint_mean(taus, sign, inp.weights, divisor=p.disjoint_divisor)
    return inp.base.to(inp.compute_dtype) + ops.scale(merged, p.lambda_)


# ----------------------------------------------------------------------------------------- breadcrumbs


def breadcrumbs(inp: TensorInputs, p: BreadcrumbsParams) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): ``theta_0 + lambda * sum_i w_i band(tau_i)``.

    ``band`` (:func:`mergelab.ops.trim_band`) removes per tensor the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping a ``density`` fraction. The paper tunes both per
    setting; defaults density 0.9 and gamma 0.01 are mergekit's.
    """
    taus = [ops.trim_band(tau, p.density, p.gamma) for tau in inp.task_vectors()]
    return inp.base.to(inp.compute_dtype) + ops.scale(ops.weighted_sum(taus, inp.weights), p.lambda_)


# ----------------------------------------------------------------------------------------- model stock


def model_stock(inp: TensorInputs, p: ModelStockParams) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), per tensor: ``theta = t * mean_i theta_i + (1 - t) * theta_0``.

    ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine between the task vectors of this
    tensor (:func:`mergelab.ops.model_stock_ratio`). Needs N >= 2 experts; per-model weights are not used.
    """
    taus = inp.task_vectors()
    t = ops.model_stock_ratio(taus)
    mean_tau = ops.weighted_mean(taus, [1.0] * len(taus))
    return inp.base.to(inp.compute_dtype) + ops.scale(mean_tau, t)


# ----------------------------------------------------------------------------------------------- SLERP


def slerp(inp: TensorInputs, p: SlerpParams) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; as used for model merging by mergekit), per tensor.

    With one expert, interpolates from the base (t = 0) to the expert (t = 1); with two experts, from the
    first to the second (the base then only supplies tensor order and config files). Default t = 0.5.
    """
    if len(inp.experts) == 1:
        a, b = inp.base, inp.experts[0]
    else:
        a, b = inp.experts
    return ops.slerp(a.to(inp.compute_dtype), b.to(inp.compute_dtype), p.t)
