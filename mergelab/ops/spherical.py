"""Means on the sphere and other Gram-matrix methods, on tensors: the Gram matrix of whole tensors by the
block rule of :mod:`mergelab.ops.gram_matrix` (where the coefficient formulas of NuSLERP, Multi-SLERP and the Karcher
mean live, torch-free), the linear combination they return, and NuSLERP row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.ops.blocks import block_ranges, block_size
from mergelab.ops.gram_matrix import Gram, gram_from_partials, gram_partials


def host_arrays(blocks: Sequence[torch.Tensor]) -> list:
    """The 1-D numpy views of ``blocks`` (copied to the host when on another device) that
    :func:`mergelab.ops.gram_matrix.gram_partials` takes: the torch side of the one Gram rule."""
    return [b.detach().reshape(-1).cpu().numpy() for b in blocks]


def gram(vectors: Sequence[torch.Tensor]) -> Gram:
    """``G_ij = <x_i, x_j>`` of the flattened ``vectors`` (float32 or float64, one dtype) by the rule of
    :mod:`mergelab.ops.gram_matrix`: each block of :func:`mergelab.ops.blocks.block_size` entries' dot products in
    the vectors' dtype, summed in float64 in block order (the block kernels' order)."""
    flats = [v.reshape(-1) for v in vectors]
    n = flats[0].numel()
    parts = [gram_partials(host_arrays([f[a:b] for f in flats])) for a, b in block_ranges(n, block_size())]
    return gram_from_partials(parts, len(flats))


def combine(vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i x_i`` in the vectors' dtype, in model order: ``x_0 c_0``, then ``+ x_i c_i`` (each product
    rounded, then added: no fused multiply-add, so a numpy kernel computes the same bits; mergekit's
    ``(1 - t) v_0 + t v_1`` for two)."""
    out = vectors[0] * coefficients[0]
    for x, c in zip(vectors[1:], coefficients[1:]):
        out.add_(x * c)
    return out


def nuslerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float, dim: int, *, eps: float = 1e-8,
                 norm_eps: float = 1e-7) -> torch.Tensor:
    """NuSLERP slice by slice along ``dim`` (mergekit's ``nuslerp`` without flatten: ``dim=-1`` interpolates
    each row, ``dim=0`` each column): the formula of :func:`mergelab.ops.nuslerp_coefficients` per slice, its
    coefficients in float64 from float64 reductions, the combination in the inputs' dtype."""
    a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    a64, b64 = a.double(), b.double()
    n0 = a64.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
    n1 = b64.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
    cos = ((a64 * b64).sum(dim=-1, keepdim=True) / (n0 * n1)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    colinear = s.abs() < eps
    safe = torch.where(colinear, torch.ones_like(s), s)
    c0 = torch.where(colinear, torch.full_like(s, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / safe)
    out = a * c0.to(a.dtype) + b * c1.to(b.dtype)
    return out.transpose(dim, -1).contiguous()
