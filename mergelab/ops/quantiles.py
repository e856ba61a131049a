"""Exact order statistics at several ranks of one tensor in one pass over its blocks (Arcee Fusion's quartiles).

Arcee Fusion's threshold needs three exact order statistics of its importance (q1, median and q3 at the
ranks of :func:`mergelab.ops.quantile_ranks`). Three single-rank selections (:class:`mergelab.ops.BlockKthLargest`)
cost three passes of counts and gathers per block, and on bf16 models most of it went into gathering the
entries tied at a bracket's lower end: the importance is exactly 0 wherever the model equals the base
(16 % of the benchmark's entries), and the median lies among them (106M of the 672M entries were gathered).

Here, for each wanted rank ``r`` (0-based from the smallest; the k-th largest of n values is ``r = n - k``), a
sorted uniform sample gives a value bracket ``[lo, hi]`` around it (:func:`mergelab.ops.selection.bracket_values`),
and each block j of the values adds, in one visit for all the ranks,

    below_j = #{x < lo},   equal_j = #{x == lo},   inside_j = {x : lo < x <= hi}   (the values, gathered).

With ``B``, ``E`` and ``I`` their totals and ``local = r - B``: the r-th smallest value is ``lo`` when
``0 <= local < E``, else the ``(local - E)``-th smallest of ``I`` when ``local - E < |I|``, else it lies
outside the bracket (probability about 1e-6 per rank) and the caller falls back on the whole tensor. Where
the sample shows no run of values equal to ``lo``, they are gathered with the inside instead (``equal_j = 0``,
``inside_j = {x : lo <= x <= hi}``: the same rule, one comparison fewer). Exact whatever the sample; only
the running time depends on it. The counts are numpy comparisons on the block's
memory (vectorised, one byte a flag: about 0.1 ns an entry, against about 1 ns for torch's boolean
comparisons on the CPU), so blocks on other devices are copied to the CPU first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mergelab.ops import selection

#: Largest sample :func:`quantile_sample_size` draws.
MAX_SAMPLE = 1 << 18


def quantile_sample_size(n: int) -> int:
    """Sample size for the brackets of ``n`` values: ``n^(2/3)`` between ``selection.SAMPLE`` and
    :data:`MAX_SAMPLE`. A bracket gathers about ``2 WIDTH sqrt(p (1 - p) / m)`` of the values (m the
    sample size), so the cost ``c_1 m + c_2 n / sqrt(m)`` of drawing and sorting the sample plus gathering
    is least near ``m ~ n^(2/3)``: 1.1 % of a 65M-entry tensor gathered per quartile instead of 3.4 %."""
    return max(selection.SAMPLE, min(MAX_SAMPLE, int(round(n ** (2.0 / 3.0)))))


def _numpy(block: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(block, np.ndarray):
        return block.reshape(-1)
    if block.dtype == torch.bfloat16:  # no numpy bfloat16 here; float32 holds every value exactly
        block = block.float()
    return block.detach().reshape(-1).cpu().numpy()


class BlockRanks:
    """The exact ``r``-th smallest values of ``n`` values for several ranks ``rs`` (0-based), from their
    blocks observed once each (:meth:`observe`, any order, any thread: each writes its own slots), against
    brackets from a uniform ``sample`` of the values (see the module docstring for the rule). Finite values:
    a NaN would count as below every bracket."""

    def __init__(self, n: int, rs: Sequence[int], sample: torch.Tensor | np.ndarray, blocks: int) -> None:
        if any(not 0 <= r < n for r in rs):
            raise ValueError(f"ranks must be in [0, {n}), got {list(rs)}")
        self.n, self.rs = n, list(rs)
        ordered = np.sort(_numpy(sample))
        self.brackets = [selection.bracket_values(ordered, r / n) for r in self.rs]
        # count the entries equal to lo apart only where the sample shows a run of them (exact zeros): else
        # they are gathered with the inside (equal stays 0), one comparison fewer per entry
        self.tied = [lo != -math.inf and int(np.count_nonzero(ordered == lo)) > 1 for lo, _ in self.brackets]
        self.below = [[0] * blocks for _ in self.rs]
        self.equal = [[0] * blocks for _ in self.rs]
        self.inside: list[list[Any]] = [[None] * blocks for _ in self.rs]
        self.seen = [False] * blocks
        self._values: list[float | None] | None = None

    def observe(self, j: int, block: torch.Tensor | np.ndarray) -> None:
        """Count block ``j`` against every bracket ``[lo, hi]``: the entries below ``lo``, those equal to it
        (where the sample showed ties at ``lo``; else they are gathered with the inside), and gather the rest
        up to ``hi``."""
        x = _numpy(block)
        m = x.size
        flags, more = np.empty(x.shape, dtype=bool), np.empty(x.shape, dtype=bool)
        for i, (lo, hi) in enumerate(self.brackets):
            below = equal = 0
            if lo == -math.inf:
                flags.fill(True)
            elif self.tied[i] and lo == hi:  # collapsed on a run: (lo, hi] is empty, nothing to gather
                equal = int(np.count_nonzero(np.equal(x, x.dtype.type(lo), out=flags)))
                below = int(np.count_nonzero(np.less(x, x.dtype.type(lo), out=flags)))
                self.below[i][j], self.equal[i][j], self.inside[i][j] = below, equal, x[:0].copy()
                continue
            elif self.tied[i]:
                equal = int(np.count_nonzero(np.equal(x, x.dtype.type(lo), out=flags)))
                below = m - equal - int(np.count_nonzero(np.greater(x, x.dtype.type(lo), out=flags)))
            else:
                below = m - int(np.count_nonzero(np.greater_equal(x, x.dtype.type(lo), out=flags)))
            if hi != math.inf:
                np.logical_and(flags, np.less_equal(x, x.dtype.type(hi), out=more), out=flags)
            self.below[i][j], self.equal[i][j], self.inside[i][j] = below, equal, np.compress(flags, x)
        self.seen[j] = True

    def result(self) -> list[float | None]:
        """Per rank, its exact value, or None when it lies outside its bracket (then select on the whole)."""
        if self._values is not None:
            return self._values
        if not all(self.seen):
            raise RuntimeError(f"result before every block was observed ({self.seen.count(False)} missing)")
        values: list[float | None] = []
        for i, r in enumerate(self.rs):
            local = r - sum(self.below[i])
            equal = sum(self.equal[i])
            if 0 <= local < equal:
                values.append(self.brackets[i][0])
                continue
            local -= equal
            inside = np.concatenate(self.inside[i])
            values.append(float(np.partition(inside, local)[local]) if 0 <= local < inside.size else None)
        self._values = values
        return values

    def split(self, i: int) -> tuple[int, list[int]]:
        """For rank ``rs[i]`` after a successful :meth:`result`: how many values lie below its value ``v``,
        and per block how many equal ``v`` (``v`` is ``lo``, counted apart, or lies among the gathered)."""
        v = self.result()[i]
        if v is None:
            raise RuntimeError(f"rank {self.rs[i]} lies outside its bracket: no split")
        below = sum(self.below[i])
        if self.tied[i] and v == self.brackets[i][0]:
            return below, list(self.equal[i])
        below += sum(self.equal[i]) + sum(int(np.count_nonzero(x < v)) for x in self.inside[i])
        return below, [int(np.count_nonzero(x == v)) for x in self.inside[i]]


def kth_largest_many(values: torch.Tensor, ks: Sequence[int], *, seed: int = 0) -> list[float]:
    """The exact k-th largest entry of ``values`` for each k of ``ks`` (1 <= k <= numel): the values
    :func:`mergelab.ops.kth_largest` returns one at a time, from one pass of :class:`BlockRanks` over blocks
    of :func:`mergelab.ops.block_size` entries (a sample of :func:`quantile_sample_size` positions from a
    generator seeded ``seed``; a rank outside its bracket, and tensors of at most ``selection.SMALL``
    entries, by :func:`mergelab.ops.kth_largest`)."""
    from mergelab.ops.blocks import block_ranges, block_size
    from mergelab.ops.select import kth_largest

    flat = values.reshape(-1)
    n = flat.numel()
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"k must be in [1, {n}], got {list(ks)}")
    if n <= selection.SMALL:
        return [float(kth_largest(flat, k)) for k in ks]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (quantile_sample_size(n),), generator=gen).to(flat.device)
    ranges = list(block_ranges(n, block_size()))
    ranks = BlockRanks(n, [n - k for k in ks], flat[idx], len(ranges))
    for j, (start, end) in enumerate(ranges):
        ranks.observe(j, flat[start:end])
    return [float(kth_largest(flat, k)) if v is None else v for v, k in zip(ranks.result(), ks)]
