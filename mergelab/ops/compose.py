"""Task vectors and the composition of per-vector operators."""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch

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
