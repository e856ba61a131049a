"""Data augmentation with plain torch ops (no torchvision): a small random affine warp per image.

Each image gets an independent rotation ``r ~ U(-max_rotate, max_rotate)`` degrees, isotropic scale
``s ~ U(1 - max_scale, 1 + max_scale)`` and translation ``(dx, dy) ~ U(-max_shift, max_shift)`` pixels,
applied with ``affine_grid`` + bilinear ``grid_sample`` (border padding, so any background level is kept).
Defaults: 10 degrees, 10 % scale, 2 pixels. The random draws come from a CPU generator seeded by
``(seed, step)``, so augmentation is reproducible and a resumed run sees identical augmented batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergelab.training.sampler import derive_seed

_STREAM = 1  # RNG stream id for augmentation (data order uses 0)


def random_affine(
    x: torch.Tensor,
    seed: int,
    step: int,
    max_rotate: float = 10.0,
    max_scale: float = 0.1,
    max_shift: float = 2.0,
) -> torch.Tensor:
    """Augmented copy of the image batch ``x`` ``[B, C, H, W]`` (see the module docstring)."""
    b, _, h, w = x.shape
    g = torch.Generator().manual_seed(derive_seed(seed, _STREAM, step))
    u = torch.rand(b, 4, generator=g) * 2 - 1
    angle = u[:, 0] * math.radians(max_rotate)
    scale = 1 + u[:, 1] * max_scale
    tx, ty = u[:, 2] * max_shift * 2 / w, u[:, 3] * max_shift * 2 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
