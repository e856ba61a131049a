"""mergelab.analysis.statistics against closed-form references: the jackknife of a mean is the classic standard
error, overlapping groups leave tasks out, one sample has no error bar, McNemar's exact test on hand tables, the
stratified paired test, and bit-packed outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergelab.analysis.statistics import (
    Estimate,
    Observation,
    accuracy_difference,
    contrast,
    holm,
    jackknife,
    level_means,
    mcnemar_exact,
    mean_and_error,
    paired_accuracy_test,
    significant_signs,
    step_contrasts,
)
from mergelab.evaluation.outcomes import pack_outcomes, unpack_outcomes


def test_jackknife_of_a_mean_is_the_classic_standard_error():
    x = [2.0, 3.5, 1.0, 7.25, 4.0]
    m = sum(x) / len(x)
    classic = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x))
    est = jackknife(lambda drop: float(np.mean([v for i, v in enumerate(x) if i != drop])), range(len(x)))
    assert est.value == pytest.approx(m) and est.se == pytest.approx(classic, rel=1e-12) and est.df == 4
    # the same through contrast(): every observation its own unit and cell
    obs = [Observation(frozenset({i}), "v", i, v) for i, v in enumerate(x)]
    c = contrast(obs, {"v": 1.0})
    assert c.value == pytest.approx(m) and c.se == pytest.approx(classic, rel=1e-12)
    assert mean_and_error(x) == pytest.approx((m, classic))


def test_one_sample_has_no_error_bar():
    assert math.isnan(mean_and_error([3.0])[1]) and mean_and_error([3.0])[0] == 3.0
    assert all(math.isnan(v) for v in mean_and_error([]))
    one = contrast([Observation(frozenset({"a"}), 1, "g", 2.0)], {1: 1.0})
    assert one.value == 2.0 and math.isnan(one.se) and one.sign() == 0
    assert math.isnan(one.p_value()) and all(math.isnan(v) for v in one.interval())
    # one group holding every task (N = number of tasks): leaving any task out leaves nothing -> NaN, undecided
    everything = frozenset("abcdef")
    obs = [Observation(everything, 6, "all", y) for y in (1.0, 1.1, 1.2)]  # three seeds of one group
    assert math.isnan(contrast(obs, {6: 1.0}).se)


def test_overlapping_groups_leave_a_task_out_by_dropping_every_group_containing_it():
    # groups ab, ac, bc; leaving a out keeps bc only, etc.
    ys = {("a", "b"): 1.0, ("a", "c"): 2.0, ("b", "c"): 4.0}
    obs = [Observation(frozenset(g), 0, g, y) for g, y in ys.items()]
    reps = {"a": 4.0, "b": 2.0, "c": 1.0}
    assert level_means(obs, "a") == {0: 4.0}
    mean = sum(reps.values()) / 3
    se = math.sqrt(2 / 3 * sum((r - mean) ** 2 for r in reps.values()))
    est = contrast(obs, {0: 1.0})
    assert est.value == pytest.approx(7 / 3) and est.se == pytest.approx(se) and est.df == 2


def test_seeds_are_averaged_within_a_cell_before_the_cells():
    obs = [Observation(frozenset({"a"}), 0, "g1", 1.0), Observation(frozenset({"a"}), 0, "g1", 3.0),  # two seeds
           Observation(frozenset({"b"}), 0, "g2", 5.0)]
    assert level_means(obs) == {0: pytest.approx((2.0 + 5.0) / 2)}


def test_paired_steps_use_the_groups_present_at_both_values():
    # group bc failed at value 1: the step compares ab and ac only
    obs = [Observation(frozenset(g), v, g, y) for g, v, y in [
        (("a", "b"), 0, 1.0), (("a", "c"), 0, 2.0), (("b", "c"), 0, 9.0),
        (("a", "b"), 1, 1.5), (("a", "c"), 1, 2.5)]]
    (step,) = step_contrasts(obs, [0, 1])
    assert step.value == pytest.approx(0.5)


def test_estimate_interval_p_value_and_bonferroni_signs():
    e = Estimate(1.0, 0.5, 5)
    t = 2.570581835636314  # t_5(0.975)
    assert e.interval() == pytest.approx((1 - t * 0.5, 1 + t * 0.5))
    # 2 P(T_5 > 2), closed form of the t CDF for 5 degrees of freedom with theta = atan(t / sqrt(5))
    th = math.atan(2 / math.sqrt(5))
    cdf = 0.5 + (th + math.sin(th) * math.cos(th) * (1 + 2 / 3 * math.cos(th) ** 2)) / math.pi
    assert e.p_value() == pytest.approx(2 * (1 - cdf), rel=1e-9)
    z = Estimate(1.2, 0.5)  # normal: 2.4 sd
    assert z.sign(0.05) == 1 and z.sign(0.01) == 0
    # 2.4 sd is significant alone (> 1.960) but not at 0.05 / 4 (< z(1 - 0.05/8) = 2.498)
    assert significant_signs([z]) == [1] and significant_signs([z] * 4) == [0] * 4
    assert significant_signs([Estimate(-1.0, 0.1)] * 4) == [-1] * 4


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),
    (5, 0, 0.0625),  # 2 / 2^5
    (1, 9, 22 / 1024),  # 2 (1 + 10) / 2^10
    (6, 6, 1.0),
    (3, 7, 2 * (1 + 10 + 45 + 120) / 1024),
])
def test_mcnemar_exact_on_hand_tables(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


def test_paired_test_is_mcnemar_on_pooled_discordant_pairs_with_equal_task_sizes():
    # task x: A right on 6 examples B misses, B right on 1 A misses; task y: 3 vs 0; 10 examples each
    a = {"x": [1] * 6 + [0] + [1, 0, 1], "y": [1, 1, 1, 0, 0, 0, 0, 1, 1, 0]}
    b = {"x": [0] * 6 + [1] + [1, 0, 1], "y": [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]}
    r = paired_accuracy_test(a, b)
    assert (r.a_only, r.b_only, r.n) == (9, 1, 20)
    assert r.difference == pytest.approx(((6 - 1) / 10 + 3 / 10) / 2)
    assert r.p_value == pytest.approx(mcnemar_exact(9, 1)) and r.method == "McNemar exact"
    dx = np.array([1] * 6 + [-1] + [0] * 3, float)
    dy = np.array([1] * 3 + [0] * 7, float)
    se = math.sqrt((dx.var(ddof=1) / 10 + dy.var(ddof=1) / 10) / 4)
    assert r.se == pytest.approx(se)
    assert r.verdict() is True
    assert paired_accuracy_test(b, a).verdict() is False
    same = paired_accuracy_test(a, a)
    assert same.difference == 0 and same.p_value == 1.0 and same.verdict() is None


def test_paired_test_with_unequal_task_sizes_randomizes_within_tasks():
    rng = np.random.default_rng(3)
    a = {"x": rng.random(50) < 0.7, "y": rng.random(200) < 0.6}
    r0 = paired_accuracy_test(a, a)
    assert r0.p_value == pytest.approx(1.0) and r0.method.startswith("stratified")
    # B wrong exactly where A is right on 10 examples of x: x weighs 1/(2*50) per example
    b = {"x": a["x"].copy(), "y": a["y"].copy()}
    b["x"][np.flatnonzero(a["x"])[:10]] = False
    r = paired_accuracy_test(a, b, draws=20_000)
    assert r.difference == pytest.approx(10 / 50 / 2)
    # only 10 discordant pairs, all in x, all favouring A: p = P(all 10 flips agree) = 2 / 2^10 (Monte Carlo)
    assert r.p_value == pytest.approx(2 / 1024, abs=0.001) and r.verdict() is True


def test_paired_test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same tasks"):
        paired_accuracy_test({"x": [1]}, {"y": [1]})
    with pytest.raises(ValueError, match="task x"):
        paired_accuracy_test({"x": [1, 0]}, {"x": [1]})


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_outcomes_round_trip_bit_packed(n):
    x = np.random.default_rng(n).random(n) < 0.5
    packed = pack_outcomes(x)
    assert np.array_equal(unpack_outcomes(packed, n), x)
    assert len(packed) <= 4 * math.ceil(math.ceil(n / 8) / 3)
    if n:
        with pytest.raises(ValueError, match="bits"):
            unpack_outcomes(packed, n + 8)


def test_holm_adjusts_step_down_and_stays_monotone():
    # sorted 0.01, 0.02, 0.04, NaN(=1): 0.01*4, max(0.04, 0.02*3), max(0.06, 0.04*2), 1
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.08, 0.04, 1.0, 0.06])
    assert holm([]) == [] and holm([0.3]) == [0.3] and holm([0.6, 0.6]) == [1.0, 1.0]


def test_accuracy_difference_of_independent_evaluations():
    a = {"x": [1, 1, 1, 0], "y": [1, 0]}
    b = {"z": [1, 0, 0, 0, 0]}
    e = accuracy_difference(a, b)
    assert e.value == pytest.approx((0.75 + 0.5) / 2 - 0.2)
    var = (np.var([1, 1, 1, 0], ddof=1) / 4 + np.var([1, 0], ddof=1) / 2) / 4 + np.var([1, 0, 0, 0, 0], ddof=1) / 5
    assert e.se == pytest.approx(math.sqrt(var)) and math.isinf(e.df)
    assert math.isnan(accuracy_difference({"x": [1]}, b).se)
