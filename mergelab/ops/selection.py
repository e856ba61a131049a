"""The rules of exact selection, array-agnostic and without torch: one copy for every back-end.

Magnitude trimming keeps the ``k`` largest ``|tau|`` (:func:`keep_count`); the threshold, the k-th largest
value, is found by sample-based selection (Floyd & Rivest, "Expected time bounds for selection", CACM
1975): a sorted uniform sample of ``m`` values gives a bracket of sample ranks around the target rank
(:func:`bracket_ranks`), one pass counts the values below the bracket and collects those inside, and the
answer is selected exactly among those. A bracket that missed the rank is widened by :func:`retry_width`
(the one retry policy), and the entries tied at the threshold are kept first come, first kept in flat
(or model) order, split over blocks or tensors by :func:`split_ties` (the one tie cut-off rule).

The counting itself is array-agnostic too: :class:`BlockCounts` keeps, per block (of a tensor, or per
tensor of a model), the values below the bracket and those equal to its bound (a collapsed bracket) or
inside it, and :func:`select_counted` selects the exact answer over any number of them. Only the work on
one block of values is the array library's (:class:`BlockArrays`: count, gather, select, compare), each
written the fastest way for that library: :data:`mergelab.ops.select.TORCH_ARRAYS` for the torch operators
and back-end (:mod:`mergelab.ops.select`), :data:`mergelab.merging.numpy_kernels.NUMPY_ARRAYS` for the
numpy back-end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

#: Sample size of the per-tensor selection (positions drawn uniformly with replacement).
SAMPLE = 1 << 14
#: Bracket half-width in standard deviations of a sample rank: the target falls outside with
#: probability about 1e-6, and the selection then falls back to the whole tensor.
WIDTH = 5.0
#: Tensors up to this many entries are selected directly (a partition of the whole tensor is fastest).
SMALL = 1 << 16


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept at ``density``: ``floor(density * numel)``, at least 1 when ``numel > 0``.

    ``floor`` matches mergekit's ``int(density * numel)``; the minimum of one avoids an all-zero task
    vector at tiny densities on tiny tensors.
    """
    if numel == 0:
        return 0
    return max(1, min(numel, int(math.floor(density * numel))))


def bracket_ranks(m: int, rank_frac: float, width: float = WIDTH) -> tuple[int, int]:
    """Sample ranks ``(lo_i, hi_i)`` bracketing the quantile ``rank_frac`` in a sorted sample of ``m``:
    ``rank_frac * m`` plus or minus ``width`` standard deviations of a sample rank (and one). An index
    below 0 means "no lower bound" (-inf), one at or past ``m`` "no upper bound" (+inf)."""
    centre = rank_frac * m
    half = width * math.sqrt(max(rank_frac * (1.0 - rank_frac), 1.0 / m) * m) + 1.0
    return int(math.floor(centre - half)), int(math.ceil(centre + half))


def retry_width(attempt: int) -> float:
    """The bracket half-width (in standard deviations of a sample rank) of selection attempt ``attempt``
    (0 the first): ``WIDTH``, then 8x wider per miss, and after three misses everything (``inf``), so a
    whole-model selection passes over the model at most five times. The answer is exact whatever the width;
    only the running time depends on it."""
    if attempt == 0:
        return WIDTH
    return max(WIDTH, 1.0) * 8.0**attempt if attempt < 3 else math.inf


def split_ties(keep: int, tied: Sequence[int]) -> list[int]:
    """How many of the entries tied at the threshold each part keeps, when ``keep`` of them are kept in all
    and ``tied[j]`` lie in part j (blocks of a tensor, tensors of a model), first come first kept: so a
    top-k over parts keeps exactly the entries a top-k over their concatenation keeps."""
    quotas = []
    remaining = keep
    for count in tied:
        take = max(0, min(remaining, count))
        quotas.append(take)
        remaining -= take
    return quotas


def bracket_values(sorted_sample: list[float] | object, rank_frac: float, width: float = WIDTH) -> tuple[float, float]:
    """The value bracket ``[lo, hi]`` of :func:`bracket_ranks` read from a sorted sample (anything
    indexable with ``len``; ``float()`` of its items), with -inf / +inf where a bound falls outside."""
    m = len(sorted_sample)  # type: ignore[arg-type]
    if width == math.inf:
        return -math.inf, math.inf
    lo_i, hi_i = bracket_ranks(m, rank_frac, width)
    lo = -math.inf if lo_i < 0 else float(sorted_sample[lo_i])  # type: ignore[index]
    hi = math.inf if hi_i >= m else float(sorted_sample[hi_i])  # type: ignore[index]
    return lo, hi


class BlockArrays(Protocol):
    """The work on one block of values that exact selection leaves to an array library."""

    def count(self, block: Any, lo: float, hi: float, collapsed: bool, scratch: Any) -> tuple[int, Any]:
        """``(#{x < lo}, rest)`` for a block (0 below when ``lo`` is -inf): ``rest`` is ``#{x == lo}`` when
        the bracket is ``collapsed`` (``lo == hi``), else the values in ``[lo, hi]`` (an array, a copy).
        ``scratch``: a buffer of the block's size or None (the library's choice of dtype)."""
        ...

    def select(self, parts: Sequence[Any], local: int) -> tuple[float, int, int]:
        """``(t, size, greater)``: the ``local``-th smallest value (0-based) of the concatenated ``parts``,
        their total size, and how many of them exceed t."""
        ...

    def count_equal(self, values: Any, t: float) -> int:
        """``#{x == t}`` in an array of values gathered by :meth:`count`."""
        ...

    def size(self, values: Any) -> int:
        """The number of values gathered by :meth:`count`."""
        ...


class BlockCounts:
    """The counts of one tensor's values against a value bracket ``[lo, hi]``, block by block: per block,
    the values below ``lo`` and either those equal to ``lo`` (a collapsed bracket, as bf16 task vectors
    give: their magnitudes take few values) or the values inside the bracket (a few percent of the tensor).
    Blocks may be counted in any order, from any thread (each writes its own slots); ``blocks=None`` counts
    a stream of parts (say the tensors of a model) in the order they come. One tensor's selection
    (:meth:`result`) or several tensors' (:func:`select_counted`) is then exact."""

    def __init__(self, n: int, lo: float, hi: float, blocks: int | None, arrays: BlockArrays) -> None:
        self.n, self.lo, self.hi, self.arrays = n, lo, hi, arrays
        self.collapsed = lo == hi
        self.seen = [False] * (blocks or 0)
        self.below = [0] * (blocks or 0)
        self.equal = [0] * (blocks or 0)  # collapsed bracket: per block, entries == lo
        self.inside: list[Any] = [None] * (blocks or 0)  # otherwise: per block, the values in [lo, hi]
        self.value: float | None = None  # the selected value, once known
        self._ties: list[int] | None = None  # per-block tie counts, once settled

    def observe(self, j: int | None, block: Any, scratch: Any = None) -> None:
        """Count block ``j`` (None: the next part of a stream)."""
        below, rest = self.arrays.count(block, self.lo, self.hi, self.collapsed, scratch)
        if j is None:
            j = len(self.seen)
            self.seen.append(False)
            self.below.append(0)
            self.equal.append(0)
            self.inside.append(None)
        self.below[j] = below
        if self.collapsed:
            self.equal[j] = rest
        else:
            self.inside[j] = rest
        self.seen[j] = True

    def result(self, k: int) -> tuple[float, int] | None:
        """``(t, #{> t})`` for the k-th largest value of this tensor, or None when it lies outside the bracket."""
        return select_counted([self], k)

    def tie_counts(self) -> list[int]:
        """Per block, the entries equal to the selected value."""
        if self._ties is not None:
            return self._ties
        if self.value is None:
            raise RuntimeError("tie_counts() needs a successful result() first")
        if self.collapsed:
            return list(self.equal)
        return [self.arrays.count_equal(x, self.value) for x in self.inside]

    def ties(self) -> int:
        """Entries equal to the selected value."""
        return sum(self.tie_counts())

    def settle(self) -> None:
        """Keep only the per-block tie counts (free the values gathered inside the bracket)."""
        self._ties = self.tie_counts()
        self.inside = []


def select_counted(counts: Sequence[BlockCounts], k: int) -> tuple[float, int] | None:
    """``(t, #{> t})`` for the exact k-th largest value over every tensor counted by ``counts`` (all against
    the same bracket, every block observed), or None when it lies outside the bracket (retry with a wider
    one: :func:`retry_width`); sets each one's ``value`` to ``t``."""
    for c in counts:
        if not all(c.seen):
            raise RuntimeError(f"result before every block was observed ({c.seen.count(False)} missing)")
    total = sum(c.n for c in counts)
    below = sum(sum(c.below) for c in counts)
    local = (total - k) - below
    first = counts[0]
    if first.collapsed:
        equal = sum(sum(c.equal) for c in counts)
        if not 0 <= local < equal:
            return None
        t, above = first.lo, total - below - equal
    else:
        parts = [x for c in counts for x in c.inside]
        size = sum(first.arrays.size(x) for x in parts)
        if not 0 <= local < size:
            return None
        t, size, greater = first.arrays.select(parts, local)
        above = total - below - size + greater
    for c in counts:
        c.value = t
    return t, above
