"""Exact order statistics at several ranks in one pass over blocks (mergelab.ops.quantiles): each value against
the sorted values, on hand-built ties, a miss of the bracket, and the sizes of what is gathered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab import ops
from mergelab.ops import blocks as blocks_mod
from mergelab.ops import selection
from mergelab.ops.quantiles import BlockRanks, kth_largest_many, quantile_sample_size


def _observe_all(ranks: BlockRanks, values: torch.Tensor, block: int) -> None:
    for j, start in enumerate(range(0, values.numel(), block)):
        ranks.observe(j, values[start:start + block])


def test_ranks_among_a_tied_run_come_from_the_equal_count_not_a_gather() -> None:
    """600 zeros between 200 negatives and 200 positives (1000 values, blocks of 64): ranks 200..799 are 0,
    counted as equal to the bracket's lower end; the rank below and above the run are -1 and +1."""
    values = torch.cat([-torch.ones(200), torch.zeros(600), torch.ones(200)])[torch.randperm(1000)]
    sample = torch.cat([-torch.ones(20), torch.zeros(60), torch.ones(20)])
    ranks = BlockRanks(1000, [199, 200, 500, 799, 800], sample, -(-1000 // 64))
    _observe_all(ranks, values, 64)
    assert ranks.result() == [-1.0, 0.0, 0.0, 0.0, 1.0]
    median = ranks.brackets[2]
    assert median[0] == 0.0  # lo sits on the run
    assert sum(ranks.equal[2]) == 600 and sum(x.size for x in ranks.inside[2]) <= 200


def test_ranks_equal_the_sorted_values_with_negatives_ties_and_signed_zeros() -> None:
    """Normal values with 30 % exact zeros (half of them -0.0) and 10 % tied at 0.5, several blocks and a
    sample from the values: every quartile and a few extreme ranks equal ``sorted(values)[r]``."""
    g = torch.Generator().manual_seed(3)
    n = 50_000
    values = torch.randn(n, generator=g)
    u = torch.rand(n, generator=g)
    values[u < 0.15] = 0.0
    values[(u >= 0.15) & (u < 0.3)] = -0.0
    values[(u >= 0.3) & (u < 0.4)] = 0.5
    ordered = torch.sort(values).values
    rs = [0, 1, n // 4, n // 2, 3 * n // 4, n - 2, n - 1]
    sample = values[torch.randint(0, n, (4096,), generator=g)]
    ranks = BlockRanks(n, rs, sample, -(-n // 1000))
    _observe_all(ranks, values, 1000)
    assert ranks.result() == [float(ordered[r]) for r in rs]


def test_a_rank_outside_its_bracket_is_reported_and_kth_largest_many_falls_back(monkeypatch) -> None:
    """A sample from a different range puts every bracket off the values: the ranks are None (never a wrong
    value), and :func:`kth_largest_many` then answers with the whole-tensor selection."""
    values = torch.arange(1000, dtype=torch.float32)
    ranks = BlockRanks(1000, [500, 900], torch.arange(5000, 6000, dtype=torch.float32), 1)
    ranks.observe(0, values)
    assert ranks.result() == [None, None]
    monkeypatch.setattr(selection, "SMALL", 50)
    monkeypatch.setattr(blocks_mod, "BLOCK", 128)
    monkeypatch.setattr("mergelab.ops.quantiles.BlockRanks.result", lambda self: [None] * len(self.rs))
    assert kth_largest_many(values[torch.randperm(1000)], [1, 250, 1000]) == [999.0, 750.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_largest_many_equals_kth_largest_at_the_quartile_ranks(monkeypatch, dtype) -> None:
    """The reference's quartiles (Arcee Fusion's ranks) from one pass over blocks equal the one-rank
    selections :func:`mergelab.ops.kth_largest`, on values with a mass of exact zeros (blocks of 97)."""
    monkeypatch.setattr(selection, "SMALL", 50)
    monkeypatch.setattr(blocks_mod, "BLOCK", 97)
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(3000, generator=g) * (torch.rand(3000, generator=g) > 0.4)).to(dtype)
    ks = ops.quantile_ranks(values.numel())
    assert kth_largest_many(values, ks) == [float(ops.kth_largest(values, k)) for k in ks]
    ordered = np.sort(values.float().numpy())
    assert kth_largest_many(values, [1, 3000]) == [float(ordered[-1]), float(ordered[0])]


def test_sample_size_grows_as_n_to_the_two_thirds_within_bounds() -> None:
    assert quantile_sample_size(1000) == selection.SAMPLE
    assert quantile_sample_size(8_000_000) == 40_000  # (8e6)^(2/3)
    assert quantile_sample_size(10**12) == 1 << 18


def test_bad_ranks_are_rejected() -> None:
    with pytest.raises(ValueError):
        BlockRanks(10, [10], torch.zeros(4), 1)
    with pytest.raises(ValueError):
        kth_largest_many(torch.zeros(10), [0])
    ranks = BlockRanks(10, [3], torch.zeros(4), 2)
    ranks.observe(0, torch.zeros(5))
    with pytest.raises(RuntimeError):
        ranks.result()


def test_split_counts_below_and_ties_per_block_for_the_rank_value() -> None:
    """Values 0 x 6, 1 x 4, 2 x 3, 5 (blocks of 4): the ranks 3, 7 and 13 are 0, 1 and 5; below them 0, 6
    and 13 values, and their ties per block (0s: 4 2 0 0, 1s: 0 2 2 0, the 5: 0 0 0 1), whether the value
    was counted apart (a run at lo in the sample) or gathered."""
    values = torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 5])
    for sample in (values, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0])):
        ranks = BlockRanks(14, [3, 7, 13], sample, 4)
        _observe_all(ranks, values, 4)
        assert ranks.result() == [0.0, 1.0, 5.0]
        assert ranks.split(0) == (0, [4, 2, 0, 0])
        assert ranks.split(1) == (6, [0, 2, 2, 0])
        assert ranks.split(2) == (13, [0, 0, 0, 1])
    # a collapsed bracket on a run (lo = hi = 0, counted apart): rank 300 of 600 zeros then 400 ones
    values = torch.cat([torch.zeros(600), torch.ones(400)])
    ranks = BlockRanks(1000, [300], torch.cat([torch.zeros(60), torch.ones(40)]), 4)
    _observe_all(ranks, values, 256)
    assert ranks.tied == [True] and ranks.result() == [0.0]
    assert ranks.split(0) == (0, [256, 256, 88, 0])
