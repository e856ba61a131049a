"""Pool diagnostics against hand-computed values, the Corollary-1 mechanism, and streaming equivalence.

The pool used for hand computation (three experts, four coordinates, split into two tensors):

    tau_1 = [ 1, -2, 0,  3]      ||tau_1||^2 = 14
    tau_2 = [ 2,  1, 0, -1]      ||tau_2||^2 = 6
    tau_3 = [ 1,  1, 4,  0]      ||tau_3||^2 = 18

Gram: <1,2> = -3, <1,3> = -1, <2,3> = 3. Pairs changing the same coordinate / disagreeing in sign:
(1,2): 3 / 2; (1,3): 2 / 1; (2,3): 2 / 0. Pool: coordinates 0, 1, 3 have >= 2 nonzero experts; 1 and 3
have mixed signs -> 2/3; chance level (0.75 + 0.75 + 0.5) / 3 = 2/3. Sum = [4, 0, 4, 2], so
D = 38 - 36/3 = 26. Mass-elected sign = [+, tie, +, +]: sign consensus gives [1,0,0,3], [2,0,0,0],
[1,0,4,0], so D_sign = 31 - 41/3 = 52/3.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.analysis import (
    DiagnosticsConfig,
    apply_operator,
    coordinate_dispersion,
    pool_diagnostics,
    sign_consensus,
    tensor_stats,
)
from mergelab.analysis.diagnostics import OPERATORS, expected_ranking
from mergelab.checkpoints import save_state_dict
from mergelab.errors import NonFiniteError, SpecError, TensorMismatchError


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TAUS = [
    torch.tensor([1.0, -2.0, 0.0, 3.0]),
    torch.tensor([2.0, 1.0, 0.0, -1.0]),
    torch.tensor([1.0, 1.0, 4.0, 0.0]),
]


def _hand_pool() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Base and experts whose task vectors are TAUS, split into tensors 'a' (coords 0-1) and 'b' (2-3)."""
    base = {"a": torch.tensor([0.5, -0.25]), "b": torch.tensor([[2.0, 1.0]]), "count": torch.tensor(7)}
    experts = [
        {"a": base["a"] + t[:2], "b": base["b"] + t[2:].reshape(1, 2), "count": torch.tensor(7)} for t in TAUS
    ]
    return base, experts


# ------------------------------------------------------------------------------------ hand-made values


def test_hand_computed_conflicts_norms_cosines_and_dispersion() -> None:
    base, experts = _hand_pool()
    diag = pool_diagnostics(base, experts, config=DiagnosticsConfig(operators=("sign",)))
    t = diag.total
    assert diag.skipped == ["count"]
    assert t.numel == 4
    np.testing.assert_allclose(t.sqnorms, [14, 6, 18])
    np.testing.assert_allclose(t.gram, [[14, -3, -1], [-3, 6, 3], [-1, 3, 18]])
    cos = t.cosine()
    assert cos[0, 1] == pytest.approx(-3 / math.sqrt(14 * 6))
    assert cos[1, 2] == pytest.approx(3 / math.sqrt(6 * 18))
    np.testing.assert_array_equal(t.both_changed[[0, 0, 1], [1, 2, 2]], [3, 2, 2])
    np.testing.assert_array_equal(t.disagree[[0, 0, 1], [1, 2, 2]], [2, 1, 0])
    pc = t.pairwise_conflict()
    assert pc[0, 1] == pytest.approx(2 / 3) and pc[0, 2] == pytest.approx(1 / 2) and pc[1, 2] == 0
    assert t.mean_pairwise_conflict() == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert (t.multi, t.conflict) == (3, 2)
    assert t.pool_conflict_rate == pytest.approx(2 / 3)
    assert t.pool_conflict_chance == pytest.approx(2 / 3)
    assert t.dispersion == pytest.approx(26.0)
    assert t.normalized_dispersion == pytest.approx(26 / 38)
    assert t.dispersion_after("sign") == pytest.approx(52 / 3)
    assert t.delta("sign") == pytest.approx(26 / 3)
    assert float(coordinate_dispersion(TAUS).sum()) == pytest.approx(26.0)
    # per layer: 'a' holds coords 0-1 (conflict at coord 1 only), 'b' coords 2-3 (one multi coord, conflicting)
    a, b = diag.layer("a").stats, diag.layer("b").stats
    assert (a.multi, a.conflict, b.multi, b.conflict) == (2, 1, 1, 1)
    assert diag.layer("b").shape == (1, 2)


def test_sign_consensus_ties_and_weights() -> None:
    before = [t.clone() for t in TAUS]
    out = sign_consensus(TAUS)  # coordinate 1 sums to 0: a tie elects 0 and zeroes it everywhere
    expected = [[1, 0, 0, 3], [2, 0, 0, 0], [1, 0, 4, 0]]
    for o, e in zip(out, expected):
        assert o.tolist() == e
    # weights (1, 3, 1): coordinate 1 elects + (-2 + 3 + 1), coordinate 3 ties (3 - 3 + 0)
    out = sign_consensus(TAUS, [1.0, 3.0, 1.0])
    for o, e in zip(out, [[1, 0, 0, 0], [2, 1, 0, 0], [1, 1, 4, 0]]):
        assert o.tolist() == e
    # count election: coordinate 1 has two + votes against one -
    out = sign_consensus(TAUS, by="count")
    assert [o[1].item() for o in out] == [0, 1, 1]
    assert all(torch.equal(t, u) for t, u in zip(TAUS, before))  # inputs untouched


def test_cosine_matrix_matches_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(3, 7, generator=g) * s for s in (1.0, 0.1, 5.0, 2.0)]
    stats = tensor_stats(taus, config=DiagnosticsConfig(operators=()))
    flat = np.stack([t.reshape(-1).double().numpy() for t in taus])
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(stats.cosine(), flat @ flat.T / np.outer(norms, norms), rtol=1e-12)
    assert stats.mean_cosine() == pytest.approx(
        np.mean([stats.cosine()[i, j] for i in range(4) for j in range(4) if i != j])
    )


def test_zero_task_vector_gives_undefined_cosine_and_json_nulls() -> None:
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.zeros(4)}, {"w": torch.tensor([1.0, -1.0, 0.0, 2.0])}]
    diag = pool_diagnostics(base, experts)
    assert math.isnan(diag.total.cosine()[0, 1])
    assert math.isnan(diag.total.pool_conflict_rate)  # no coordinate changed by two experts
    text = json.dumps(diag.to_dict(), allow_nan=False)
    assert json.loads(text)["summary"]["pool_conflict_rate"] is None


def test_per_layer_sums_match_whole_model() -> None:
    g = torch.Generator().manual_seed(2)
    shapes = {"emb": (50, 8), "w1": (8, 8), "b1": (8,), "w2": (3, 8)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [
        {k: v + torch.randn(v.shape, generator=g) * (0.01 * (i + 1)) * (torch.rand(v.shape, generator=g) < 0.7)
         for k, v in base.items()}
        for i in range(4)
    ]
    diag = pool_diagnostics(base, experts)
    t = diag.total
    np.testing.assert_allclose(t.sqnorms, sum(layer.stats.sqnorms for layer in diag.layers), rtol=1e-12)
    flat = [torch.cat([(e[k] - base[k]).reshape(-1) for k in shapes]).double() for e in experts]
    np.testing.assert_allclose(t.sqnorms, [float(f @ f) for f in flat], rtol=1e-6)
    np.testing.assert_allclose(t.gram, torch.stack(flat) @ torch.stack(flat).T, rtol=1e-5, atol=1e-9)
    assert t.dispersion == pytest.approx(float(coordinate_dispersion(flat).sum()), rel=1e-5)
    assert t.dispersion == pytest.approx(sum(layer.stats.dispersion for layer in diag.layers), rel=1e-12)
    assert t.multi == sum(layer.stats.multi for layer in diag.layers)
    assert t.conflict == sum(layer.stats.conflict for layer in diag.layers)
    assert t.numel == sum(math.prod(s) for s in shapes.values())
    for op in OPERATORS:
        assert t.dispersion_after(op) == pytest.approx(
            sum(layer.stats.dispersion_after(op) for layer in diag.layers), rel=1e-12
        )
    rows = diag.layer_table()
    assert [r["name"] for r in rows] == list(shapes)
    assert {r["operator"] for r in diag.operator_table()} == set(OPERATORS)


def test_chunked_accumulation_matches_one_block() -> None:
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) < 0.5) for _ in range(3)]
    one = tensor_stats(taus, name="x")
    many = tensor_stats(taus, name="x", chunk=37)
    np.testing.assert_allclose(many.gram, one.gram, rtol=1e-12)
    np.testing.assert_array_equal(many.disagree, one.disagree)
    assert (many.multi, many.conflict) == (one.multi, one.conflict)
    assert many.dispersion == pytest.approx(one.dispersion, rel=1e-10)
    for op in OPERATORS:
        assert many.dispersion_after(op) == pytest.approx(one.dispersion_after(op), rel=1e-10)
    # consensus variants reuse the sparsified vectors when both are measured; alone they recompute them
    for op in ("ties", "dare_ties", "della", "breadcrumbs_ties"):
        alone = tensor_stats(taus, name="x", config=DiagnosticsConfig(operators=(op,)))
        assert alone.dispersion_after(op) == one.dispersion_after(op)
    # float64 task vectors (a float64 input) give the same counts
    double = tensor_stats([t.double() for t in taus], name="x", chunk=100)
    np.testing.assert_array_equal(double.disagree, one.disagree)
    assert double.dispersion == pytest.approx(one.dispersion, rel=1e-6)


# ------------------------------------------------------------------------------- Corollary 1's mechanism


def _random_pool(rng: np.random.Generator, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    n = int(rng.integers(2, 10))
    m = int(rng.integers(1, 300))
    kind = rng.integers(0, 3)
    taus = []
    for _ in range(n):
        scale = 10 ** rng.uniform(-3, 3)
        if kind == 0:  # continuous values, varied scales
            x = rng.standard_normal(m) * scale
        elif kind == 1:  # small integers: exact ties in the election and in magnitudes
            x = rng.integers(-3, 4, m).astype(float)
        else:  # heavy tails
            x = rng.standard_cauchy(m) * scale
        x[rng.random(m) < rng.uniform(0, 0.6)] = 0.0  # sparsity: coordinates an expert does not change
        taus.append(torch.tensor(x, dtype=dtype))
    u = rng.random()
    if u < 0.4:
        weights = list(rng.uniform(0.1, 3.0, n))
    elif u < 0.6:  # negative weights (task negation): the argument does not depend on which sign is elected
        weights = list(rng.uniform(-3.0, 3.0, n))
    else:
        weights = [1.0] * n
    return taus, weights


def test_sign_consensus_never_increases_dispersion_coordinatewise() -> None:
    """Corollary 1's mechanism, coordinate by coordinate, on 200 random pools (mass and count election).

    Argument (module docstring of mergelab.analysis.diagnostics): with P the positive mass and M the
    negative mass at a coordinate, zeroing the negative entries changes D by sum_neg x^2 + M (2P - M) / N
    >= M^2/N - M^2/N + 2PM/N = 2PM/N >= 0 (Cauchy-Schwarz), whichever sign is removed. The test also checks
    that lower bound, and that zeroing a tie coordinate leaves D = 0 there.
    """
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        dtype = torch.float64 if trial % 2 else torch.float32
        taus, weights = _random_pool(rng, dtype)
        for by in ("mass", "count"):
            after = sign_consensus(taus, weights, by=by)
            d0 = coordinate_dispersion(taus)
            d1 = coordinate_dispersion(after)
            x = torch.stack([t.double() for t in taus])
            scale = x.square().sum(dim=0)
            eps = 1e-12 * scale + 1e-300
            assert bool((d1 <= d0 + eps).all()), f"trial {trial} ({by}): dispersion rose at {torch.nonzero(d1 > d0 + eps)}"
            pos = x.clamp(min=0).sum(dim=0)
            neg = (-x).clamp(min=0).sum(dim=0)
            bound = 2 * pos * neg / len(taus)
            assert bool((d0 - d1 >= bound - 1e-9 * scale - 1e-300).all()), f"trial {trial}: below 2PM/N"
            checked += x.shape[1]
    assert checked > 10_000


def test_sign_step_never_increases_dispersion_at_tensor_level() -> None:
    """Summed over coordinates: D_sign <= D, D_ties <= D_trim, D_dare_ties <= D_dare, for random pools."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        taus, weights = _random_pool(rng, torch.float32)
        cfg = DiagnosticsConfig(density=float(rng.uniform(0.05, 1.0)), seed=trial)
        s = tensor_stats(taus, weights, cfg, name=f"t{trial}")
        tol = 1e-9 * s.total_sqnorm + 1e-300
        assert s.dispersion_after("sign") <= s.dispersion + tol
        assert s.dispersion_after("ties") <= s.dispersion_after("trim") + tol
        assert s.dispersion_after("dare_ties") <= s.dispersion_after("dare") + 1e-9 * max(
            float(s.operators["dare"].sqnorms.sum()), 1e-300
        )


def test_magnitude_trimming_alone_can_increase_dispersion() -> None:
    """Two agreeing experts, trimmed to their top half, become disjoint: D goes from 0.01 to 1.

    Sign consensus cannot undo it (all signs agree), so the TIES operator as a whole increases D here too:
    Corollary 1's Delta_T >= 0 holds for the consensus step, not for trimming.
    """
    taus = [torch.tensor([1.0, 0.9], dtype=torch.float64), torch.tensor([0.9, 1.0], dtype=torch.float64)]
    cfg = DiagnosticsConfig(density=0.5)
    trimmed = apply_operator("trim", taus, [1.0, 1.0], cfg)
    assert [t.tolist() for t in trimmed] == [[1.0, 0.0], [0.0, 1.0]]
    assert float(coordinate_dispersion(taus).sum()) == pytest.approx(0.01)
    assert float(coordinate_dispersion(trimmed).sum()) == pytest.approx(1.0)
    s = tensor_stats(taus, config=cfg)
    assert s.delta("trim") == pytest.approx(0.01 - 1.0)
    assert s.delta("ties") == pytest.approx(0.01 - 1.0)
    assert s.delta("sign") == pytest.approx(0.0)
    # breadcrumbs without outlier removal is the same top-half trim, so it raises D too
    band = tensor_stats(taus, config=DiagnosticsConfig(density=0.5, breadcrumbs_gamma=0.0, operators=("breadcrumbs",)))
    assert band.delta("breadcrumbs") == pytest.approx(0.01 - 1.0)


def test_dare_increases_dispersion_by_the_expected_amount() -> None:
    """E[D_dare] = D + (1/d - 1)(1 - 1/N) sum_i ||tau_i||^2 (independent masks, inverse rescale)."""
    g = torch.Generator().manual_seed(4)
    n_exp, d = 3, 0.5
    taus = [torch.randn(200_000, generator=g) * s for s in (1.0, 2.0, 0.5)]
    s = tensor_stats(taus, config=DiagnosticsConfig(density=d, operators=("dare",)), name="w")
    expected = s.dispersion + (1 / d - 1) * (1 - 1 / n_exp) * s.total_sqnorm
    assert s.dispersion_after("dare") == pytest.approx(expected, rel=0.02)
    assert s.delta("dare") < 0


def test_breadcrumbs_ties_operator_by_hand() -> None:
    """breadcrumbs_ties = the breadcrumbs band, then sign consensus. n = 5, density 0.4 (keep 2), gamma 0.2 (drop
    the 1 largest): each tau keeps its 2nd and 3rd largest |entries|; the band sums [0, -4, 0, 4, 7] elect
    [0, -, 0, +, +] (an exact tie at coordinate 2 zeroes 3 and -3)."""
    taus = [torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0]), torch.tensor([-1.0, 2.0, -6.0, 4.0, 3.0]),
            torch.tensor([2.0, 1.0, -3.0, -5.0, 4.0])]
    cfg = DiagnosticsConfig(density=0.4, breadcrumbs_gamma=0.2)
    band = apply_operator("breadcrumbs", taus, [1.0] * 3, cfg)
    assert [t.tolist() for t in band] == [[0, -4, 3, 0, 0], [0, 0, 0, 4, 3], [0, 0, -3, 0, 4]]
    consensus = apply_operator("breadcrumbs_ties", taus, [1.0] * 3, cfg)
    assert [t.tolist() for t in consensus] == [[0, -4, 0, 0, 0], [0, 0, 0, 4, 3], [0, 0, 0, 0, 4]]
    # the catalog's own step: breadcrumbs_ties' sparsify is the band, its combination a disjoint mean
    from mergelab.methods import TensorInputs, get_method

    m = get_method("breadcrumbs_ties")
    step = m.sparsify(list(taus), TensorInputs("w", None, [], [1.0] * 3), m.parse_params({"density": 0.4, "gamma": 0.2}))
    assert m.combination == "disjoint_mean" and all(torch.equal(a, b) for a, b in zip(step, band))
    assert all(torch.equal(a, b) for a, b in zip(sign_consensus(step, [1.0] * 3), consensus))
    # the consensus never increases D over the band alone (the module docstring's guarantee)
    s = tensor_stats(taus, config=cfg)
    assert s.dispersion_after("breadcrumbs_ties") <= s.dispersion_after("breadcrumbs")


def test_magprune_and_della_operators_are_delta_s_own_steps() -> None:
    """magprune (della_linear's operator) and della (its consensus) are the catalog's MAGPRUNE step: masks seeded
    by (seed, expert index, tensor name) as the della merges seed them, window della_epsilon, kept entries
    rescaled by 1/q_j with q_j the entry's keep probability; with epsilon 0 every q_j is the density and
    MAGPRUNE is DARE's drop with the same masks (up to q_j's float32 rounding)."""
    from mergelab import ops
    from mergelab.methods import TensorInputs, get_method

    g = torch.Generator().manual_seed(6)
    taus = [torch.randn(8, 25, generator=g) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    cfg = DiagnosticsConfig(density=0.4, della_epsilon=0.2, seed=7)
    inputs = TensorInputs("layer.w", None, [], weights)
    pruned = apply_operator("magprune", taus, weights, cfg, name="layer.w")
    for i, (tau, out) in enumerate(zip(taus, pruned)):
        assert torch.equal(out, ops.magprune(tau, 0.4, 0.2, generator=inputs.generator(7, i)))
        q = ops.magprune_keep_probabilities(tau.abs().reshape(8, 25), 0.4, 0.2).reshape(8, 25)
        kept = out != 0
        assert 0 < int(kept.sum()) < tau.numel()
        torch.testing.assert_close(out[kept], tau[kept] / q[kept], rtol=0, atol=0)
    for name in ("della", "della_linear"):
        m = get_method(name)
        p = m.parse_params({"density": 0.4, "epsilon": 0.2, "seed": 7})
        step = m.sparsify(list(taus), inputs, p)
        assert all(torch.equal(a, b) for a, b in zip(step, pruned)), name
    della = apply_operator("della", taus, weights, cfg, name="layer.w")
    assert all(torch.equal(a, b) for a, b in zip(della, sign_consensus(pruned, weights)))
    # the seed and the tensor name reach the masks; epsilon 0 is DARE's drop, mask for mask
    other = apply_operator("magprune", taus, weights, DiagnosticsConfig(density=0.4, della_epsilon=0.2, seed=8),
                           name="layer.w")
    assert not all(torch.equal(a, b) for a, b in zip(other, pruned))
    flat = DiagnosticsConfig(density=0.4, della_epsilon=0.0, seed=7)
    dare = apply_operator("dare", taus, weights, flat, name="layer.w")
    for a, b in zip(apply_operator("magprune", taus, weights, flat, name="layer.w"), dare):
        assert torch.equal(a != 0, b != 0)  # the same uniform draws against q_j = density (float32)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # measured together, della reuses magprune's vectors; alone it recomputes the same ones
    both = tensor_stats(taus, weights, config=cfg, name="layer.w")
    alone = tensor_stats(taus, weights, config=DiagnosticsConfig(density=0.4, della_epsilon=0.2, seed=7,
                                                                 operators=("della",)), name="layer.w")
    assert alone.dispersion_after("della") == both.dispersion_after("della")
    assert both.dispersion_after("della") <= both.dispersion_after("magprune")


def test_magprune_spacing_and_the_merge_s_own_parameters_reach_the_operator() -> None:
    """della_spacing 'mergekit' (half width) is the catalog step with spacing mergekit; the bound's
    merge_operator_vectors measures a della merge with that merge's epsilon, spacing and seed."""
    from mergelab.analysis.excess_bound import merge_operator_vectors
    from mergelab.methods import TensorInputs, get_method

    g = torch.Generator().manual_seed(9)
    taus = [torch.randn(6, 10, generator=g) for _ in range(3)]
    cfg = DiagnosticsConfig(density=0.5, della_epsilon=0.3, della_spacing="mergekit", seed=2)
    got = apply_operator("della", taus, [1.0] * 3, cfg, name="t")
    m = get_method("della")
    p = m.parse_params({"density": 0.5, "epsilon": 0.3, "spacing": "mergekit", "seed": 2})
    step = m.sparsify(list(taus), TensorInputs("t", None, [], [1.0] * 3), p)
    assert all(torch.equal(a, b) for a, b in zip(got, sign_consensus(step, [1.0] * 3)))
    paper = apply_operator("della", taus, [1.0] * 3, DiagnosticsConfig(density=0.5, della_epsilon=0.3, seed=2),
                           name="t")
    assert not all(torch.equal(a, b) for a, b in zip(got, paper))
    op, vecs = merge_operator_vectors("della", {"density": 0.5, "epsilon": 0.3, "spacing": "mergekit", "seed": 2},
                                      [{"t": t} for t in taus])
    assert op == "della" and all(torch.equal(v["t"], a) for v, a in zip(vecs, got))
    with pytest.raises(SpecError, match="della_epsilon"):  # mergekit's half width 0.3 at density 0.75 leaves (0, 1]
        DiagnosticsConfig(density=0.75, della_epsilon=0.3, della_spacing="mergekit", operators=("magprune",))


def test_magprune_window_outside_the_unit_interval() -> None:
    """density +- della_epsilon/2 must stay in (0, 1]: the default operator set leaves the MAGPRUNE operators
    out (the others are still measured); naming one is an error."""
    cfg = DiagnosticsConfig(density=0.04)
    assert "magprune" not in cfg.operators and "della" not in cfg.operators
    assert set(cfg.operators) == set(OPERATORS) - {"magprune", "della"}
    assert "magprune" in DiagnosticsConfig(density=0.06).operators
    assert "della" in DiagnosticsConfig(density=1.0).operators
    with pytest.raises(SpecError, match="della_epsilon"):
        DiagnosticsConfig(density=0.04, operators=("sign", "della"))
    with pytest.raises(SpecError, match="della_epsilon must be"):
        DiagnosticsConfig(della_epsilon=-0.1)


def test_global_trim_uses_whole_model_thresholds() -> None:
    g = torch.Generator().manual_seed(5)
    base = {"a": torch.zeros(40), "b": torch.zeros(5, 6)}
    experts = [{"a": torch.randn(40, generator=g) * 3, "b": torch.randn(5, 6, generator=g) * 0.1} for _ in range(3)]
    d = 0.25
    diag = pool_diagnostics(base, experts, config=DiagnosticsConfig(density=d, trim_scope="global",
                                                                    operators=("trim",)))
    trimmed = []
    for e in experts:
        flat = torch.cat([e["a"].reshape(-1), e["b"].reshape(-1)])
        k = int(d * flat.numel())
        thr = flat.abs().sort(descending=True).values[k - 1]
        trimmed.append(flat * (flat.abs() >= thr))
    assert diag.total.dispersion_after("trim") == pytest.approx(float(coordinate_dispersion(trimmed).sum()), rel=1e-6)
    # the whole-model top 25% (17 of 70 entries per expert) all fall in the large-magnitude tensor 'a';
    # per-tensor trimming would keep 25% of each tensor instead
    assert diag.layer("a").stats.kept_fraction("trim") == pytest.approx(17 / 40)
    assert diag.layer("b").stats.kept_fraction("trim") == 0.0
    per_tensor = pool_diagnostics(base, experts, config=DiagnosticsConfig(density=d, operators=("trim",)))
    assert per_tensor.layer("a").stats.kept_fraction("trim") == pytest.approx(0.25)


# --------------------------------------------------------------------------------- streaming and inputs


def _random_model(seed: int, n_exp: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(30, 6, generator=g),
        "layer.0.weight": torch.randn(6, 6, generator=g),
        "layer.0.bias": torch.randn(6, generator=g),
        "norm.num_batches_tracked": torch.tensor(10),
        "empty": torch.zeros(0),
    }
    experts = []
    for _ in range(n_exp):
        e = {}
        for k, v in base.items():
            if v.is_floating_point() and v.numel():
                e[k] = v + torch.randn(v.shape, generator=g) * 0.05 * (torch.rand(v.shape, generator=g) < 0.8)
            else:
                e[k] = v.clone()
        experts.append(e)
    return base, experts


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_files_match_in_memory(tmp_path: Path, scope: str) -> None:
    base, experts = _random_model(6, 3)
    save_state_dict(base, tmp_path / "base.safetensors")
    paths = []
    for i, e in enumerate(experts):
        paths.append(save_state_dict(e, tmp_path / f"expert{i}.safetensors"))
    weights = [1.0, 2.0, 0.5]
    cfg = DiagnosticsConfig(density=0.3, trim_scope=scope, seed=11)
    mem = pool_diagnostics(base, experts, weights=weights, config=cfg)
    disk = pool_diagnostics(tmp_path / "base.safetensors", paths, weights=weights, config=cfg)
    assert mem.skipped == disk.skipped == ["norm.num_batches_tracked", "empty"]
    a, b = mem.to_dict(), disk.to_dict()
    for key in ("base", "experts", "seconds"):
        a.pop(key), b.pop(key)
    assert a == b  # same tensors, same order, same seeded DARE masks: identical numbers


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    base, experts = _random_model(7, 2)
    with pytest.raises(SpecError, match="at least two experts"):
        pool_diagnostics(base, experts[:1])
    bad = dict(experts[1])
    bad["layer.0.bias"] = torch.zeros(7)
    with pytest.raises(TensorMismatchError, match="layer.0.bias"):
        pool_diagnostics(base, [experts[0], bad])
    missing = {k: v for k, v in experts[1].items() if k != "embed.weight"}
    with pytest.raises(TensorMismatchError, match="missing"):
        pool_diagnostics(base, [experts[0], missing])
    nan = dict(experts[1])
    nan["layer.0.weight"] = experts[1]["layer.0.weight"].clone()
    nan["layer.0.weight"][0, 0] = float("nan")
    save_state_dict(nan, tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match=r"nan\.safetensors.*layer\.0\.weight"):
        pool_diagnostics(base, [experts[0], tmp_path / "nan.safetensors"])
    with pytest.raises(SpecError, match="density"):
        DiagnosticsConfig(density=0.0)
    with pytest.raises(SpecError, match="unknown operator"):
        DiagnosticsConfig(operators=("magic",))


# -------------------------------------------------------------------------------------------- heuristic


def test_expected_ranking_regimes() -> None:
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.zeros(2000)}
    shared = torch.randn(2000, generator=g)
    aligned = [{"w": shared + 0.2 * torch.randn(2000, generator=g)} for _ in range(3)]
    random = [{"w": torch.randn(2000, generator=g)} for _ in range(3)]
    r_aligned = expected_ranking(pool_diagnostics(base, aligned))
    r_random = expected_ranking(pool_diagnostics(base, random))
    assert r_aligned["regime"] == "aligned" and r_aligned["ranking"][0] == "weight_average"
    assert r_random["regime"] == "conflicting" and r_random["ranking"][0] == "ties"
    assert r_random["heuristic"] is True and "heuristic" in r_random["note"]
