"""Pure tensor operators on task vectors, composable like optax transformations.

A task vector is ``tau_i = theta_i - theta_0`` (:func:`task_vector`). Per-vector operators (``trim``,
``trim_band``, ``drop``, ``scale``) map one task vector to another and compose with :func:`chain`;
combining operators (``weighted_sum``, ``weighted_mean``, ``elect_sign``, ``disjoint_mean``) reduce several
task vectors of one tensor to one. A data-free merging method is a named composition, e.g. TIES =
trim -> elect_sign -> disjoint_mean -> scale (see :mod:`mergelab.methods`). Each docstring states its formula.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch

from mergelab.ops.blocks import (
    BLOCK,
    BlockBuffers,
    block_count,
    block_ranges,
    block_size,
    compute_workers,
    run_in_chunks,
)
from mergelab.ops.consensus import disjoint_mean, elect_sign, scale, weighted_mean, weighted_sum
from mergelab.ops.interpolate import model_stock_ratio, slerp
from mergelab.ops.select import (
    BlockKthLargest,
    StreamingKthLargest,
    keep_count,
    kth_largest,
    select_sample_size,
    select_small_size,
)
from mergelab.ops.sparsify import BlockTrim, drop, keep_top, keep_top_into, trim, trim_band

TensorOp = Callable[[torch.Tensor], torch.Tensor]


def task_vector(theta: torch.Tensor, theta0: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tau = theta - theta0``, computed in ``dtype`` (float32 by default, whatever the storage dtype)."""
    if theta.shape != theta0.shape:
        raise ValueError(f"shape mismatch: {tuple(theta.shape)} vs base {tuple(theta0.shape)}")
    return theta.to(dtype) - theta0.to(dtype)


def identity(x: torch.Tensor) -> torch.Tensor:
    """The identity operator (the neutral element of :func:`chain`)."""
    return x


def chain(*ops: TensorOp) -> TensorOp:
    """Compose per-vector operators left to right: ``chain(f, g)(tau) == g(f(tau))``."""
    return reduce(lambda f, g: (lambda x: g(f(x))), ops, identity)


__all__ = [
    "BLOCK",
    "BlockBuffers",
    "BlockKthLargest",
    "BlockTrim",
    "block_count",
    "block_ranges",
    "block_size",
    "compute_workers",
    "run_in_chunks",
    "StreamingKthLargest",
    "TensorOp",
    "chain",
    "disjoint_mean",
    "drop",
    "elect_sign",
    "identity",
    "keep_count",
    "keep_top",
    "keep_top_into",
    "kth_largest",
    "model_stock_ratio",
    "scale",
    "select_sample_size",
    "select_small_size",
    "slerp",
    "task_vector",
    "trim",
    "trim_band",
    "weighted_mean",
    "weighted_sum",
]
