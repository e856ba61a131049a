"""The effective-noise study's statistics and measurements, by construction: the two-stage bootstrap of the
median gain on fixed gains, the critical-point verdict on synthetic curves (a flat null, an inverted U, a
monotone curve), the effective learning rate of normalised layers on hand-built models, and the study's
configuration and plan (several branch points, seed pairs, square-root decay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.analysis.effective_lr import effective_learning_rates, mean_effective_lr, normalised_convolutions
from mergelab.analysis.noise_curve import (
    bootstrap_medians,
    cell_estimate,
    middle_test,
    noise_curve,
    pooled_median,
    resample_cell,
)
from mergelab.errors import SpecError
from mergelab.experiments.noise_study import NoiseConfig, cell_summaries, collapse_analysis, curve_levels
from mergelab.experiments.presets import configure, get_preset

T_GRID = (0.002, 0.008, 0.03, 0.125, 0.5)  # five noise levels, as the default lr x B grid gives


# ------------------------------------------------------------------------------------------- aggregation
def test_resample_cell_draws_whole_branch_points_then_seed_pairs():
    gains = np.array([[0.0, 0.1], [10.0, 10.1], [20.0, 20.1]])
    draws = resample_cell(gains, 500, np.random.default_rng(0))
    assert draws.shape == (500, 6)
    blocks = draws.reshape(500, 3, 2)
    # the P draws of one resampled branch point come from that branch point's row only
    assert all(np.floor(b.min() / 10) == np.floor(b.max() / 10) for rep in blocks for b in rep)
    assert set(np.unique(draws)) <= set(gains.ravel())


def test_cell_median_and_its_two_stage_bootstrap_error():
    """Branches [0, 0] and [1, 1]: drawing branch points gives {0,0,0,0} (1/4), {1,1,1,1} (1/4) or a mix with
    median 0.5 (1/2): the bootstrap median is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, s.d. sqrt(1/8); the
    small-sample correction for R = 2 branch points scales the deviations by sqrt(2 / 1): s.e. 1/2."""
    gains = [[0.0, 0.0], [1.0, 1.0]]
    raw = bootstrap_medians([gains], 20000, np.random.default_rng(1))
    assert [np.mean(raw == v) for v in (0.0, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    # independent draws of the 4 gains (ignoring the branch points) would put 5/16 on each end, not 1/4
    est = cell_estimate(gains, reps=20000, seed=1)
    assert est.median == 0.5 and est.samples == 4 and math.isnan(est.T)
    assert est.se == pytest.approx(math.sqrt(1 / 8) * math.sqrt(2), abs=0.01)
    assert (est.lo, est.hi) == pytest.approx((0.5 - math.sqrt(2) / 2, 0.5 + math.sqrt(2) / 2))


def test_one_gain_has_no_error_and_missing_merges_are_left_out():
    one = cell_estimate([[0.02]])
    assert one.median == 0.02 and one.samples == 1
    assert math.isnan(one.se) and math.isnan(one.lo) and math.isnan(one.hi)
    holes = [[0.1, math.nan], [math.nan, math.nan], [0.3, 0.2]]  # the empty branch point is dropped
    assert pooled_median([holes]) == pytest.approx(0.2)
    assert cell_estimate(holes).samples == 3
    same = cell_estimate([[0.05, 0.05], [0.05, 0.05]])
    assert same.median == 0.05 and same.se == pytest.approx(0.0, abs=1e-15)


def test_pooled_median_pools_the_cells_of_a_level():
    assert pooled_median([[[1.0, 2.0]], [[3.0], [4.0]], [[100.0]]]) == 3.0


# ------------------------------------------------------------------------------------------- verdict
def _level_data(rng, means, cells_per_level=(1, 2, 2, 2, 1), branches=3, pairs=2, sd_branch=0.01, sd_pair=0.01):
    """Synthetic gains: per cell, branch effects N(0, sd_branch) shared by its seed pairs, plus pair noise."""
    levels = {}
    for t, mu, n_cells in zip(T_GRID, means, cells_per_level):
        levels[t] = [mu + rng.normal(0, sd_branch, (branches, 1)) + rng.normal(0, sd_pair, (branches, pairs))
                     for _ in range(n_cells)]
    return levels


@pytest.mark.parametrize("sd_branch, sims", [(0.01, 300), (0.0, 200), (0.02, 200)])
def test_flat_null_claims_a_critical_middle_at_most_about_five_percent_of_the_time(sd_branch, sims):
    """Branch-point effects none, equal to and twice the seed-pair noise (each cell's branch points differ)."""
    rng = np.random.default_rng(13)
    outcomes = [noise_curve(_level_data(rng, [0.0] * 5, sd_branch=sd_branch), reps=400, seed=i).agrees
                for i in range(sims)]
    assert sum(o is True for o in outcomes) / sims <= 0.05  # false claims of a critical middle
    assert sum(o is False for o in outcomes) / sims <= 0.06  # false "no" (an end significantly best)


def test_clear_inverted_u_gives_the_critical_point_and_its_interval():
    rng = np.random.default_rng(3)
    means = [0.00, 0.02, 0.06, 0.02, 0.00]  # peak at T = 0.03
    curve = noise_curve(_level_data(rng, means, sd_branch=0.005, sd_pair=0.005), reps=2000, seed=0)
    assert curve.agrees is True and curve.p_middle < 0.05
    assert curve.critical_T == 0.03
    assert curve.critical_lo == pytest.approx(0.03) and curve.critical_hi == pytest.approx(0.03)
    assert curve.interior_share == 1.0
    assert [lv.cells for lv in curve.levels] == [1, 2, 2, 2, 1]
    assert [lv.samples for lv in curve.levels] == [6, 12, 12, 12, 6]
    for lv, mu in zip(curve.levels, means):
        assert lv.lo <= lv.median <= lv.hi and abs(lv.median - mu) < 0.015 and lv.se > 0


def test_monotone_curve_disagrees_and_a_small_bump_is_undecided():
    rng = np.random.default_rng(5)
    rising = noise_curve(_level_data(rng, [0.0, 0.01, 0.02, 0.03, 0.06], sd_branch=0.003, sd_pair=0.003), reps=1000)
    assert rising.agrees is False and rising.critical_T == 0.5 and rising.p_edge < 0.025 and rising.p_middle > 0.5
    assert rising.reason.startswith("no critical middle: an end of the grid beats every interior T")
    # one data set of a bump far below the noise (the null test above gives the rates of either mistake)
    bump = noise_curve(_level_data(np.random.default_rng(8), [0.0, 0.0, 0.003, 0.0, 0.0], sd_branch=0.02, sd_pair=0.02),
                       reps=1000)
    assert bump.agrees is None and bump.p_middle >= 0.05 and bump.p_edge >= 0.025


def test_middle_test_needs_three_levels_and_errors():
    assert middle_test([0.0, 1.0], np.zeros((10, 2)))[0] is None
    assert "at least 3" in middle_test([0.0, 1.0], np.zeros((10, 2)))[3]
    one_sample = noise_curve({0.01: [[[0.0]]], 0.1: [[[0.5]]], 1.0: [[[0.0]]]})
    assert one_sample.agrees is None and "no bootstrap error" in one_sample.reason
    assert all(math.isnan(lv.se) for lv in one_sample.levels)
    assert one_sample.critical_T == 0.1  # the point estimate exists; its interval does not
    assert math.isnan(one_sample.critical_lo)


def test_cell_summaries_and_curve_levels_on_fixed_records():
    recs = []
    for lr, b in ((0.1, 16), (0.4, 64), (0.4, 16)):
        for step, base in ((50, 0.0), (100, 0.1)):
            for k, seeds in enumerate(("1-2", "3-4")):
                recs.append({"group": "grid", "lr": lr, "batch_size": b, "momentum": 0.9, "weight_decay": 5e-4,
                             "augment": False, "branch_step": step, "seeds": seeds, "T": lr / (b * 0.1),
                             "eta_eff": 0.01 * step, "T_eff": 0.01 * step / (b * 0.1), "gain": base + 0.01 * k + lr / 10,
                             "barrier": 0.2})
    cells = cell_summaries(recs, "grid", reps=200)
    assert [(c["lr"], c["batch_size"]) for c in cells] == [(0.1, 16), (0.4, 64), (0.4, 16)]  # sorted by T
    first = cells[0]
    assert first["gains"] == pytest.approx(np.array([[0.01, 0.02], [0.11, 0.12]]))
    assert first["gain"] == pytest.approx(0.065) and first["samples"] == 4
    assert first["eta_eff"] == pytest.approx(0.75)  # median of 0.5 and 1.0 over the branch points
    levels = curve_levels(cells)
    assert sorted(levels) == pytest.approx([0.0625, 0.25]) and len(levels[min(levels)]) == 2  # lr 0.1/B 16 = lr 0.4/B 64
    ca = collapse_analysis(cells)  # equal-T cells differ by 0.03 (lr / 10) of a 0.03 range
    assert ca["equal_T_groups"] == 1 and ca["equal_T_mismatch"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- eta_eff
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1, bias=False)   # -> BN: normalised
        self.bn_a = nn.BatchNorm2d(2)
        self.b = nn.Conv2d(2, 2, 1, bias=False)   # -> in-place ReLU -> BN: not normalised
        self.bn_b = nn.BatchNorm2d(2)
        self.c = nn.Conv2d(2, 2, 1, bias=False)   # -> (+ x) -> BN: not normalised
        self.bn_c = nn.BatchNorm2d(2)
        self.d = nn.Conv2d(2, 2, 1, bias=True)    # -> BN (with a bias): normalised
        self.bn_d = nn.BatchNorm2d(2)
        self.e = nn.Conv2d(2, 2, 1, bias=False)   # no BN at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_a(self.a(x))
        x = self.bn_b(torch.relu_(self.b(x)))
        x = self.bn_c(self.c(x) + x)
        x = self.bn_d(self.d(x))
        return self.e(x)


def test_effective_learning_rate_of_hand_built_layers():
    model = _Block()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))  # ||W||^2 = 25
        model.d.weight.copy_(torch.full((2, 2, 1, 1), 0.5))               # ||W||^2 = 1
    model.train()
    before = model.bn_a.running_mean.clone()
    x = torch.randn(3, 1, 4, 4)
    assert normalised_convolutions(model, x) == ["a", "d"]
    rates = effective_learning_rates(model, 0.1, x)
    assert rates == pytest.approx({"a": 0.1 / 25, "d": 0.1 / 1})
    assert mean_effective_lr(rates) == pytest.approx(math.sqrt(0.004 * 0.1))  # geometric mean = 0.02
    assert model.training and torch.equal(model.bn_a.running_mean, before)  # mode and statistics kept
    assert math.isnan(mean_effective_lr({}))


def test_weight_decay_shrinks_norms_and_raises_eta_eff():
    model = _Block()
    x = torch.randn(2, 1, 4, 4)
    base = mean_effective_lr(effective_learning_rates(model, 0.05, x))
    with torch.no_grad():
        for conv in (model.a, model.d):
            conv.weight.mul_(0.5)  # what decay does to the norm: 1/4 of the squared norm
    assert mean_effective_lr(effective_learning_rates(model, 0.05, x)) == pytest.approx(4 * base)


def test_resnet_normalised_convolutions_are_every_conv():
    from mergelab.models.registry import build_backbone

    backbone = build_backbone("resnet_s")
    convs = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert normalised_convolutions(backbone, torch.zeros(2, 1, 28, 28)) == convs
    assert "layer2.0.shortcut.conv" in convs and len(convs) == 9


# ------------------------------------------------------------------------------------------- configuration
def test_default_noise_preset_is_the_replicated_protocol():
    cfg = get_preset("noise").configs[0]
    assert len(cfg.branch_steps) >= 3 and len(cfg.seed_pairs) >= 2 and cfg.decay == "sqrt"
    full = get_preset("noise", full=True).configs[0]
    assert len(full.branch_steps) >= 3 and len(full.seed_pairs) >= 2


def test_seed_pairs_are_validated():
    with pytest.raises(SpecError, match="different seeds"):
        configure(NoiseConfig(), {"seed_pairs": ((3, 3),)})
    with pytest.raises(SpecError, match="must not share seeds"):
        configure(NoiseConfig(), {"seed_pairs": ((1, 2), (2, 3))})
    with pytest.raises(SpecError, match="decay"):
        configure(NoiseConfig(), {"decay": "cosine"})


def _merge(lr: float, cka: float, gain: float, branch: int = 50) -> dict:
    return {"lr": lr, "batch_size": 64, "momentum": 0.9, "weight_decay": 0.0, "augment": False, "cka": cka,
            "gain": gain, "branch_step": branch}


def test_cka_verdict_uses_cells_as_units_with_an_exact_permutation_test():
    from mergelab.experiments.noise_study import cka_gain_verdict

    # 6 cells, 3 merges each, cell medians perfectly concordant: rho 1, exact two-sided p = 2 / 6! = 0.00278
    merges = [_merge(0.01 * (c + 1), 0.90 + 0.01 * c + d, 0.001 * c + d, b)
              for c in range(6) for b, d in ((50, -0.001), (100, 0.0), (150, 0.001))]
    v = cka_gain_verdict("t", merges)
    assert v.agrees is True and "over 6 cells" in v.measured and f"p = {2 / 720:.3g}" in v.measured
    # reversed gains: significant the other way -> disagrees
    v = cka_gain_verdict("t", [{**m, "gain": -m["gain"]} for m in merges])
    assert v.agrees is False
    # 3 cells cannot reach p < 0.05 (smallest exact p = 2 / 3! = 1/3), however many merges they hold: undecided
    few = [_merge(0.01 * (c + 1), 0.9 + 0.01 * c, 0.001 * c + 1e-4 * k, k) for c in range(3) for k in range(10)]
    v = cka_gain_verdict("t", few)
    assert v.agrees is None and "over 3 cells" in v.measured


def test_rank_correlation_test_exact_values_and_null_rate():
    from mergelab.analysis.statistics import rank_correlation_test

    assert rank_correlation_test([1, 2, 3, 4, 5, 6], [3, 5, 7, 9, 11, 13]) == pytest.approx((1.0, 2 / 720))
    assert rank_correlation_test([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]) == pytest.approx((-1.0, 2 / 720))
    r, p = rank_correlation_test([1, 2, 3], [1, 1, 1])
    assert math.isnan(r) and math.isnan(p)  # a constant side: no test
    rng = np.random.default_rng(0)
    hits = sum(rank_correlation_test(rng.normal(size=10), rng.normal(size=10), draws=499, seed=i)[1] < 0.05
               for i in range(200))
    assert hits / 200 <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 200)
