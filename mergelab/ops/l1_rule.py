"""L1 norms of whole tensors by blocks, and mergekit's L1 rescaling factor, for every back-end.

mergekit's ``rescale: true`` (``mergekit.sparsify.rescaled_masked_tensor`` with ``RescaleNorm.l1``) scales a
sparsified task vector ``m * tau`` by ``||tau||_1 / ||m * tau||_1``, so its L1 norm is the task vector's
again, and leaves it unscaled when either norm is below ``1e-7`` (:func:`l1_factor`: the one rule of the
factor, used by DARE, DELLA, TIES's trim and breadcrumbs' band in the references and every kernel).

**The L1 block rule** (TIES's trim and breadcrumbs' band; DARE and DELLA keep torch's whole-tensor float32
sums, which their kernels reproduce from tensor-sized buffers): ``||x||_1`` is the sum, in float64 and in
block order, of each block's L1 norm, the blocks being consecutive ranges of 2^18 entries
(:data:`mergelab.ops.blocks.BLOCK`, the block kernels' blocks) of the flattened tensor; a block's norm is the
float64 sum (numpy's pairwise summation) of the sums of ``|x_j|`` over its consecutive chunks of ``CHUNK``
entries, each in the compute dtype (float32, float64 for float64 inputs; numpy's pairwise summation), the short
chunk added last: :func:`block_l1`, the only code that computes one, called by the torch reference on
``.numpy()`` views and by the torch and numpy kernels on their blocks, so all of them get the same bits.
Measured on blocks of 2^18 standard normal float32 values: within 1.7e-8 (relative) of the exact sum (torch's
float32 sum of 2^20 such values: 1.0e-7); the factor is then rounded to the compute
dtype by the multiply, as mergekit's float32 factor is. The result depends on the values and on numpy, not on
any thread count.

Torch-free: the numpy back-end uses it without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Entries per chunk of a block's L1 norm (:func:`block_l1`; the Gram rule's chunk).
CHUNK = 8192

#: mergekit's tolerance: no rescaling when either L1 norm is below it (``rescaled_masked_tensor``'s ``eps``).
L1_EPS = 1e-7


def block_l1(x: Any) -> float:
    """``sum_j |x_j|`` of a contiguous 1-D float array (a block of a flattened tensor), by the L1 block rule
    (module docstring): per chunk of ``CHUNK`` entries a sum in ``x``'s dtype, the chunk sums added in float64."""
    magnitude = np.abs(x)
    n = magnitude.shape[0]
    full = n - n % CHUNK
    total = 0.0
    if full:
        parts = np.add.reduce(magnitude[:full].reshape(-1, CHUNK), axis=1)
        total = float(np.add.reduce(parts, dtype=np.float64))
    if full < n:
        total += float(np.add.reduce(magnitude[full:]))
    return total


def l1_from_partials(partials: Sequence[float]) -> float:
    """``||x||_1`` from its blocks' :func:`block_l1` values, summed in float64 in block order."""
    total = 0.0
    for v in partials:
        total += v
    return total


def l1_factor(before: float, after: float) -> float | None:
    """mergekit's L1 rescaling factor ``||tau||_1 / ||m * tau||_1`` (``before`` / ``after``), or None (leave
    ``m * tau`` as it is) when either norm is below :data:`L1_EPS` (``rescaled_masked_tensor``). A non-finite
    norm gives a non-finite factor, so a NaN or Inf in ``tau`` reaches the output, as in mergekit."""
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after
