"""The rules of exact selection, array-agnostic and without torch: one copy for every back-end.

Magnitude trimming keeps the ``k`` largest ``|tau|`` (:func:`keep_count`); the threshold, the k-th largest
value, is found by sample-based selection (Floyd & Rivest, "Expected time bounds for selection", CACM
1975): a sorted uniform sample of ``m`` values gives a bracket of sample ranks around the target rank
(:func:`bracket_ranks`), one pass counts the values below the bracket and collects those inside, and the
answer is selected exactly among those. A bracket that missed the rank is widened by :func:`retry_width`
(the one retry policy), and the entries tied at the threshold are kept first come, first kept in flat
(or model) order, split over blocks or tensors by :func:`split_ties` (the one tie cut-off rule). Used by
the torch operators (:mod:`mergelab.ops.select`) and the numpy back-end
(:mod:`mergelab.merging.numpy_kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
