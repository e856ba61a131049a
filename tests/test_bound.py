"""Tests for the (derived) stability bound (mergelab.analysis.bound) and its calibration
(mergelab.analysis.calibration).

The trend tests check the *implementation of the formula*: that the bound, evaluated as written, moves the
way THEORY.md says the formula implies. They are not evidence that real merges follow these trends; that is
for measurement.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import optimize

from mergelab.analysis.bound import (
    BoundConstants,
    BoundExpert,
    BoundPool,
    chi2_divergence,
    effective_weights,
    evaluate_bound,
    generalization_term,
    merged_stability,
    per_expert_stability,
    schedule_moments,
)
from mergelab.analysis.bound_predictions import classify_shape, predict_trends, recommend
from mergelab.analysis.calibration import bound_features, calibrate, fit_constants, predict_losses, split_indices


def _expert(name: str = "t", **kw) -> BoundExpert:
    base = dict(lr=0.01, steps=100.0, batch_size=32.0, n=1000.0, sigma2=2.0, delta2=0.5, init_loss=1.2)
    base.update(kw)
    return BoundExpert(name, **base)


def _pool(**kw) -> BoundPool:
    experts = (
        _expert("a", lr=0.01, steps=100, batch_size=32, n=1000, sigma2=2.0, delta2=0.5, init_loss=1.2),
        _expert("b", lr=0.02, steps=50, batch_size=64, n=3000, sigma2=4.0, delta2=0.1, init_loss=0.8),
        _expert("c", lr=0.005, steps=400, batch_size=16, n=500, sigma2=1.0, delta2=1.5, init_loss=2.0),
    )
    return BoundPool(experts, smoothness=kw.pop("smoothness", 3.0), **kw)


# ------------------------------------------------------------------------------------------ pieces
def test_chi2_is_zero_when_alpha_equals_w_and_matches_a_hand_value():
    assert chi2_divergence([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    # (0.5 - 0.25)^2 / 0.25 + (0.5 - 0.75)^2 / 0.75 = 0.25 + 1/12 = 1/3
    assert chi2_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(1 / 3, rel=1e-12)
    # alpha is normalised first (task arithmetic lambda = 0.3 on 2 tasks is the uniform distribution)
    assert chi2_divergence([0.3, 0.3], [0.25, 0.75]) == pytest.approx(1 / 3, rel=1e-12)


def test_effective_weights_fednova():
    # w_i = alpha_i eta_i K_i / sum_j alpha_j eta_j K_j: (0.5 * 1, 0.5 * 3) / 2
    np.testing.assert_allclose(effective_weights([0.5, 0.5], [1.0, 3.0]), [0.25, 0.75])
    np.testing.assert_allclose(effective_weights([0.2, 0.8], [2.0, 2.0]), [0.2, 0.8])


def test_merged_stability_hand_numbers():
    # sum_i (n_i / n) alpha_i^2 eps_i^2 = 0.25 * 0.25 * 1 + 0.75 * 0.25 * 4
    assert merged_stability([1.0, 4.0], [0.5, 0.5], [100, 300]) == pytest.approx(0.8125, rel=1e-12)
    # task arithmetic: alpha = lambda for every expert
    assert merged_stability([1.0, 4.0], [0.3, 0.3], [100, 100]) == pytest.approx(0.09 * 2.5, rel=1e-12)


def test_per_expert_stability_hand_number():
    # e * eta^2 * K * (sigma^2 + b delta^2) / n = e * 1e-4 * 100 * (2 + 8 * 0.5) / 1000
    assert per_expert_stability(0.01, 100, 2.0, 0.5, 8, 1000) == pytest.approx(math.e * 6e-5, rel=1e-12)
    assert per_expert_stability(0.01, 100, 2.0, 0.5, 8, 1000, sq_factor=0.375) == pytest.approx(math.e * 6e-5 * 0.375)


@pytest.mark.parametrize("L,F,eps2", [(3.0, 0.7, 0.05), (10.0, 2.0, 1.5), (0.5, 0.01, 0.2)])
def test_generalization_term_is_the_minimum_over_gamma(L, F, eps2):
    gen, gamma = generalization_term(L, F, eps2)
    res = optimize.minimize_scalar(lambda g: L / g * F + (L + g) / 2 * eps2, bounds=(1e-9, 1e6), method="bounded",
                                   options={"xatol": 1e-12})
    assert gen == pytest.approx(res.fun, rel=1e-7)
    assert gamma == pytest.approx(math.sqrt(2 * L * F / eps2), rel=1e-12)
    assert gamma == pytest.approx(res.x, rel=1e-3)
    assert gen == pytest.approx(math.sqrt(eps2 * 2 * L * F) + L * eps2 / 2, rel=1e-12)


def test_generalization_term_edge_cases():
    assert generalization_term(2.0, 0.0, 0.3) == (pytest.approx(0.3), 0.0)  # L eps^2 / 2
    gen, gamma = generalization_term(2.0, 1.0, 0.0)
    assert gen == 0.0 and gamma == math.inf


def test_schedule_moments():
    assert schedule_moments(50, "constant") == (1.0, 1.0)
    m1, m2 = schedule_moments(2000, "cosine")
    assert m1 == pytest.approx(0.5, abs=1e-3) and m2 == pytest.approx(0.375, abs=1e-3)


# ------------------------------------------------------------------------------------------ the bound
def test_evaluate_bound_matches_a_hand_computation():
    pool = _pool()
    L = 3.0
    rep = evaluate_bound(pool)
    eta = np.array([0.01, 0.02, 0.005])
    K = np.array([100, 50, 400.0])
    b = np.array([32, 64, 16.0])
    n = np.array([1000, 3000, 500.0])
    s2 = np.array([2.0, 4.0, 1.0])
    d2 = np.array([0.5, 0.1, 1.5])
    f0 = np.array([1.2, 0.8, 2.0])
    alpha = np.full(3, 1 / 3)
    p = n / n.sum()
    eps_i = math.e * eta**2 * K * (s2 + b * d2) / n
    eps2 = np.sum(p * alpha**2 * eps_i)
    S1 = eta * K
    w = alpha * S1 / np.sum(alpha * S1)
    chi2 = np.sum((alpha - w) ** 2 / w)
    opt = np.sum(p * f0) / math.sqrt(3 * np.sum(alpha * S1)) + L * np.sum(alpha**2 * eta * s2 / b) + chi2 * np.sum(p * d2)
    gen = math.sqrt(eps2) * math.sqrt(2 * L * opt) + L * eps2 / 2
    assert rep.eps2 == pytest.approx(eps2, rel=1e-12)
    assert rep.chi2 == pytest.approx(chi2, rel=1e-12)
    assert rep.opt == pytest.approx(opt, rel=1e-12)
    assert rep.gen == pytest.approx(gen, rel=1e-12)
    assert rep.bound == pytest.approx(opt + gen, rel=1e-12) and rep.raw_bound == rep.bound
    np.testing.assert_allclose([e["eps2"] for e in rep.experts], eps_i, rtol=1e-12)
    np.testing.assert_allclose(rep.weights, w, rtol=1e-12)
    # eta L K: 3, 3, 6 -> all violate eta <= 1/(L K)
    assert [e["eta_L_K"] for e in rep.experts] == pytest.approx([3.0, 3.0, 6.0])
    assert not rep.all_valid
    d = rep.to_dict()
    assert d["form"] == "derived" and "(derived)" in d["formula"]
    scaled = evaluate_bound(pool, BoundConstants(c_opt=2.0, c_stab=0.5))
    assert scaled.bound == pytest.approx(2 * opt + 0.5 * gen, rel=1e-12)


def test_validity_flags_and_measured_train_loss():
    pool = BoundPool((_expert("ok", lr=0.001, steps=100), _expert("bad", lr=0.1, steps=100)), smoothness=5.0)
    rep = evaluate_bound(pool, train_loss=0.0)
    assert [e["valid"] for e in rep.experts] == [True, False]  # eta L K = 0.5 and 50
    assert rep.train_loss_source == "measured"
    assert rep.gen == pytest.approx(5.0 * rep.eps2 / 2, rel=1e-12)  # F = 0: gen = L eps^2 / 2


def test_heavy_ball_learning_rate_and_adam_note():
    sgd = _expert("s", momentum=0.9)
    assert sgd.eta() == pytest.approx(0.1) and sgd.eta(heavy_ball=False) == pytest.approx(0.01)
    adam = _expert("a", momentum=0.9, optimizer="adamw")
    assert adam.eta() == pytest.approx(0.01)
    rep = evaluate_bound(BoundPool((sgd, adam), smoothness=1.0))
    assert rep.experts[0]["eta"] == pytest.approx(0.1) and "adamw" in rep.experts[1]["note"]


def test_task_arithmetic_and_weighted_alphas():
    ta = _pool(merge="task_arithmetic", lam=0.4)
    np.testing.assert_allclose(ta.alphas(), [0.4] * 3)
    mean = evaluate_bound(_pool())
    rep = evaluate_bound(ta)
    assert rep.eps2 == pytest.approx(mean.eps2 * (0.4 * 3) ** 2, rel=1e-12)  # alpha 0.4 vs 1/3
    assert rep.opt == pytest.approx(mean.opt, rel=1e-12)  # opt uses normalised alpha
    ex = tuple(replace(e, alpha=a) for e, a in zip(_pool().experts, (0.2, 0.3, 0.5)))
    np.testing.assert_allclose(BoundPool(ex, 3.0, merge="weighted").alphas(), [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="alpha"):
        BoundPool(_pool().experts, 3.0, merge="weighted")


def test_expert_stats_from_a_spec():
    spec = SimpleNamespace(task="mnist", lr=0.05, steps=300, batch_size=64, momentum=0.9, optimizer="sgd",
                           schedule="cosine", warmup_frac=0.0, decay_frac=0.2, min_lr_ratio=0.0, data_ratio=0.5)
    st = BoundExpert.from_expert(SimpleNamespace(spec=spec, n_train=2500), sigma2=3.0, delta2=0.2, init_loss=1.1)
    assert st.n == 2500 and st.data_ratio == 0.5 and st.eta() == pytest.approx(0.5)
    assert st.lr_factor_mean == pytest.approx(0.5, abs=5e-3) and st.lr_factor_sq_mean == pytest.approx(0.375, abs=5e-3)


# ------------------------------------------------------------------------------------------ shapes and trends
def test_classify_shape():
    x = [1, 2, 3, 4, 5]
    assert classify_shape(x, [1, 2, 3, 4, 5])["shape"] == "increasing"
    assert classify_shape(x, [5, 4, 3, 2, 1])["shape"] == "decreasing"
    u = classify_shape(x, [5, 2, 1, 2, 6])
    assert u["shape"] == "U" and u["argmin"] == 3 and not u["argmin_at_edge"]
    assert classify_shape(x, [1, 3, 5, 3, 2])["shape"] == "inverted-U"
    assert classify_shape(x, [2, 2, 2, 2, 2])["shape"] == "flat"
    assert classify_shape(x, [1, 3, 2, 4, 1])["shape"] == "non-monotone"


def test_predicted_trends_follow_the_formula():
    """Implementation check of the formula (not a claim about real merges): THEORY.md section 1 says the
    stability term grows as eta^2 and linearly in K, falls as 1/n; the optimisation term falls with K;
    nothing opposes more data; the batch size trades stability (b delta^2) against minibatch noise (sigma^2/b)."""
    pool = _pool()
    tr = predict_trends(pool)
    assert set(tr) == {"K", "eta", "b", "n", "N"}
    fs = np.array(tr["eta"].factors)
    i1 = int(np.argmin(np.abs(fs - 1.0)))
    eps_eta = np.array(tr["eta"].eps2)
    np.testing.assert_allclose(eps_eta / eps_eta[i1], fs**2, rtol=1e-10)  # eta^2
    eps_k = np.array(tr["K"].eps2)
    np.testing.assert_allclose(eps_k / eps_k[i1], fs, rtol=1e-10)  # linear in K
    eps_n = np.array(tr["n"].eps2)
    np.testing.assert_allclose(eps_n / eps_n[i1], 1 / fs, rtol=1e-10)  # 1/n
    assert tr["eta"].term_shapes["eps2"] == "increasing"
    assert tr["K"].term_shapes["eps2"] == "increasing" and tr["K"].term_shapes["opt"] == "decreasing"
    assert tr["n"].shape == "decreasing" and tr["n"].term_shapes["opt"] == "flat"
    assert tr["b"].term_shapes["eps2"] == "increasing" and tr["b"].term_shapes["opt"] == "decreasing"
    for t in tr.values():
        assert t.form == "derived" and t.direction.startswith("(derived)")
        assert len(t.bound) == len(t.factors) == len(t.valid_fraction)


def test_trend_shapes_u_in_steps_and_large_lr_collapse():
    """Implementation check: opt ~ 1/sqrt(K) against gen ~ sqrt(K) .. K gives an interior optimum K*, and
    eps^2 ~ eta^2 makes the bound rise again at large eta (an optimum eta*, then collapse)."""
    ex = tuple(_expert(f"t{i}", lr=0.1, steps=100, sigma2=2.0, delta2=0.2, n=1000, init_loss=2.0) for i in range(3))
    pool = BoundPool(ex, smoothness=2.0)
    tr = predict_trends(pool, factors=[2.0**k for k in range(-6, 9)], hyperparameters=["K", "eta"])
    assert tr["K"].shape == "U" and not tr["K"].argmin_at_edge
    assert tr["eta"].shape == "U" and not tr["eta"].argmin_at_edge
    assert tr["eta"].bound[-1] > 10 * min(tr["eta"].bound)


def test_n_trend_sub_pools_use_the_gram_matrix():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 30))
    ex = tuple(_expert(f"t{i}") for i in range(4))
    pool = BoundPool(ex, 3.0, merge="task_arithmetic", lam=0.3, gram=g @ g.T)
    tr = predict_trends(pool, factors=[0.25, 0.5, 1.0, 2.0], hyperparameters=["N"])["N"]
    assert tr.values == (1.0, 2.0, 4.0, 8.0)
    # a single task has no heterogeneity: only the sigma^2 part of the stability term remains
    single = evaluate_bound(BoundPool((replace(ex[0], delta2=0.0),), 3.0, merge="task_arithmetic", lam=0.3))
    assert tr.eps2[0] == pytest.approx(single.eps2, rel=1e-12)
    # under task arithmetic the measured heterogeneity accumulates with N: eps^2 grows from 1 to 4 tasks
    assert tr.eps2[2] > tr.eps2[1] > tr.eps2[0]
    assert "Gram" in tr.model


def test_recommend_moves_lr_down_when_stability_dominates():
    ex = tuple(_expert(f"t{i}", lr=0.2, steps=300, delta2=2.0, n=300, data_ratio=0.5) for i in range(3))
    pool = BoundPool(ex, smoothness=3.0)
    rec = recommend(pool)
    assert rec.factors["lr"] < 1.0
    assert rec.bound_after <= rec.bound_before
    assert rec.recommended["data_ratio"] == 1.0 and rec.factors["data_ratio"] == pytest.approx(2.0)
    assert rec.form == "derived" and rec.reasoning[0].startswith("(derived)")
    assert "Validity" in rec.text and set(rec.curves) == {"lr", "steps", "batch_size"}


# ------------------------------------------------------------------------------------------ calibration
def _synthetic_pools(m: int, seed: int) -> list[BoundPool]:
    rng = np.random.default_rng(seed)
    pools = []
    for _ in range(m):
        N = int(rng.integers(2, 6))
        ex = tuple(
            _expert(
                f"t{i}",
                lr=float(10 ** rng.uniform(-3, -1)),
                steps=float(rng.integers(20, 800)),
                batch_size=float(rng.choice([16, 32, 64, 128])),
                n=float(rng.integers(200, 5000)),
                sigma2=float(rng.uniform(0.5, 5)),
                delta2=float(rng.uniform(0.01, 1.0)),
                init_loss=float(rng.uniform(0.5, 2.5)),
            )
            for i in range(N)
        )
        pools.append(BoundPool(ex, smoothness=float(rng.uniform(1, 10))))
    return pools


@pytest.mark.parametrize("method", ["nnls", "relative", "log"])
def test_calibration_recovers_known_constants(method):
    pools = _synthetic_pools(40, seed=1)
    feats = bound_features(pools)
    rng = np.random.default_rng(2)
    true = BoundConstants(c_opt=0.7, c_stab=2.5)
    y = predict_losses(feats, true) * (1 + 0.01 * rng.standard_normal(len(pools)))
    tr, te = split_indices(len(pools), test_fraction=0.3, seed=0)
    res = calibrate([pools[i] for i in tr], y[tr], [pools[i] for i in te], y[te], method=method)
    assert res.constants.c_opt == pytest.approx(0.7, rel=0.05)
    assert res.constants.c_stab == pytest.approx(2.5, rel=0.05)
    assert res.test_spearman is not None and res.test_spearman > 0.95
    assert res.n_test == len(te) >= 3 and res.to_dict()["form"] == "derived"


def test_calibration_with_a_floor_and_input_checks():
    pools = _synthetic_pools(20, seed=3)
    feats = bound_features(pools)
    y = predict_losses(feats, BoundConstants(1.5, 0.2), floor=0.3)
    consts, floor = fit_constants(feats, y, floor=True)
    assert consts.c_opt == pytest.approx(1.5, rel=1e-6) and consts.c_stab == pytest.approx(0.2, rel=1e-6)
    assert floor == pytest.approx(0.3, rel=1e-6)
    with pytest.raises(ValueError, match="measured"):
        fit_constants(feats, y[:-1])
    with pytest.raises(ValueError, match="positive"):
        fit_constants(feats, -y, method="log")


# ------------------------------------------------------------------------------------------ the excess-loss form
from mergelab.analysis.excess_bound import (  # noqa: E402
    ExcessConstants,
    dispersion_from_gram,
    excess_bound,
    excess_terms,
    heterogeneity_term,
    merge_operator_vectors,
    optimization_term,
    stability_term,
    task_vector_dispersion,
)


def _identical_pool(N: int, **kw) -> BoundPool:
    """N experts with the same hyperparameters and statistics (delta = 0: no gradient heterogeneity)."""
    e = _expert("t", lr=0.01, steps=100, batch_size=32, n=1000, sigma2=2.0, delta2=0.0, init_loss=1.0)
    e = replace(e, **kw)
    return BoundPool(tuple(replace(e, name=f"t{i}") for i in range(N)), smoothness=2.0)


def test_stability_term_elasticities_by_construction():
    pool = _pool()
    s = stability_term(pool)
    # (1/N) sum_i e eta_i^2 K_i (sigma_i^2 + b_i delta_i^2) / n_i by hand
    eta, K = np.array([0.01, 0.02, 0.005]), np.array([100, 50, 400.0])
    b, n = np.array([32, 64, 16.0]), np.array([1000, 3000, 500.0])
    s2, d2 = np.array([2.0, 4.0, 1.0]), np.array([0.5, 0.1, 1.5])
    assert s == pytest.approx(np.mean(math.e * eta**2 * K * (s2 + b * d2) / n), rel=1e-12)
    assert stability_term(pool.scaled("K", 2.0)) == pytest.approx(2 * s, rel=1e-12)  # linear in K
    assert stability_term(pool.scaled("eta", 2.0)) == pytest.approx(4 * s, rel=1e-12)  # quadratic in eta
    assert stability_term(pool.scaled("n", 2.0)) == pytest.approx(s / 2, rel=1e-12)  # ~ 1/n
    # b multiplies the heterogeneity part only: with delta = 0 the batch size does not enter
    flat = _identical_pool(3)
    assert stability_term(flat.scaled("b", 4.0)) == pytest.approx(stability_term(flat), rel=1e-12)
    # flat in N for identical experts (the merged eps^2 of evaluate_bound falls as 1/N there)
    assert [stability_term(_identical_pool(N)) for N in (2, 4, 6)] == pytest.approx([stability_term(flat)] * 3, rel=1e-12)


def test_dispersion_of_orthonormal_task_vectors_is_one_minus_one_over_n_r_squared():
    r = 3.0
    for N in (2, 3, 5):
        vecs = [r * np.eye(7)[i] for i in range(N)]
        d = task_vector_dispersion(vecs)
        np.testing.assert_allclose(d, (1 - 1 / N) * r * r, rtol=1e-12)
        np.testing.assert_allclose(dispersion_from_gram(np.array(vecs) @ np.array(vecs).T), d, rtol=1e-12)
        # HET = (1/N) sum_i (L/2) d_i: with L = 2 exactly (1 - 1/N) r^2
        assert heterogeneity_term(d, 2.0) == pytest.approx((1 - 1 / N) * r * r, rel=1e-12)
    # per-task L_i weigh each task's own dispersion
    assert heterogeneity_term([1.0, 3.0], [2.0, 4.0]) == pytest.approx((1.0 + 6.0) / 2, rel=1e-12)
    # mappings of named tensors are summed over the names
    named = [{"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}, {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}]
    np.testing.assert_allclose(task_vector_dispersion(named), [0.5, 0.5], rtol=1e-12)
    with pytest.raises(ValueError, match="nonnegative"):
        heterogeneity_term([-1.0], 1.0)


def test_ties_operator_shrinks_the_dispersion_of_a_conflicting_pair():
    """Trim to the top half, then sign consensus (by hand): tau_1 = (3, -0.2, 1, 0) -> (3, 0, 1, 0);
    tau_2 = (-1, 0.1, 0, 1) -> (-1, 0, 0, 1), whose -1 disagrees with the elected + on the first coordinate ->
    (0, 0, 0, 1). Dispersion per task 4.5225 before, 2.75 after."""
    taus = [{"w": torch.tensor([3.0, -0.2, 1.0, 0.0], dtype=torch.float64)},
            {"w": torch.tensor([-1.0, 0.1, 0.0, 1.0], dtype=torch.float64)}]
    before = task_vector_dispersion(taus)
    np.testing.assert_allclose(before, [4.5225, 4.5225], rtol=1e-12)
    for scope in ("tensor", "global"):
        op, out = merge_operator_vectors("ties", {"density": 0.5, "trim_scope": scope}, taus)
        assert op == "ties"
        np.testing.assert_allclose(out[0]["w"].numpy(), [3, 0, 1, 0])
        np.testing.assert_allclose(out[1]["w"].numpy(), [0, 0, 0, 1])
        after = task_vector_dispersion(out)
        np.testing.assert_allclose(after, [2.75, 2.75], rtol=1e-12)
        assert heterogeneity_term(after, 2.0) < heterogeneity_term(before, 2.0)
    op, same = merge_operator_vectors("weight_average", {}, taus)
    assert op == "identity" and torch.equal(same[1]["w"], taus[1]["w"])


def test_excess_bound_rises_with_n_for_identical_experts_where_the_old_form_falls():
    """Identical hyperparameters and orthonormal task vectors of norm r = 2 (L = 2): STAB is flat, OPT falls as
    1/sqrt(N), HET = (1 - 1/N) r^2 rises faster; the assembled bound (unit constants) rises with N. The form of
    evaluate_bound falls with N for any non-negative constants (every term carries alpha^2 or 1/sqrt(N))."""
    r = 2.0
    sizes = (2, 3, 4, 5, 6)
    terms = []
    for N in sizes:
        pool = _identical_pool(N)
        d = task_vector_dispersion([r * np.eye(8)[i] for i in range(N)])
        terms.append(excess_terms(pool, d))
    stab = [t.stab for t in terms]
    opt = [t.opt for t in terms]
    het = [t.het for t in terms]
    assert stab == pytest.approx([stab[0]] * len(sizes), rel=1e-12)
    assert all(b < a for a, b in zip(opt, opt[1:]))
    assert het == pytest.approx([(1 - 1 / N) * r * r for N in sizes], rel=1e-12)
    bound = [excess_bound(t) for t in terms]
    assert all(b > a for a, b in zip(bound, bound[1:]))
    assert excess_bound(terms[0], ExcessConstants(c0=0.5, c_opt=0, c_stab=0, c_het=2)) == pytest.approx(0.5 + 2 * het[0])
    assert terms[0].to_dict()["form"] == "derived" and "(derived)" in terms[0].formula
    assert optimization_term(_identical_pool(2)) == pytest.approx(evaluate_bound(_identical_pool(2)).opt, rel=1e-12)
    old = [evaluate_bound(_identical_pool(N)) for N in sizes]
    assert all(b.opt < a.opt and b.gen < a.gen for a, b in zip(old, old[1:]))
    with pytest.raises(ValueError, match="3 dispersions for a pool of 2"):
        excess_terms(_identical_pool(2), [1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ fitting and testing it
from mergelab.analysis.bound_fit import (  # noqa: E402
    Interval,
    elasticity,
    fit_excess,
    leave_one_out,
    task_jackknife,
    task_offset_matrix,
    verdict,
    within_spearman,
)


def _terms_matrix(m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0.1, 2.0, m), rng.uniform(1e-4, 1e-2, m), rng.uniform(0.0, 50.0, m)])


@pytest.mark.parametrize("method", ["nnls", "ols"])
def test_fit_excess_recovers_constants_with_an_intercept(method):
    X = _terms_matrix(40, 0)
    y = 0.3 + 2.0 * X[:, 0] + 50.0 * X[:, 1] + 0.01 * X[:, 2]
    fit = fit_excess(X, y, method=method)
    c = fit.constants
    assert (c.c0, c.c_opt, c.c_stab, c.c_het) == pytest.approx((0.3, 2.0, 50.0, 0.01), rel=1e-8)
    np.testing.assert_allclose(fit.standardized, np.array([2.0, 50.0, 0.01]) * X.std(axis=0), rtol=1e-8)
    assert fit.intercept == pytest.approx(y.mean()) and fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit.predict(X), y, rtol=1e-10)


def test_nnls_keeps_slopes_nonnegative_where_ols_goes_negative():
    X = _terms_matrix(30, 1)
    y = 1.0 + 3.0 * X[:, 0] - 100.0 * X[:, 1]
    assert fit_excess(X, y, method="ols").constants.c_stab == pytest.approx(-100.0, rel=1e-8)
    nn = fit_excess(X, y, method="nnls")
    assert min(nn.standardized) >= 0.0 and nn.standardized[1] == 0.0
    # a constant column gets slope 0 and does not break the fit
    Xc = X.copy()
    Xc[:, 2] = 7.0
    assert fit_excess(Xc, 1.0 + X[:, 0], method="ols").standardized[2] == 0.0
    with pytest.raises(ValueError, match="finite"):
        fit_excess(np.array([[1.0, 2, 3], [np.nan, 1, 1]]), [1.0, 2.0])


def test_leave_one_out_predicts_each_group_from_the_others_and_excludes_shared_merges():
    X = _terms_matrix(25, 2)
    y = 0.1 + X[:, 0] + 10 * X[:, 1] + 0.02 * X[:, 2]
    groups = [g for g in "KbenN" for _ in range(5)]
    keys = list(range(25))
    keys[5] = keys[0]  # merge 5 (group b) is merge 0 (group K): left out of K's fit as well
    ho = leave_one_out(X, y, groups, keys=keys, method="ols")
    assert ho.spearman == pytest.approx(1.0) and set(ho.per_group) == set("KbenN")
    np.testing.assert_allclose(ho.predicted, y, rtol=1e-8)
    assert ho.fits["K"].n == 19 and ho.fits["b"].n == 19 and ho.fits["e"].n == 20
    assert ho.to_dict()["form"] == "derived"


def test_task_jackknife_of_a_mean_is_the_textbook_standard_error():
    """Disjoint tasks: the delete-one-task jackknife of a mean is s / sqrt(n); values 1, 2, 4:
    s^2 = 7/3, se = sqrt(7/9), interval 7/3 +- t_{2, 0.975} se."""
    v = np.array([1.0, 2.0, 4.0])
    iv = task_jackknife(lambda mask: float(v[mask].mean()), [["a"], ["b"], ["c"]])
    assert iv.estimate == pytest.approx(7 / 3) and iv.se == pytest.approx(math.sqrt(7 / 9), rel=1e-12)
    q = 4.302652729911275  # t_{2, 0.975}
    assert (iv.low, iv.high) == pytest.approx((7 / 3 - q * math.sqrt(7 / 9), 7 / 3 + q * math.sqrt(7 / 9)), rel=1e-9)
    assert iv.replicates == 3
    # a merge that touches two tasks is removed from both replicates
    seen = []
    task_jackknife(lambda mask: seen.append(mask.tolist()) or 0.0, [["a", "b"], ["b", "c"], ["c"]])
    assert seen[1:] == [[False, True, True], [False, False, True], [True, False, False]]


def test_verdicts_follow_the_interval():
    def iv(lo, hi):
        return Interval((lo + hi) / 2, lo, hi, 0.1, "test", 6)

    assert verdict(iv(0.6, 1.4), +1, 1.0) == ("agrees", "agrees")
    assert verdict(iv(0.1, 0.5), +1, 1.0) == ("agrees", "disagrees")
    assert verdict(iv(-0.3, 1.5), +1, 1.0) == ("undecided", "undecided")
    assert verdict(iv(-2.0, -0.5), +1, 2.0) == ("disagrees", "disagrees")
    assert verdict(iv(-0.9, -0.1), -1, None) == ("agrees", "-")
    assert verdict(iv(math.nan, math.nan), -1, -1.0) == ("undecided", "undecided")


def test_elasticity_of_an_exact_power_law_and_dropped_merges():
    K = np.repeat([25.0, 50.0, 100.0, 200.0], 3)
    members = [["a", "b"], ["b", "c"], ["a", "c"]] * 4
    e = elasticity("K", K, 0.01 * K, members)
    assert e.slope == pytest.approx(1.0) and e.interval.se == pytest.approx(0.0, abs=1e-12)
    assert (e.sign_verdict, e.value_verdict) == ("agrees", "agrees") and e.dropped == 0
    excess = 0.5 * K ** -1.0
    excess[0] = -0.1  # no logarithm: dropped and counted
    e = elasticity("K", K, excess, members)
    assert e.slope == pytest.approx(-1.0) and e.dropped == 1 and e.n == 11
    assert (e.sign_verdict, e.value_verdict) == ("disagrees", "disagrees")
    n = elasticity("N", [2, 2, 3, 3, 4, 4], [0.1, 0.1, 0.2, 0.2, 0.4, 0.4], [["a"], ["b"], ["a"], ["b"], ["a"], ["b"]])
    assert n.regressor == "N" and n.slope == pytest.approx(math.log(2)) and n.value_verdict == "-"


def test_pooling_folds_of_a_power_law_with_an_extreme_sweep_misranks_unless_fitted_in_logs():
    """y = sqrt(x), sweeps at x ~ 1, ~ 15, ~ 1500: every linear fold ranks its own sweep perfectly, but the fold
    without the small sweep is fitted on the other two (slope ~0.02, intercept ~4.3) and predicts it above the
    middle sweep (~2.4): pooled Spearman 31/56. The log form is exact: log y = 0.5 log x, pooled Spearman 1."""
    x = np.concatenate([np.linspace(1, 2, 5), np.linspace(10, 20, 5), np.linspace(1000, 2000, 5)])
    y = np.sqrt(x)
    groups = ["A"] * 5 + ["B"] * 5 + ["C"] * 5
    lin = leave_one_out(x[:, None], y, groups, method="ols")
    assert all(v == pytest.approx(1.0) for v in lin.per_group.values())
    assert lin.spearman == pytest.approx(31 / 56) and min(lin.predicted[:5]) > max(lin.predicted[5:10])
    log = leave_one_out(x[:, None], y, groups, method="ols", form="log")
    assert log.spearman == pytest.approx(1.0) and log.fit_form == "log"
    np.testing.assert_allclose(log.predicted, y, rtol=1e-10)
    assert log.fits["A"].standardized[0] / log.fits["A"].scales[0] == pytest.approx(0.5)
    # non-positive excess: not fitted on, still predicted; a non-positive term: no prediction
    y2, x2 = y.copy(), x.copy()
    y2[7], x2[3] = -1.0, 0.0
    h = leave_one_out(x2[:, None], y2, groups, method="ols", form="log")
    assert math.isfinite(h.predicted[7]) and math.isnan(h.predicted[3]) and h.fits["A"].n == 9


def test_task_offsets_recover_per_task_intercepts_and_the_slopes():
    """excess_j = sum_t a_t w_jt + 2 OPT_j + 50 STAB_j (w_jt = 1/N_j for the merge's tasks): the fit with per-task
    offsets is exact and its slopes are the true ones; without them the slopes absorb the task effects."""
    rng = np.random.default_rng(3)
    tasks = ["a", "b", "c", "d"]
    members = [list(rng.choice(tasks, size=int(rng.integers(2, 5)), replace=False)) for _ in range(40)]
    W, names = task_offset_matrix(members)
    assert names == ("a", "b", "c", "d") and np.allclose(W.sum(axis=1), 1.0)
    assert W[0, names.index(members[0][0])] == pytest.approx(1 / len(members[0]))
    a = np.array([0.5, 2.0, -1.0, 3.0])
    X = _terms_matrix(40, 4)
    y = W @ a + 2.0 * X[:, 0] + 50.0 * X[:, 1]
    fit = fit_excess(X, y, method="nnls", offsets=W)
    assert (fit.constants.c_opt, fit.constants.c_stab, fit.constants.c_het) == pytest.approx((2.0, 50.0, 0.0), abs=1e-8)
    assert fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit.predict(X, W), y, rtol=1e-10)
    assert fit_excess(X, y, method="nnls").r2 < 0.99
    with pytest.raises(ValueError, match="offsets"):
        fit.predict(X)
    # offsets alone (no term): the per-task means of a purely additive task effect
    only = fit_excess(X[:, :0], W @ a, offsets=W)
    np.testing.assert_allclose(only.predict(X[:, :0], W), W @ a, rtol=1e-10)
    # leave one out: a held-out merge with a task no training merge has gets no prediction
    groups = ["g1"] * 20 + ["g2"] * 20
    Wd = np.column_stack([W, np.r_[np.zeros(20), np.full(20, 0.0)]])
    Wd[25] = 0.0
    Wd[25, 4] = 1.0  # merge 25 is of a fifth task alone
    ho = leave_one_out(X, y, groups, method="nnls", offsets=Wd)
    assert math.isnan(ho.predicted[25]) and ho.offsets
    ok = [j for j in range(40) if j != 25]
    np.testing.assert_allclose(np.array(ho.predicted)[ok], y[ok], rtol=1e-8)


def test_within_spearman_averages_inside_clusters():
    x = [1, 2, 3, 10, 30, 20, 5, 5, 5]
    y = [1, 2, 3, 1, 2, 3, 1, 2, 3]
    # cluster p: +1, cluster q: (10, 30, 20) vs (1, 2, 3) -> 0.5, cluster r: no spread in x -> skipped
    assert within_spearman(x, y, list("pppqqqrrr")) == pytest.approx(0.75)
    assert math.isnan(within_spearman([1, 1], [1, 2], ["p", "p"]))
