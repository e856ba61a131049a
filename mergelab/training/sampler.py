"""Deterministic mini-batch sampling as a function of (seed, step).

The training stream is the concatenation of per-epoch permutations of ``range(n)``; epoch ``e`` uses the
permutation drawn from a generator seeded with ``SeedSequence([seed, e])``. Batch ``t`` of size ``B`` is
positions ``t B .. (t + 1) B - 1`` of that stream (sampling without replacement; a batch may straddle two
epochs). Because batch ``t`` depends only on ``(seed, B, t)``, a run resumed at any step draws the same
batches as an uninterrupted one, and a branch with a new seed gets a fresh data order from its branch point.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (NumPy ``SeedSequence``), for independent RNG streams."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class BatchSampler:
    """Index batches for ``n`` samples: ``sampler.indices(step)`` -> LongTensor of length ``batch_size``."""

    _STREAM = 0  # RNG stream id for data order

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("cannot sample batches from an empty training set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, self._STREAM, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of batch ``step``."""
        start = step * self.batch_size
        out = []
        pos = start
        while pos < start + self.batch_size:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.batch_size - pos)
            out.append(self._perm(epoch)[offset : offset + take])
            pos += take
        return torch.cat(out)
