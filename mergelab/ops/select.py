"""Exact order statistics of large tensors without sorting them.

Magnitude trimming needs the k-th largest |tau| of a tensor (per-tensor scope) or of a whole model
(global scope). Sorting (mergekit's ``argsort``) costs O(n log n) and ``torch.kthvalue`` is a single-threaded
quickselect; both dominate a TIES merge. :func:`kth_largest` instead uses sample-based selection
(Floyd & Rivest, "Expected time bounds for selection", CACM 1975):

1. draw ``m`` positions uniformly (a fixed-seed generator, so results are deterministic), sort the sample;
2. take a bracket ``[lo, hi]`` of sample values around the target rank, ``c * sqrt(m)`` sample ranks wide;
3. one vectorised pass counts the values above ``hi`` and gathers those inside the bracket (a small set);
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
    below = int(torch.count_nonzero(flat < lo)) if lo != -math.inf else 0
    if lo == hi:  # many tied values (bf16 task vectors): count them instead of collecting them
        if below <= rank < below + int(torch.count_nonzero(flat == lo)):
            return flat.new_tensor(lo)
    inside = flat[(flat >= lo) & (flat <= hi)]
    local = rank - below
    if 0 <= local < inside.numel():
        return torch.kthvalue(inside, local + 1).values
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
        self._lo = -math.inf
        self._hi = math.inf
        self._below = 0
        self._inside: list[torch.Tensor] = []
        self._equal: list[int] = []  # per observed tensor, entries == lo (collapsed bracket)
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
        self._lo, self._hi = lo, hi
        self._below = 0
        self._inside = []
        self._equal = []
        return lo, hi

    @property
    def _collapsed(self) -> bool:
        return self._lo == self._hi

    def observe_exact(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1).to(torch.promote_types(values.dtype, torch.float32))  # float64 stays exact
        if self._lo != -math.inf:
            self._below += int(torch.count_nonzero(flat < self._lo))
        if self._collapsed:
            self._equal.append(int(torch.count_nonzero(flat == self._lo)))
        else:
            self._inside.append(flat[(flat >= self._lo) & (flat <= self._hi)].cpu())

    def result(self) -> float | None:
        local = (self.total - self.k) - self._below
        if self._collapsed:
            if 0 <= local < sum(self._equal):
                self._value = self._lo
                return self._value
            self.attempt += 1
            return None
        inside = torch.cat(self._inside) if self._inside else torch.empty(0)
        if 0 <= local < inside.numel():
            self._value = float(torch.kthvalue(inside, local + 1).values)
            return self._value
        self.attempt += 1
        return None

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
        t = self._value
        if self._collapsed:
            ties = self._equal
            above = self.total - self._below - sum(ties)
        else:
            ties = [int(torch.count_nonzero(x == t)) for x in self._inside]
            above = self.total - self._below - sum(x.numel() for x in self._inside)  # entries > hi
            above += sum(int(torch.count_nonzero(x > t)) for x in self._inside)
        return selection.split_ties(self.k - above, ties)


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
        self._seen = [False] * blocks
        self._below = [0] * blocks
        self._equal = [0] * blocks  # per block: entries == lo (collapsed bracket)
        self._inside: list[torch.Tensor] = [torch.empty(0)] * blocks  # per block: entries in [lo, hi] (otherwise)
        self._value: float | None = None

    def observe(self, index: int, block: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Count (or gather) block ``index`` of the values. Blocks may come in any order and from several
        threads (each writes only its own slots). ``scratch`` (a float buffer of at least the block's size,
        optional) avoids an allocation.

        The counts come from ``s = sgn(block - lo)`` by two float reductions, ``sum(s)`` and ``sum(|s|)``
        (#above - #below and #above + #below), exact for blocks of fewer than 2**24 entries: cheaper than
        two boolean comparisons, which torch does not vectorize well.
        """
        m = block.numel()
        self._seen[index] = True
        if m == 0:
            return
        if self.lo == -math.inf:
            below, equal = 0, 0
        else:
            if m >= 1 << 24:
                raise ValueError(f"blocks must have fewer than 2**24 entries, got {m}")
            s = torch.sub(block, self.lo, out=None if scratch is None else scratch[:m]).sign_()
            balance = int(s.sum())
            nonzero = int(s.abs_().sum())
            below = (nonzero - balance) // 2
            equal = m - nonzero
        self._below[index] = below
        if self.collapsed:
            self._equal[index] = equal
        else:
            self._inside[index] = block[(block >= self.lo) & (block <= self.hi)].cpu()

    def result(self) -> tuple[float, int] | None:
        """``(t, #{entries > t})`` after every block was observed, or ``None`` (rank outside the bracket)."""
        if not all(self._seen):
            raise RuntimeError(f"result() before every block was observed ({self._seen.count(False)} missing)")
        rank = self.total - self.k  # 0-indexed from the bottom
        below = sum(self._below)
        local = rank - below
        if self.collapsed:
            equal = sum(self._equal)
            if not 0 <= local < equal:
                return None
            self._value = self.lo
            return self.lo, self.total - below - equal
        inside = torch.cat(self._inside)
        if not 0 <= local < inside.numel():
            return None
        t = float(torch.kthvalue(inside, local + 1).values)
        self._value = t
        above = self.total - below - inside.numel() + int(torch.count_nonzero(inside > t))
        return t, above

    def tie_counts(self) -> list[int]:
        """Per observed block, how many entries equal the result ``t``."""
        if self._value is None:
            raise RuntimeError("tie_counts() needs a successful result() first")
        if self.collapsed:
            return list(self._equal)
        return [int(torch.count_nonzero(x == self._value)) for x in self._inside]

    def tie_quotas(self, keep_ties: int) -> list[int]:
        """How many entries equal to ``t`` each block keeps, given that ``keep_ties`` are kept in all,
        the first ones in tensor order."""
        return selection.split_ties(keep_ties, self.tie_counts())
