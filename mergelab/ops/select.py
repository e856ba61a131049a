"""Exact order statistics of large tensors without sorting them.

Magnitude trimming needs the k-th largest |tau| of a tensor (per-tensor scope) or of a whole model
(global scope). Sorting (mergekit's ``argsort``) costs O(n log n) and ``torch.kthvalue`` is a single-threaded
quickselect; both dominate a TIES merge. :func:`kth_largest` instead uses sample-based selection
(Floyd & Rivest, "Expected time bounds for selection", CACM 1975):

1. draw ``m`` positions uniformly (a fixed-seed generator, so results are deterministic), sort the sample;
2. take a bracket ``[lo, hi]`` of sample values around the target rank, ``c * sqrt(m)`` sample ranks wide;
3. one vectorised pass counts the values below ``lo`` and gathers those inside the bracket (a small set),
   or counts those equal to ``lo`` when the bracket collapsed (:class:`mergelab.ops.selection.BlockCounts`,
   shared with the numpy back-end);
4. if the target rank falls inside the bracket, select it exactly from the gathered values; otherwise
   (probability ~1e-6 for c = 5) fall back to ``torch.kthvalue`` on the whole tensor.

The answer is always exact; only the running time is random. :class:`StreamingKthLargest` applies the same
idea across many tensors (a whole model) in two streaming passes without concatenating them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from mergelab.ops import selection
from mergelab.ops.selection import keep_count  # noqa: F401  (re-exported through mergelab.ops)



class TorchArrays:
    """The work on one block of values of exact selection (:class:`mergelab.ops.selection.BlockArrays`),
    with torch (any device; gathered values on the CPU)."""

    def count(self, block: torch.Tensor, lo: float, hi: float, collapsed: bool,
              scratch: torch.Tensor | None) -> tuple[int, object]:
        """Below ``lo`` (and equal to it) from ``s = sgn(block - lo)`` by two float reductions, ``sum(s)``
        and ``sum(|s|)`` (#above - #below and #above + #below), exact for blocks of fewer than 2**24
        entries: cheaper than two boolean comparisons, which torch does not vectorize well. Without a
        ``scratch`` float buffer (whole tensors streamed, one-off calls), or for larger blocks: the
        comparisons, whose temporaries are bytes."""
        m = block.numel()
        if m == 0 or lo == -math.inf:
            below, equal = 0, 0
        elif scratch is not None and m < 1 << 24:
            sgn = torch.sub(block, lo, out=None if scratch is None else scratch[:m]).sign_()
            balance = int(sgn.sum())
            nonzero = int(sgn.abs_().sum())
            below, equal = (nonzero - balance) // 2, m - nonzero
        else:
            below = int(torch.count_nonzero(block < lo))
            equal = int(torch.count_nonzero(block == lo)) if collapsed else 0
        if collapsed:
            return below, equal
        return below, block[(block >= lo) & (block <= hi)].cpu()

    def select(self, parts: Sequence[torch.Tensor], local: int) -> tuple[float, int, int]:
        inside = torch.cat(list(parts)) if parts else torch.empty(0)
        t = float(torch.kthvalue(inside, local + 1).values)
        return t, inside.numel(), int(torch.count_nonzero(inside > t))

    def count_equal(self, values: torch.Tensor, t: float) -> int:
        return int(torch.count_nonzero(values == t))

    def size(self, values: torch.Tensor) -> int:
        return values.numel()


#: The torch side of exact selection's block counts (:class:`mergelab.ops.selection.BlockCounts`).
TORCH_ARRAYS = TorchArrays()


def select_sample_size() -> int:
    """Sample size of the sample-based selection (positions drawn with replacement)."""
    return selection.SAMPLE  # read at call time, so tests can change it


def select_small_size() -> int:
    """Tensors up to this many entries are selected with ``torch.kthvalue`` directly."""
    return selection.SMALL


def _bracket(sample_sorted: torch.Tensor, rank_frac: float) -> tuple[float, float]:
    return selection.bracket_values(sample_sorted, rank_frac, selection.WIDTH)


def kth_largest(values: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """The exact k-th largest entry of ``values`` (1 <= k <= numel), as a 0-d tensor of its dtype."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= selection.SMALL:
        return torch.kthvalue(flat, n - k + 1).values
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (selection.SAMPLE,), generator=gen).to(flat.device)
    sample = torch.sort(flat[idx]).values.cpu()
    # rank counted from the bottom, 0-indexed: the k-th largest is the (n-k)-th smallest
    rank = n - k
    lo, hi = _bracket(sample, rank / n)
    counts = selection.BlockCounts(n, lo, hi, 1, TORCH_ARRAYS)  # the whole tensor as one block
    counts.observe(0, flat)
    found = counts.result(k)
    if found is not None:
        return flat.new_tensor(found[0])
    return torch.kthvalue(flat, rank + 1).values


class StreamingKthLargest:
    """Exact k-th largest value over a stream of tensors, in two passes, without concatenation.

    Pass 1 (:meth:`observe_sample`): each tensor contributes a uniform sample proportional to its size.
    :meth:`bracket` turns the pooled sample into a value bracket around the target rank.
    Pass 2 (:meth:`observe_exact`): each tensor contributes the count of entries below the bracket and the
    entries inside it. :meth:`result` selects exactly, or reports failure (``None``) so the caller can rerun
    pass 2 with a wider bracket (it never returns a wrong value).

    Memory: the pooled sample (about ``2**16`` floats) plus the entries inside the bracket (a small
    fraction of the model, proportional to the bracket width). A collapsed bracket (``lo == hi``, as the
    magnitudes of bf16 task vectors give: few distinct values, many tied) is counted per tensor instead:
    gathering its entries kept every tied entry of the model in float32 (the benchmark's whole-model TIES
    at density 0.5 peaked at 8.3 GB).
    """

    def __init__(self, total: int, k: int, *, sample_size: int = 1 << 16, seed: int = 0) -> None:
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
        self.total = total
        self.k = k
        self.sample_size = sample_size
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        # the pooled sample lives in one buffer allocated up front: a small tensor kept per observed tensor,
        # allocated between the caller's large temporaries, pinned the heap and grew it by a temporary's
        # size per tensor (the benchmark's whole-model TIES: RSS 7.6 GB, against 1.6 GB of working set)
        self._pool = torch.empty(sample_size + 4096)
        self._pooled = 0
        self._samples: list[torch.Tensor] = []  # overflow beyond the buffer (one entry per tiny tensor)
        self._counts = selection.BlockCounts(total, -math.inf, math.inf, None, TORCH_ARRAYS)
        self._above = 0
        self.attempt = 0  # misses so far: each widens the next bracket

    def observe_sample(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1)
        if flat.numel() == 0:
            return
        m = max(1, round(self.sample_size * flat.numel() / self.total))
        idx = torch.randint(0, flat.numel(), (m,), generator=self._gen).to(flat.device)
        values = flat[idx].float().cpu()
        if self._pooled + m <= self._pool.numel():
            self._pool[self._pooled : self._pooled + m].copy_(values)
            self._pooled += m
        else:
            self._samples.append(values)

    def bracket(self) -> tuple[float, float]:
        """The value bracket of the next exact pass: around the target rank in the pooled sample, as wide
        as :func:`mergelab.ops.selection.retry_width` allows for this attempt (wider after each miss)."""
        sample = torch.sort(torch.cat([self._pool[: self._pooled], *self._samples])).values
        rank_frac = (self.total - self.k) / self.total
        lo, hi = selection.bracket_values(sample, rank_frac, selection.retry_width(self.attempt))
        self._counts = selection.BlockCounts(self.total, lo, hi, None, TORCH_ARRAYS)  # one part per tensor
        return lo, hi

    def observe_exact(self, values: torch.Tensor) -> None:
        self._counts.observe(None, values.reshape(-1).to(torch.promote_types(values.dtype, torch.float32)))

    def result(self) -> float | None:
        found = self._counts.result(self.k)
        if found is None:
            self.attempt += 1
            return None
        self._value, self._above = found
        return self._value

    def select_in_memory(self, items: Sequence[torch.Tensor]) -> float:
        """Pass 2 over ``items`` (the sampled tensors, in memory), repeated with a wider bracket until
        :meth:`result` succeeds; returns it."""
        while True:
            self.bracket()
            for t in items:
                self.observe_exact(t)
            value = self.result()
            if value is not None:
                return value

    def tie_quotas(self) -> list[int]:
        """After a successful :meth:`result` t: how many entries equal to t each observed tensor keeps.

        Exactly k entries are kept overall: all entries > t, plus the first ``k - #{> t}`` entries equal to
        t in stream order (tensor by tensor, as passed to :meth:`observe_exact`), so ties are broken by
        position and the kept count is exactly k even when many values tie (bf16 task vectors).
        """
        return selection.split_ties(self.k - self._above, self._counts.tie_counts())


def kth_largest_of_stream(tensors: Iterable[torch.Tensor], total: int, k: int) -> float:
    """Convenience for in-memory iterables (tests): exact k-th largest over all entries of all tensors."""
    items = list(tensors)
    sel = StreamingKthLargest(total, k)
    for t in items:
        sel.observe_sample(t)
    return sel.select_in_memory(items)


class BlockKthLargest:
    """Exact k-th largest entry of a tensor that is only ever seen block by block (never stored whole).

    The per-tensor trim threshold of TIES needs the k-th largest ``|tau|`` of a tensor; materialising
    ``|tau|`` in float32 cost 4 bytes per entry (262 MB for a 65M-entry embedding) and several passes over
    main memory. Instead, the caller hands a uniform ``sample`` of the values (``|tau|`` at random positions,
    computed from the inputs directly) and then every block of values once (:meth:`observe`, any order):

    - the sample gives a bracket ``[lo, hi]`` around the target rank (as in :func:`kth_largest`);
    - each block adds its count of values below ``lo``; a collapsed bracket (``lo == hi``, as bf16 task
      vectors give: their magnitudes take few distinct values) also counts the values equal to ``lo``,
      per block; otherwise the values inside the bracket are gathered (a small fraction of the tensor);
    - :meth:`result` returns the exact k-th largest ``t`` and the number of entries strictly above it, or
      ``None`` when the target rank fell outside the bracket (probability ~1e-6; the caller then uses
      :func:`kth_largest` on the whole tensor).

    After a result, :meth:`tie_quotas` splits the ``k - #{> t}`` entries equal to ``t`` that a top-k keeps
    among the blocks in order (first come, first kept), so a block-wise trim keeps exactly the entries a
    whole-tensor :func:`mergelab.ops.keep_top` keeps.
    """

    def __init__(self, total: int, k: int, sample: torch.Tensor, blocks: int) -> None:
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
        self.total = total
        self.k = k
        sorted_sample = torch.sort(sample.reshape(-1).float().cpu()).values
        self.lo, self.hi = _bracket(sorted_sample, (total - k) / total)
        self.collapsed = self.lo == self.hi
        self._counts = selection.BlockCounts(total, self.lo, self.hi, blocks, TORCH_ARRAYS)

    def observe(self, index: int, block: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Count (or gather) block ``index`` of the values (:meth:`TorchArrays.count`). Blocks may come in
        any order and from several threads (each writes only its own slots). ``scratch`` (a float buffer of
        at least the block's size, optional) avoids an allocation."""
        self._counts.observe(index, block, scratch)

    def result(self) -> tuple[float, int] | None:
        """``(t, #{entries > t})`` after every block was observed, or ``None`` (rank outside the bracket)."""
        return self._counts.result(self.k)

    def tie_counts(self) -> list[int]:
        """Per observed block, how many entries equal the result ``t``."""
        return self._counts.tie_counts()

    def tie_quotas(self, keep_ties: int) -> list[int]:
        """How many entries equal to ``t`` each block keeps, given that ``keep_ties`` are kept in all,
        the first ones in tensor order."""
        return selection.split_ties(keep_ties, self.tie_counts())
