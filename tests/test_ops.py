"""Tests for mergelab.ops against closed-form references: exact selection, sparsifiers, consensus, geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelab import ops
from mergelab.ops.select import StreamingKthLargest, keep_count, kth_largest, kth_largest_of_stream


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_kth(x: torch.Tensor, k: int) -> float:
    """k-th largest by a full descending sort (the obvious, slow reference)."""
    return float(torch.sort(x.reshape(-1), descending=True).values[k - 1])


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097, 65536, 65537, 70001, 300_000])
def test_kth_largest_matches_sort_on_random_sizes(n: int) -> None:
    g = _gen(n)
    x = torch.randn(n, generator=g)
    s = torch.sort(x, descending=True).values
    ks = {1, n, max(1, n // 2), max(1, n // 5), max(1, n - 3), min(n, 3), max(1, int(0.999 * n))}
    for k in sorted(ks):
        got = kth_largest(x, k)
        assert got.dtype == x.dtype and got.dim() == 0
        assert float(got) == float(s[k - 1]), (n, k)
    k = max(1, n // 5)
    assert float(kth_largest(x, k)) == float(torch.topk(x, k).values[-1])


@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_sampling_path_many_ranks(seed: int) -> None:
    # > 65536 entries: the sample-and-bracket path runs; several seeds of the selector, several ranks
    n = 100_000 + 1234 * seed
    x = torch.randn(n, generator=_gen(100 + seed)) * 3 - 1  # mostly negative and positive values
    s = torch.sort(x, descending=True).values
    for k in (1, 2, 17, n // 10, n // 3, n // 2, n - 100, n - 1, n):
        assert float(kth_largest(x, k, seed=seed)) == float(s[k - 1]), k


def test_kth_largest_with_many_ties_and_negative_values() -> None:
    # 200k entries drawn from 7 values, all non-positive except one: ranks land inside long runs of ties
    g = _gen(5)
    x = torch.randint(-6, 1, (200_000,), generator=g).float()
    x[123] = 2.5
    s = torch.sort(x, descending=True).values
    for k in (1, 2, 3, 1000, 28_000, 28_600, 100_000, 199_999, 200_000):
        assert float(kth_largest(x, k)) == float(s[k - 1]), k
    # all equal
    c = torch.full((70_000,), -0.25)
    assert float(kth_largest(c, 1)) == -0.25 and float(kth_largest(c, 70_000)) == -0.25


def test_kth_largest_multidimensional_and_float64() -> None:
    x = torch.randn(300, 301, generator=_gen(9), dtype=torch.float64)
    s = torch.sort(x.reshape(-1), descending=True).values
    for k in (1, 5000, 90_300):
        got = kth_largest(x, k)
        assert got.dtype == torch.float64
        assert float(got) == float(s[k - 1])


@pytest.mark.parametrize("k", [0, -1, 11])
def test_kth_largest_rejects_out_of_range_k(k: int) -> None:
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest(torch.zeros(10), k)


@pytest.mark.parametrize(
    "sizes", [[5], [3, 1, 4], [70_000, 10, 50_000], [1, 1, 1, 1], [0, 200_000, 0, 17], [65_536, 65_537]]
)
def test_streaming_kth_equals_concatenated(sizes: list[int]) -> None:
    g = _gen(sum(sizes))
    tensors = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(sizes)]
    cat = torch.cat(tensors)
    n = cat.numel()
    s = torch.sort(cat, descending=True).values
    for k in sorted({1, n, max(1, n // 2), max(1, n // 7), max(1, n - 1)}):
        assert kth_largest_of_stream(tensors, n, k) == float(s[k - 1]), (sizes, k)


def test_streaming_kth_by_hand_passes_with_retry_loop() -> None:
    # drive the two-pass protocol by hand, as the engine does, on a tensor with long runs of ties
    tensors = [torch.tensor([3.0, 3.0, 1.0]), torch.tensor([3.0, 2.0]), torch.tensor([0.5] * 4)]
    total, k = 9, 4  # sorted descending: 3 3 3 2 1 .5 .5 .5 .5
    sel = StreamingKthLargest(total, k)
    for t in tensors:
        sel.observe_sample(t)
    value = None
    for _ in range(10):
        sel.bracket()
        for t in tensors:
            sel.observe_exact(t)
        value = sel.result()
        if value is not None:
            break
    assert value == 2.0


def test_streaming_kth_is_exact_for_float64() -> None:
    # the k-th largest of float64 values must come back exactly, not rounded to float32: the engine uses
    # it as a '>=' threshold, and a threshold rounded up drops the k-th entry
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    for k in range(1, 6):
        v = kth_largest_of_stream([x], 5, k)
        assert v == _ref_kth(x, k), k
        assert int((ops.trim(x, 0.5, threshold=v) != 0).sum()) == k


def test_streaming_kth_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        StreamingKthLargest(10, 0)
    with pytest.raises(ValueError):
        StreamingKthLargest(10, 11)


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [(10, 0.2, 2), (10, 0.25, 2), (10, 0.29, 2), (10, 1.0, 10), (3, 0.01, 1), (0, 0.5, 0), (7, 0.5, 3),
     (1000, 0.001, 1), (1000, 0.0015, 1), (1, 1e-9, 1)],
)
def test_keep_count_is_floor_with_minimum_one(numel: int, density: float, expected: int) -> None:
    assert keep_count(numel, density) == expected


# ---------------------------------------------------------------------------------------------- trim


def test_trim_hand_computed() -> None:
    tau = torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05])
    out = ops.trim(tau, 0.4)  # k = floor(0.4 * 5) = 2: keep the two largest magnitudes, -0.5 and 0.3
    assert torch.equal(out, torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0]))
    assert torch.equal(tau, torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05]))  # input untouched
    # density 0.6 -> k = 3 -> adds -0.2; density 0.1 -> k = max(1, 0) = 1 -> only -0.5
    assert torch.equal(ops.trim(tau, 0.6), torch.tensor([0.0, -0.5, 0.3, -0.2, 0.0]))
    assert torch.equal(ops.trim(tau, 0.1), torch.tensor([0.0, -0.5, 0.0, 0.0, 0.0]))


def test_trim_keeps_exactly_k_breaking_ties_by_position() -> None:
    tau = torch.tensor([[1.0, -2.0], [2.0, 0.5]])
    # k = 1: the threshold is 2; of the two entries tied at 2, the first in flat order is kept
    assert torch.equal(ops.trim(tau, 0.25), torch.tensor([[0.0, -2.0], [0.0, 0.0]]))
    # k = 2: both tied entries
    assert torch.equal(ops.trim(tau, 0.5), torch.tensor([[0.0, -2.0], [2.0, 0.0]]))


def test_trim_exact_density_on_bf16_task_vectors() -> None:
    # bf16 task vectors tie massively; "keep |tau| >= t" kept 65% of entries at density 0.5 on a bf16 model
    gen = torch.Generator().manual_seed(0)
    tau = (0.01 * torch.randn(200_000, generator=gen)).to(torch.bfloat16).float()
    for density in (0.2, 0.5, 0.9):
        kept = int(torch.count_nonzero(ops.trim(tau, density)))
        assert kept == ops.keep_count(tau.numel(), density)


def test_trim_given_threshold_with_tie_quota() -> None:
    tau = torch.tensor([3.0, -1.0, 1.0, 0.5, -1.0])
    assert torch.equal(ops.trim(tau, 0.5, threshold=1.0, ties=1), torch.tensor([3.0, -1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(ops.trim(tau, 0.5, threshold=1.0, ties=0), torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(ops.trim(tau, 0.5, threshold=1.0), torch.tensor([3.0, -1.0, 1.0, 0.0, -1.0]))


@pytest.mark.parametrize("quantum", [None, 2.0**-8])  # 2**-8: a handful of magnitudes, the bracket collapses
def test_streaming_tie_quotas_keep_exactly_k_over_tensors(quantum) -> None:
    gen = torch.Generator().manual_seed(1)
    parts = [(0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16).float().abs() for n in (70_000, 5, 90_000)]
    if quantum is not None:
        parts = [torch.round(p / quantum) * quantum for p in parts]
    total = sum(p.numel() for p in parts)
    k = total // 2  # quantized: the median falls inside one level, held by 23% of the entries
    sel = ops.StreamingKthLargest(total, k)
    for p in parts:
        sel.observe_sample(p)
    t = sel.select_in_memory(parts)
    quotas = sel.tie_quotas()
    kept = sum(int(torch.count_nonzero(ops.trim(p, 0.5, threshold=t, ties=q))) for p, q in zip(parts, quotas))
    assert kept == k
    assert t == float(torch.cat(parts).topk(k).values[-1])
    if quantum is not None:  # counted, not gathered: nothing of the model is held
        assert sel._counts.collapsed and all(x is None for x in sel._counts.inside)


def test_trim_with_given_threshold() -> None:
    tau = torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05])
    # the threshold overrides the density-derived one (global scope); the density only has to be valid
    assert torch.equal(ops.trim(tau, 0.2, threshold=0.2), torch.tensor([0.0, -0.5, 0.3, -0.2, 0.0]))
    assert torch.equal(ops.trim(tau, 0.2, threshold=0.05), tau)
    assert torch.equal(ops.trim(tau, 0.2, threshold=10.0), torch.zeros(5))


def test_trim_density_one_is_identity_copy() -> None:
    tau = torch.randn(33, generator=_gen(1))
    out = ops.trim(tau, 1.0)
    assert torch.equal(out, tau) and out.data_ptr() != tau.data_ptr()


def test_trim_large_tensor_keeps_exactly_k() -> None:
    tau = torch.randn(100_003, generator=_gen(2))
    out = ops.trim(tau, 0.2)
    k = keep_count(tau.numel(), 0.2)
    assert int((out != 0).sum()) == k
    kept = tau.abs() >= torch.topk(tau.abs(), k).values[-1]
    assert torch.equal(out, tau * kept)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_trim_rejects_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        ops.trim(torch.ones(4), density)


# ----------------------------------------------------------------------------------------- trim_band


def test_trim_band_hand_computed() -> None:
    # magnitudes descending: 10 (idx 3), 9, 8, 7, 6, 5, 4, 3, 2, 1 (idx 0)
    tau = torch.tensor([1.0, -2.0, 3.0, -10.0, 9.0, 4.0, -5.0, 6.0, -7.0, 8.0])
    # gamma 0.1 -> n_top = 1 removes |10|; density 0.5 -> n_keep = 5 keeps magnitudes 9, 8, 7, 6, 5
    out = ops.trim_band(tau, 0.5, 0.1)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 0.0, -5.0, 6.0, -7.0, 8.0]))
    # gamma 0.2 -> removes 10, 9; density 0.3 -> keeps 8, 7, 6
    out = ops.trim_band(tau, 0.3, 0.2)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, -7.0, 8.0]))
    # gamma 0 -> plain top-k trim
    assert torch.equal(ops.trim_band(tau, 0.3, 0.0), ops.trim(tau, 0.3))
    # n_top + n_keep > n: n_top is reduced to n - n_keep = 1 (density 0.9, gamma 0.5)
    out = ops.trim_band(tau, 0.9, 0.5)
    assert torch.equal(out, tau.masked_fill(tau.abs() == 10, 0))


def test_trim_band_density_one_and_bad_arguments() -> None:
    tau = torch.randn(20, generator=_gen(3))
    assert torch.equal(ops.trim_band(tau, 1.0, 0.3), tau)
    with pytest.raises(ValueError, match="gamma"):
        ops.trim_band(tau, 0.5, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        ops.trim_band(tau, 0.5, -0.1)
    with pytest.raises(ValueError, match="density"):
        ops.trim_band(tau, 0.0, 0.1)


# ---------------------------------------------------------------------------------------------- drop


def test_drop_density_one_is_identity() -> None:
    tau = torch.randn(50, generator=_gen(4))
    for rescale in ("inverse", "l1", "none"):
        out = ops.drop(tau, 1.0, rescale=rescale, generator=_gen(0))
        assert torch.equal(out, tau) and out.data_ptr() != tau.data_ptr()


def test_drop_mask_reproducible_with_seeded_generator() -> None:
    tau = torch.randn(1000, generator=_gen(5))
    a = ops.drop(tau, 0.3, generator=_gen(42))
    b = ops.drop(tau, 0.3, generator=_gen(42))
    c = ops.drop(tau, 0.3, generator=_gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)
    # the mask is Bernoulli(density) per entry: torch.rand(shape) < density with that generator
    expected_mask = torch.rand(tau.shape, generator=_gen(42)) < 0.3
    assert torch.equal(a != 0, expected_mask)


def test_drop_inverse_rescale_exact_on_kept_entries() -> None:
    tau = torch.randn(2000, generator=_gen(6)) + 0.01  # no exact zeros
    density = 0.3
    out = ops.drop(tau, density, rescale="inverse", generator=_gen(1))
    kept = out != 0
    assert 0.25 < kept.float().mean() < 0.35  # ~ Binomial(2000, 0.3) / 2000, 5 sigma = 0.05
    assert torch.equal(out[kept], tau[kept] / density)
    none = ops.drop(tau, density, rescale="none", generator=_gen(1))
    assert torch.equal(none[kept], tau[kept]) and torch.equal(none != 0, kept)


def test_drop_l1_rescale_preserves_l1_norm() -> None:
    tau = torch.randn(3000, generator=_gen(7), dtype=torch.float64)
    out = ops.drop(tau, 0.2, rescale="l1", generator=_gen(2))
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-12)
    kept = out != 0
    ratio = out[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one common factor on every kept entry


def test_trim_and_band_rescale_l1_closed_form() -> None:
    """mergekit's ``rescale: true`` on hand-built tensors: tau = (4, -3, 2, 1) at density 0.5 keeps (4, -3),
    scaled by ||tau||_1 / ||kept||_1 = 10/7; breadcrumbs with gamma 0.25 removes the outlier 4 and keeps
    (-3, 2) (5 of 10): times 2. Products in float32 (the factor rounded to float32 by the multiply)."""
    tau = torch.tensor([4.0, -3.0, 2.0, 1.0])
    f = np.float32(10.0 / 7.0)
    assert ops.trim(tau, 0.5, rescale="l1").tolist() == [np.float32(4.0) * f, np.float32(-3.0) * f, 0.0, 0.0]
    assert ops.trim(tau, 0.5).tolist() == [4.0, -3.0, 0.0, 0.0]  # default none: unchanged
    assert ops.trim(tau, 0.5, rescale="none").tolist() == [4.0, -3.0, 0.0, 0.0]
    assert ops.trim_band(tau, 0.5, 0.25, rescale="l1").tolist() == [0.0, -6.0, 4.0, 0.0]
    assert ops.trim_band(tau, 0.5, 0.25).tolist() == [0.0, -3.0, 2.0, 0.0]
    # at a given (whole-model) threshold the norms are still this tensor's: t = 2 keeps (4, -3, 2): 10/9
    g = np.float32(10.0 / 9.0)
    assert ops.trim(tau, 0.5, threshold=2.0, rescale="l1").tolist() == [np.float32(v) * g for v in (4, -3, 2)] + [0.0]
    # density 1: nothing removed, nothing rescaled (a copy)
    assert ops.trim(tau, 1.0, rescale="l1").tolist() == tau.tolist()
    assert ops.trim_band(tau, 1.0, 0.1, rescale="l1").tolist() == tau.tolist()


def test_rescale_l1_tolerance_is_mergekits() -> None:
    """Either norm below 1e-7 leaves the trimmed vector unscaled (mergekit's ``eps``); above it, scaled."""
    assert ops.l1_factor(1e-8, 1e-8) is None and ops.l1_factor(1.0, 5e-8) is None
    assert ops.l1_factor(10.0, 7.0) == 10.0 / 7.0
    tiny = torch.tensor([3e-8, -2e-8, 1e-8, 1e-8])  # ||tau||_1 = 7e-8
    assert torch.equal(ops.trim(tiny, 0.5, rescale="l1"), ops.trim(tiny, 0.5))
    assert torch.equal(ops.trim(torch.zeros(4), 0.5, rescale="l1"), torch.zeros(4))


def test_l1_block_rule() -> None:
    """The L1 block rule: chunk sums in the array's dtype, added in float64, blocks in order: within float32
    rounding of the exact sum, across chunk and block boundaries, and the same whatever the thread count (it is
    numpy's, on fixed blocks)."""
    from mergelab.ops import l1_rule

    x = torch.randn(3 * l1_rule.CHUNK + 123, generator=_gen(3))
    exact = float(x.double().abs().sum())
    assert ops.block_l1(x.numpy()) == pytest.approx(exact, rel=1e-6)
    assert ops.l1_norm(x) == pytest.approx(exact, rel=1e-6)
    assert ops.l1_norm(x.reshape(3, -1)[:, :100]) == pytest.approx(float(x.reshape(3, -1)[:, :100].double().abs().sum()))
    # one value per chunk: exact in any order
    ones = torch.zeros(2 * l1_rule.CHUNK + 5)
    ones[:: l1_rule.CHUNK] = -1.5
    assert ops.block_l1(ones.numpy()) == 4.5 and ops.l1_norm(ones) == 4.5
    x64 = torch.randn(1000, generator=_gen(4), dtype=torch.float64)
    assert ops.l1_norm(x64) == pytest.approx(float(x64.abs().sum()), rel=1e-14)


@pytest.mark.parametrize("bad", ["l2", "inverse", True])
def test_trim_rescale_rejects_other_values(bad) -> None:
    with pytest.raises(ValueError, match="rescale must be 'none' or 'l1', got"):
        ops.trim(torch.ones(4), 0.5, rescale=bad)
    with pytest.raises(ValueError, match="rescale must be 'none' or 'l1', got"):
        ops.trim_band(torch.ones(4), 0.5, 0.1, rescale=bad)


def test_drop_expected_value_is_tau() -> None:
    # E[m tau / d] = tau. Per entry, drop(tau)_j is tau_j/d w.p. d, else 0: variance tau_j^2 (1-d)/d.
    # The mean over S = 4000 seeds has standard deviation |tau_j| sqrt((1-d)/(d S)) = 0.0158 |tau_j| at
    # d = 0.5; a tolerance of 6 standard deviations (0.095 |tau_j|) fails by chance with probability
    # ~2e-9 per entry (and the seeds are fixed, so the test is deterministic anyway).
    tau = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25, 0.0], dtype=torch.float64)
    d, S = 0.5, 4000
    acc = torch.zeros_like(tau)
    for seed in range(S):
        acc += ops.drop(tau, d, generator=_gen(seed))
    mean = acc / S
    tol = 6 * tau.abs() * math.sqrt((1 - d) / (d * S))
    assert torch.all((mean - tau).abs() <= tol), (mean, tau)
    assert mean[-1] == 0  # a zero entry stays zero


def test_drop_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="density"):
        ops.drop(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="rescale"):
        ops.drop(torch.ones(3), 0.5, rescale="l2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- consensus


def test_elect_sign_exact_tie_drop_or_positive() -> None:
    """An exact zero sign sum (either signed zero) elects 0 (``drop``, default) or +1 (``positive``, mergekit's
    ``sum >= 0``); -1 and +1 are the same under both."""
    taus = [torch.tensor([1.0, 2.0, -0.0, 0.5, -1.0]), torch.tensor([-1.0, -2.0, -0.0, 0.25, -3.0])]
    for by in ("mass", "count"):
        assert ops.elect_sign(taus, by=by).tolist() == [0.0, 0.0, 0.0, 1.0, -1.0], by
        assert ops.elect_sign(taus, by=by, zero="positive").tolist() == [1.0, 1.0, 1.0, 1.0, -1.0], by
    with pytest.raises(ValueError, match="zero sign"):
        ops.elect_sign(taus, zero="negative")  # type: ignore[arg-type]


def test_elect_sign_mass_vs_count_differ() -> None:
    # entry 0: +5 vs -1, -1 -> mass +, count -; entry 1: all agree +; entry 2: +1 vs -1 (exact tie) -> 0
    taus = [torch.tensor([5.0, 1.0, 1.0]), torch.tensor([-1.0, 2.0, -1.0]), torch.tensor([-1.0, 3.0, 0.0])]
    assert torch.equal(ops.elect_sign(taus, by="mass"), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(ops.elect_sign(taus, by="count"), torch.tensor([-1.0, 1.0, 0.0]))
    # weights enter the mass rule: w = (0.1, 1, 1) -> 0.5 - 1 - 1 < 0
    assert float(ops.elect_sign(taus, [0.1, 1.0, 1.0], by="mass")[0]) == -1.0
    with pytest.raises(ValueError, match="sign election"):
        ops.elect_sign(taus, by="median")  # type: ignore[arg-type]
    # inputs are not modified
    assert torch.equal(taus[0], torch.tensor([5.0, 1.0, 1.0]))


def test_disjoint_mean_count_vs_weight_divisor() -> None:
    taus = [torch.tensor([2.0, 1.0, -1.0, 0.0]), torch.tensor([4.0, -3.0, 1.0, 0.0]),
            torch.tensor([-1.0, 2.0, 0.0, 0.0])]
    w = [1.0, 3.0, 2.0]
    sign = torch.tensor([1.0, 1.0, 0.0, 1.0])
    # entry 0: agreeing {0, 1}: count (1*2 + 3*4)/2 = 7;   weight (2 + 12)/(1 + 3) = 3.5
    # entry 1: agreeing {0, 2}: count (1*1 + 2*2)/2 = 2.5; weight (1 + 4)/(1 + 2) = 5/3
    # entry 2: elected sign 0 -> nobody agrees -> 0;       entry 3: all zero -> 0
    count = ops.disjoint_mean(taus, sign, w, divisor="count")
    weight = ops.disjoint_mean(taus, sign, w, divisor="weight")
    assert torch.allclose(count, torch.tensor([7.0, 2.5, 0.0, 0.0]))
    assert torch.allclose(weight, torch.tensor([3.5, 5.0 / 3.0, 0.0, 0.0]))
    # with unit weights the two coincide
    assert torch.equal(ops.disjoint_mean(taus, sign, divisor="count"), ops.disjoint_mean(taus, sign, divisor="weight"))
    with pytest.raises(ValueError, match="divisor"):
        ops.disjoint_mean(taus, sign, divisor="sum")  # type: ignore[arg-type]


def test_disjoint_mean_entry_without_agreeing_model_is_zero() -> None:
    taus = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, -3.0])]
    sign = torch.tensor([-1.0, 1.0])  # nobody agrees anywhere
    out = ops.disjoint_mean(taus, sign)
    assert torch.equal(out, torch.zeros(2)) and torch.all(torch.isfinite(out))


def test_weighted_sum_and_mean() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0])
    assert torch.equal(ops.weighted_sum([a, b], [2.0, 0.5]), torch.tensor([3.5, 2.0]))
    assert torch.allclose(ops.weighted_mean([a, b], [1.0, 3.0]), torch.tensor([2.5, -2.5]))
    assert torch.equal(a, torch.tensor([1.0, 2.0]))  # not modified in place
    with pytest.raises(ValueError, match="zero"):
        ops.weighted_mean([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        ops.weighted_sum([a, b], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        ops.weighted_sum([], [])
    assert torch.equal(ops.scale(a, -2.0), torch.tensor([-2.0, -4.0]))


# ----------------------------------------------------------------------------------------- geometry


def test_slerp_endpoints() -> None:
    a = torch.randn(4, 5, generator=_gen(8))
    b = torch.randn(4, 5, generator=_gen(9))
    assert torch.allclose(ops.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(ops.slerp(a, b, 1.0), b, atol=1e-6)


def test_slerp_orthogonal_unit_vectors_midpoint() -> None:
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    mid = ops.slerp(a, b, 0.5)
    assert torch.allclose(mid, (a + b) / math.sqrt(2), atol=1e-12)
    # t = 1/3 of a right angle: (cos 30deg, sin 30deg)
    third = ops.slerp(a, b, 1 / 3)
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0],
                                              dtype=torch.float64), atol=1e-12)
    # unnormalised inputs keep their scale along the arc: 2a, 2b -> 2 (a+b)/sqrt 2
    assert torch.allclose(ops.slerp(2 * a, 2 * b, 0.5), 2 * (a + b) / math.sqrt(2), atol=1e-12)


def test_slerp_parallel_and_zero_vectors_fall_back_to_lerp() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(ops.slerp(a, 3 * a, 0.25), 1.5 * a)
    assert torch.allclose(ops.slerp(a, -a, 0.25), 0.5 * a)  # anti-parallel: also lerp
    z = torch.zeros(3)
    assert torch.equal(ops.slerp(z, a, 0.5), 0.5 * a)
    with pytest.raises(ValueError, match="shape"):
        ops.slerp(a, torch.ones(4), 0.5)


@pytest.mark.parametrize("degrees", [30.0, 60.0, 85.0])
def test_model_stock_ratio_two_models_closed_form(degrees: float) -> None:
    c = math.cos(math.radians(degrees))
    s = math.sin(math.radians(degrees))
    # two task vectors at the constructed angle, with different lengths (the ratio depends only on cos)
    u = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    v = 0.5 * torch.tensor([c, s, 0.0], dtype=torch.float64)
    assert ops.model_stock_ratio([u, v]) == pytest.approx(2 * c / (1 + c), rel=1e-12)


def test_model_stock_ratio_n_models_and_edge_cases() -> None:
    # three mutually orthogonal vectors: cos = 0 -> t = 0; three equal vectors: cos = 1 -> t = 1
    e = torch.eye(3, dtype=torch.float64)
    assert ops.model_stock_ratio(list(e)) == pytest.approx(0.0, abs=1e-15)
    assert ops.model_stock_ratio([e[0], e[0], e[0]]) == pytest.approx(1.0)
    # N = 3, pairwise cos 0.5 (equilateral directions in 3D): t = 3*.5 / (1 + 2*.5) = 0.75
    x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    assert ops.model_stock_ratio(list(x)) == pytest.approx(0.75, rel=1e-12)
    assert ops.model_stock_ratio([e[0], torch.zeros(3, dtype=torch.float64)]) == 1.0
    assert ops.model_stock_ratio([e[0], -e[0]]) == 0.0  # pointing apart: stay at the base
    with pytest.raises(ValueError, match="two"):
        ops.model_stock_ratio([e[0]])


def test_chain_composes_left_to_right_and_task_vector() -> None:
    def add_one(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    x = torch.tensor([1.0, -3.0])
    assert torch.equal(ops.chain(add_one, double)(x), torch.tensor([4.0, -4.0]))  # (x + 1) * 2
    assert torch.equal(ops.chain(double, add_one)(x), torch.tensor([3.0, -5.0]))  # 2x + 1
    assert torch.equal(ops.chain()(x), x)
    # a TIES-style chain: trim then scale
    tau = torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05])
    f = ops.chain(lambda t: ops.trim(t, 0.4), lambda t: ops.scale(t, 2.0))
    assert torch.equal(f(tau), torch.tensor([0.0, -1.0, 0.6, 0.0, 0.0]))
    theta0 = torch.tensor([1, 2], dtype=torch.bfloat16)
    tv = ops.task_vector(torch.tensor([1.5, 1.0], dtype=torch.bfloat16), theta0)
    assert tv.dtype == torch.float32 and torch.equal(tv, torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        ops.task_vector(torch.ones(2), torch.ones(3))


@pytest.mark.parametrize("degrees", [90.0, 120.0, 150.0, 179.0])
def test_model_stock_ratio_is_zero_when_task_vectors_point_apart(degrees: float) -> None:
    # t = N cos / (1 + (N-1) cos) would extrapolate away from the experts (t = -12.9 at 150 degrees)
    a = math.radians(degrees)
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)
    assert ops.model_stock_ratio([u, v]) == pytest.approx(0.0, abs=1e-12)


def test_streaming_selection_sample_overflowing_its_buffer_is_still_exact() -> None:
    """The pooled sample lives in a buffer of sample_size + 4096 values; tensors beyond it still count."""
    gen = torch.Generator().manual_seed(4)
    parts = [torch.rand(3, generator=gen) for _ in range(3000)]  # one sample per tensor at least: 3000 > 8 + ...
    total, k = 9000, 1234
    sel = ops.StreamingKthLargest(total, k, sample_size=8)
    sel._pool = sel._pool[:100]  # a small buffer, so most samples overflow into the list
    for p in parts:
        sel.observe_sample(p)
    assert sel._pooled == 100 and len(sel._samples) == 2900
    t = sel.select_in_memory(parts)
    assert t == float(torch.cat(parts).topk(k).values[-1])


def test_slerp_and_model_stock_take_their_reductions_from_the_block_gram() -> None:
    """SLERP's angle and model stock's cosines come from float32 dot products of fixed blocks summed in float64
    (ops.gram): on 8 blocks of two float32 vectors at a constructed angle of 0.01 rad (u all ones, v
    alternating +-1, exactly orthogonal: every product the same size, the worst case for a float32 sum), cos is
    within 1e-6 of the exact one (float32 dots of 8192-entry chunks summed in float64: 3.5e-7 here; one BLAS
    sdot over the block 3.5e-5, torch's float32 dot 1.3e-5) and so are the coefficients and model stock's ratio."""
    n = 8 * ops.block_size()
    phi = 0.01
    u = torch.ones(n)
    v = torch.ones(n)
    v[1::2] = -1.0
    b = (math.cos(phi) * u.double() + math.sin(phi) * v.double()).float()
    g = ops.gram([u.double(), b.double()])  # float64 dots: exact for these values up to float64 rounding
    exact_cos = g[0][1] / math.sqrt(g[0][0] * g[1][1])
    assert exact_cos == pytest.approx(math.cos(phi), abs=1e-7)
    got = ops.slerp_coefficients(u, b, 0.5)
    assert got == pytest.approx(ops.slerp_coefficients_from_gram(g, 0.5), rel=1e-6)
    blocked = ops.gram([u, b])
    assert blocked[0][1] / math.sqrt(blocked[0][0] * blocked[1][1]) == pytest.approx(exact_cos, abs=1e-6)
    assert got == ops.slerp_coefficients_from_gram(blocked, 0.5)
    # model stock: two task vectors at angle phi, ratio 2 cos / (1 + cos)
    c = math.cos(phi)
    assert ops.model_stock_ratio([u, b]) == pytest.approx(2 * c / (1 + c), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keep_top_into_by_hand_with_and_without_the_tie_count(dtype) -> None:
    """|x| = 3 2 1 2 2 0 2 at threshold 2: above it only the 3; the first `ties` of the four 2s in flat
    order join it, all of them when ties >= 4 or ties is None; the count of ties given or not, the same mask
    and the same number of ties used (numpy's comparisons for float32/64 on the CPU, torch's for bf16)."""
    x = torch.tensor([3.0, 2, 1, 2, 2, 0, 2], dtype=dtype)
    expect = {0: [0], 1: [0, 1], 3: [0, 1, 3, 4], 4: [0, 1, 3, 4, 6], 9: [0, 1, 3, 4, 6], None: [0, 1, 3, 4, 6]}
    for ties, kept in expect.items():
        for tied in (None, 4):
            out = torch.empty(7, dtype=torch.bool)
            used = ops.keep_top_into(x, 2.0, ties, out, tied)
            assert torch.nonzero(out).squeeze(1).tolist() == kept, (ties, tied)
            assert used == (0 if ties is None else min(ties, 4)), (ties, tied)


def test_apply_mask_and_remove_into_by_hand() -> None:
    """tau * keep keeps a dropped entry's sign as a zero (-3 -> -0.0); keep &= ~removed."""
    tau = torch.tensor([1.5, -3.0, 2.0, -0.0])
    keep = torch.tensor([True, False, True, True])
    ops.remove_into(keep, torch.tensor([False, False, True, False]))
    assert keep.tolist() == [True, False, False, True]
    out = ops.apply_mask_(tau, keep)
    assert out is tau and tau.tolist() == [1.5, -0.0, 0.0, -0.0]
    assert [math.copysign(1.0, v) for v in tau.tolist()] == [1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_elect_sign_positive_zero_rule_in_every_dtype(dtype) -> None:
    """zero='positive' turns both signed zeros into +1 and leaves -1 and +1 (numpy's comparison and add on
    the CPU for float32/64, torch's for bf16): bit for bit torch's ``sign + (sign == 0)``, a NaN sum too."""
    taus = [torch.tensor([0.0, -0.0, -2.0, 3.0, float("nan")], dtype=dtype)]
    out = ops.elect_sign(taus, zero="positive")
    assert out.dtype == dtype and out[:4].tolist() == [1.0, 1.0, -1.0, 1.0]
    sign = ops.elect_sign(taus)
    expect = sign + (sign == 0)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(out.view(bits), expect.to(dtype).view(bits))


def test_block_dot_is_chunked_float32_dots_summed_in_float64() -> None:
    """ops.block_dot: float32 dot products of 8192-entry chunks (the last one shorter), summed in float64 in
    order: exact on integer-valued vectors whose chunk sums fit float32's 24 bits, whatever the length, and
    equal to the float64 dot of such vectors; a block's Gram partials are these dots pair by pair."""
    from mergelab.ops import gram_matrix

    for n in (1, 100, gram_matrix.CHUNK, 3 * gram_matrix.CHUNK + 17):
        x = np.arange(n, dtype=np.float32) % 7 - 3
        y = np.arange(n, dtype=np.float32) % 5 - 2
        assert ops.block_dot(x, y) == float(np.dot(x.astype(np.float64), y.astype(np.float64)))
        assert ops.gram_partials([x, y]) == [ops.block_dot(x, x), ops.block_dot(x, y), ops.block_dot(y, y)]
        assert ops.squared_norm_partials([x, y]) == [ops.block_dot(x, x), ops.block_dot(y, y)]


@pytest.mark.parametrize("k,n", [(4, 1 << 18), (4, (1 << 18) + 8191), (3, 60 * 8192 - 1), (6, 20 * 8192), (2, 1 << 18)])
def test_gram_partials_of_rows_is_the_pairwise_rule_bit_for_bit(k: int, n: int) -> None:
    """ops.gram_partials of a 2-D array (rows = the vectors' blocks, as the numpy kernels hold them): when
    the chunks of all pairs number more than 500 it takes every chunk dot in one np.vecdot call (so numpy
    drops the GIL); the partials are the pairwise block_dot's bit for bit, in float32 and float64, on
    random and on nearly parallel rows (2 x 32 chunks stays on the pairwise path)."""
    from mergelab.ops import gram_matrix

    rng = np.random.default_rng(k * 1000 + n % 997)
    for dtype in (np.float32, np.float64):
        rows = rng.standard_normal((k, n)).astype(dtype)
        rows[1:, : n // 2] = rows[0, : n // 2] * dtype(1.0001)
        expect = [gram_matrix.block_dot(rows[i].copy(), rows[j].copy()) for i in range(k) for j in range(i, k)]
        assert ops.gram_partials(rows) == expect
        assert ops.gram_partials(list(rows)) == expect
