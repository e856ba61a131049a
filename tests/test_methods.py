"""Tests for mergelab.methods: every data-free method against an independent float64 reference written from
the paper's formula (sorting and explicit loops, not the library's operators), plus invariants and
parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import SpecError
from mergelab.merging.torch_backend import kernel
from mergelab.methods import METHODS, TensorInputs, get_method

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(name: str, base, experts, weights=None, params=None, *, tensor="layer.weight", thresholds=None,
        compute_dtype=torch.float32) -> torch.Tensor:
    method = get_method(name)
    weights = [1.0] * len(experts) if weights is None else weights
    p = method.parse_params(params or {})
    return kernel(method)(TensorInputs(tensor, base, experts, weights, thresholds, compute_dtype), p)


def _both(name: str, base, experts, params) -> torch.Tensor:
    """The method's reference and its torch kernel on the same inputs, asserted equal; returns the result."""
    method = get_method(name)
    p = method.parse_params(params)
    inp = TensorInputs("layer.weight", base, experts, [1.0] * len(experts))
    out = kernel(method)(inp, p)
    assert torch.equal(out, method.reference(inp, p)), name
    return out


def make(n_experts: int, shape=(6, 5), seed: int = 0, tau_scale: float = 1.0):
    g = _gen(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + tau_scale * torch.randn(shape, generator=g) for _ in range(n_experts)]
    return base, experts


# ------------------------------------------------------------------------------------ references (float64)


def ref_topk_mask(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Keep |tau_j| >= t, t = the k-th largest |tau| (k = max(1, floor(d n))), found by a full sort."""
    flat = tau.abs().reshape(-1)
    if threshold is None:
        if density >= 1.0:
            return torch.ones_like(tau, dtype=torch.bool)
        k = max(1, int(math.floor(density * flat.numel())))
        threshold = sorted(flat.tolist(), reverse=True)[k - 1]
    return tau.abs() >= threshold


def ref_ties_combine(taus, weights, sign_election="mass", divisor="count") -> torch.Tensor:
    """Sign election and disjoint mean, entry by entry with Python loops."""
    n = taus[0].numel()
    flat = [t.reshape(-1).tolist() for t in taus]
    out = []
    for j in range(n):
        vals = [f[j] for f in flat]
        if sign_election == "mass":
            s = sum(w * v for w, v in zip(weights, vals))
        else:
            s = sum((v > 0) - (v < 0) for v in vals)
        gamma = (s > 0) - (s < 0)
        agree = [i for i, v in enumerate(vals) if v != 0 and ((v > 0) - (v < 0)) == gamma]
        if not agree or gamma == 0:
            out.append(0.0)
            continue
        num = sum(weights[i] * vals[i] for i in agree)
        den = len(agree) if divisor == "count" else sum(weights[i] for i in agree)
        out.append(num / den)
    return torch.tensor(out, dtype=F64).reshape(taus[0].shape)


def ref_ties(base, experts, weights, density=0.2, lam=1.0, sign_election="mass", divisor="count",
             thresholds=None) -> torch.Tensor:
    b = base.to(F64)
    taus = [e.to(F64) - b for e in experts]
    trimmed = [
        t * ref_topk_mask(t, density, None if thresholds is None else thresholds[i]) for i, t in enumerate(taus)
    ]
    return b + lam * ref_ties_combine(trimmed, weights, sign_election, divisor)


def ref_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the floor(gamma n) largest magnitudes, keep the next floor(density n) (distinct values)."""
    n = tau.numel()
    if density >= 1.0:
        return tau.clone()
    order = sorted(range(n), key=lambda j: -abs(float(tau.reshape(-1)[j])))
    n_keep = max(1, int(math.floor(density * n)))
    n_top = min(int(math.floor(gamma * n)), n - n_keep)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_top:n_top + n_keep]] = True
    return tau * keep.reshape(tau.shape)


def dare_masks(name: str, tensor: str, n: int, shape, density: float, seed: int) -> list[torch.Tensor]:
    """DARE's documented masks: m ~ Bernoulli(density) drawn as rand < density from the generator seeded by
    (seed, expert index, tensor name) (TensorInputs.generator, the reproducibility contract)."""
    inp = TensorInputs(tensor, None, [], [])
    return [torch.rand(shape, generator=inp.generator(seed, i)) < density for i in range(n)]


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.to(F64).reshape(-1), b.to(F64).reshape(-1)
    cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == ref.shape
    assert torch.allclose(out.to(F64), ref.to(F64), rtol=tol, atol=tol), (out - ref).abs().max()


# -------------------------------------------------------------------------------- methods vs references


def test_weight_average_with_weights() -> None:
    base, experts = make(3)
    w = [1.0, 2.0, 0.5]
    ref = sum(wi * e.to(F64) for wi, e in zip(w, experts)) / sum(w)
    close(run("weight_average", base, experts, w), ref)
    # the base is not part of the average; it may be absent
    close(run("weight_average", None, experts, w), ref)


@pytest.mark.parametrize(("lam", "w"), [(1.0, [1.0, 1.0, 1.0]), (0.4, [1.0, 2.0, -0.5]), (-1.0, [0.3, 0.3, 0.3])])
def test_task_arithmetic_lambda_and_weights(lam: float, w: list[float]) -> None:
    base, experts = make(3, seed=1)
    b = base.to(F64)
    ref = b + lam * sum(wi * (e.to(F64) - b) for wi, e in zip(w, experts))
    close(run("task_arithmetic", base, experts, w, {"lambda": lam}), ref)


def test_task_arithmetic_hand_computed() -> None:
    base = torch.tensor([1.0, 2.0])
    experts = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])]
    # tau = (1, 0), (0, -2); 2*tau1 + 1*tau2 = (2, -2); lambda 0.5 -> base + (1, -1)
    assert torch.equal(run("task_arithmetic", base, experts, [2.0, 1.0], {"lambda": 0.5}), torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("sign_election", ["mass", "count"])
@pytest.mark.parametrize("divisor", ["count", "weight"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_against_reference(sign_election: str, divisor: str, density: float) -> None:
    base, experts = make(3, shape=(7, 6), seed=2)
    w = [1.0, 0.5, 2.0]
    params = {"density": density, "lambda": 0.7, "sign_election": sign_election,
              "disjoint_divisor": divisor, "trim_scope": "tensor"}
    ref = ref_ties(base, experts, w, density, 0.7, sign_election, divisor)
    close(run("ties", base, experts, w, params), ref)


def test_ties_hand_computed() -> None:
    base = torch.zeros(5)
    experts = [torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05]),
               torch.tensor([0.4, 0.45, -0.1, 0.0, 0.3]),
               torch.tensor([-0.6, 0.2, 0.0, 0.3, 0.02])]
    # density 0.4 -> k = 2 per model: trimmed (0,-.5,.3,0,0), (.4,.45,0,0,0), (-.6,0,0,.3,0)
    # mass sign: (-.2 -> -, -.05 -> -, .3 -> +, .3 -> +, 0 -> 0)
    # disjoint mean: (-.6, -.5, .3, .3, 0)
    out = run("ties", base, experts, params={"density": 0.4, "trim_scope": "tensor"})
    assert torch.allclose(out, torch.tensor([-0.6, -0.5, 0.3, 0.3, 0.0]))
    # by count: entry 0 has votes (+, -) -> 0 -> nothing agrees -> 0; entry 1 votes (-, +) -> 0
    out = run("ties", base, experts, params={"density": 0.4, "trim_scope": "tensor", "sign_election": "count"})
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.3, 0.3, 0.0]))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della", "sce"])
def test_zero_sign_positive_keeps_the_positive_side_of_an_exact_tie(name: str) -> None:
    """tau_1 = (1, 2, -3, 0.5, 0), tau_2 = -tau_1 except the last two: the sign sums (1, 1) are exactly 0 at
    entries 0-2. ``zero_sign: drop`` (default) elects 0 there (merged 0); ``positive`` elects +1, so the model
    with tau > 0 is the only one agreeing and its entry is the merge: (1, 2, 3). Entry 3 (0.5, 0.25) is their
    mean 0.375 either way (SCE: its energy-weighted mean); entry 4 (all zero) stays 0. Density 1 (no
    sparsification), reference and kernel."""
    base = torch.zeros(5)
    experts = [torch.tensor([1.0, 2.0, -3.0, 0.5, 0.0]), torch.tensor([-1.0, -2.0, 3.0, 0.25, 0.0])]
    dense = {"ties": {"trim_scope": "tensor", "density": 1.0}, "dare_ties": {"density": 1.0},
             "breadcrumbs_ties": {"density": 1.0}, "della": {"density": 1.0}, "sce": {}}[name]
    drop = _both(name, base, experts, dense)
    positive = _both(name, base, experts, {**dense, "zero_sign": "positive"})
    if name == "sce":  # energy weights w_i: one agreeing model gives w_i tau_i / w_i, entry 3 a weighted mean
        assert drop[[0, 1, 2, 4]].tolist() == [0.0] * 4 and positive[4] == 0.0
        torch.testing.assert_close(positive[:3], torch.tensor([1.0, 2.0, 3.0]), rtol=1e-6, atol=0)
        assert torch.equal(drop[3], positive[3])
    else:
        assert drop.tolist() == [0.0, 0.0, 0.0, 0.375, 0.0]
        assert positive.tolist() == [1.0, 2.0, 3.0, 0.375, 0.0]
    assert get_method(name).parse_params({}).zero_sign == "drop"


def test_ties_with_given_global_thresholds() -> None:
    # thresholds (from the engine's whole-model pass) replace the per-tensor k-th largest
    base, experts = make(2, seed=3)
    thr = [0.8, 1.5]
    ref = ref_ties(base, experts, [1.0, 1.0], 0.2, thresholds=thr)
    close(run("ties", base, experts, params={"density": 0.2}, thresholds=thr), ref)
    # trim_scope tensor ignores them
    ref_t = ref_ties(base, experts, [1.0, 1.0], 0.2)
    close(run("ties", base, experts, params={"density": 0.2, "trim_scope": "tensor"}, thresholds=thr), ref_t)


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
@pytest.mark.parametrize("seed", [0, 7])
def test_dare_linear_against_reference(rescale: str, seed: int) -> None:
    base, experts = make(3, shape=(8, 9), seed=4)
    w, d, lam = [1.0, 2.0, 0.5], 0.3, 0.8
    b = base.to(F64)
    masks = dare_masks("dare_linear", "layer.weight", 3, base.shape, d, seed)
    dropped = []
    for e, m in zip(experts, masks):
        tau = e.to(F64) - b
        kept = tau * m
        if rescale == "inverse":
            kept = kept / d
        elif rescale == "l1":
            kept = kept * (tau.abs().sum() / kept.abs().sum())
        dropped.append(kept)
    ref = b + lam * sum(wi * t for wi, t in zip(w, dropped))
    out = run("dare_linear", base, experts, w, {"density": d, "lambda": lam, "rescale": rescale, "seed": seed})
    close(out, ref)


@pytest.mark.parametrize("sign_election", ["mass", "count"])
@pytest.mark.parametrize("divisor", ["count", "weight"])
def test_dare_ties_against_reference(sign_election: str, divisor: str) -> None:
    base, experts = make(3, shape=(8, 9), seed=5)
    w, d, lam, seed = [1.0, 2.0, 0.5], 0.4, 1.3, 3
    b = base.to(F64)
    masks = dare_masks("dare_ties", "layer.weight", 3, base.shape, d, seed)
    dropped = [(e.to(F64) - b) * m / d for e, m in zip(experts, masks)]
    ref = b + lam * ref_ties_combine(dropped, w, sign_election, divisor)
    out = run("dare_ties", base, experts, w, {"density": d, "lambda": lam, "seed": seed,
                                               "sign_election": sign_election, "disjoint_divisor": divisor})
    close(out, ref)


def test_dare_masks_depend_on_seed_expert_and_tensor_name() -> None:
    base = torch.zeros(400)
    experts = [torch.ones(400), torch.ones(400)]
    p = {"density": 0.5, "rescale": "none"}
    a = run("dare_linear", base, experts[:1], params=p, tensor="a")
    assert torch.equal(a, run("dare_linear", base, experts[:1], params=p, tensor="a"))
    assert not torch.equal(a, run("dare_linear", base, experts[:1], params=p, tensor="b"))
    assert not torch.equal(a, run("dare_linear", base, experts[:1], params={**p, "seed": 1}, tensor="a"))
    # two identical experts get different masks: the sum takes values 0, 1 and 2
    both = run("dare_linear", base, experts, params=p, tensor="a")
    assert set(both.unique().tolist()) == {0.0, 1.0, 2.0}


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("density", [0.3, 0.9, 1.0])
def test_breadcrumbs_against_reference(gamma: float, density: float) -> None:
    base, experts = make(2, shape=(10, 6), seed=6)
    w, lam = [1.0, 0.5], 0.9
    b = base.to(F64)
    ref = b + lam * sum(wi * ref_band(e.to(F64) - b, density, gamma) for wi, e in zip(w, experts))
    close(run("breadcrumbs", base, experts, w, {"density": density, "gamma": gamma, "lambda": lam}), ref)


@pytest.mark.parametrize("degrees", [20.0, 60.0, 89.0])
def test_model_stock_two_models_at_constructed_angle(degrees: float) -> None:
    base = torch.randn(3, 4, generator=_gen(7), dtype=F64)
    # orthonormal u, v; tau1 = 2u, tau2 = 0.5 (cos a u + sin a v): the angle between them is a, and the
    # ratio t = 2 cos a / (1 + cos a) (Jang et al. 2024, eq. 6 with N = 2) ignores their lengths
    q, _ = torch.linalg.qr(torch.randn(12, 2, generator=_gen(8), dtype=F64))
    u, v = q[:, 0].reshape(3, 4), q[:, 1].reshape(3, 4)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    tau1, tau2 = 2 * u, 0.5 * (c * u + s * v)
    out = run("model_stock", base, [base + tau1, base + tau2], compute_dtype=F64)
    ref = base + (2 * c / (1 + c)) * (tau1 + tau2) / 2
    close(out, ref, 1e-12)
    # orthogonal task vectors: t = 0, the base itself
    out = run("model_stock", base, [base + u, base + v], compute_dtype=F64)
    close(out, base, 1e-12)


def test_model_stock_three_models_reference() -> None:
    base, experts = make(3, seed=9)
    b = base.to(F64)
    taus = [e.to(F64).reshape(-1) - b.reshape(-1) for e in experts]
    cos = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i, j in ((0, 1), (0, 2), (1, 2))]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    ref = b + t * sum(taus).reshape(b.shape) / 3 if 1 + 2 * c > 0 else b
    close(run("model_stock", base, experts), ref)


def test_slerp_one_model_base_to_expert_and_two_models() -> None:
    base, (e1, e2) = make(2, seed=10)
    for t in (0.0, 0.3, 0.5, 1.0):
        close(run("slerp", base, [e1], params={"t": t}), ref_slerp(base, e1, t).reshape(base.shape))
        close(run("slerp", base, [e1, e2], params={"t": t}), ref_slerp(e1, e2, t).reshape(base.shape))
        close(run("slerp", None, [e1, e2], params={"t": t}), ref_slerp(e1, e2, t).reshape(base.shape))
    # default t = 0.5; orthogonal unit "models": (a + b) / sqrt 2
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(run("slerp", None, [a, b]), torch.tensor([1.0, 1.0], dtype=F64) / math.sqrt(2))


# ----------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identical_models_return_that_model(name: str) -> None:
    base = torch.randn(9, 7, generator=_gen(11))
    n = 2 if name == "slerp" else 3
    params = {"density": 0.3} if name in ("ties", "dare_linear", "dare_ties", "breadcrumbs") else {}
    if name == "ties":  # called directly (no engine pre-pass), so trim each tensor on its own
        params["trim_scope"] = "tensor"
    out = run(name, base, [base.clone() for _ in range(n)], params=params)
    # theta_0 + lambda * (something of zero task vectors) is theta_0 exactly; weight_average is computed as
    # theta_1 + mean of (theta_i - theta_1), so it is exact too; the Karcher mean of the models themselves is
    # sum_i c_i theta_i with sum_i c_i = 1 to float64 rounding
    if name == "karcher":
        assert torch.allclose(out, base, rtol=1e-6, atol=1e-7)
        return
    assert torch.equal(out.to(base.dtype), base), name


@pytest.mark.parametrize("name", ["task_arithmetic", "dare_linear"])
def test_task_arithmetic_precision_relative_to_small_task_vectors(name: str) -> None:
    # realistic fine-tuning: |theta_0| ~ 1, |tau| ~ 1e-4, 8 experts. theta_0 + sum tau_i, computed as a sum
    # of differences in float32, is within ~1 ulp of the float64 answer; the expanded form
    # theta_0 + sum theta_i - 8 theta_0 cancels ~9x larger numbers: tens of ulp, %-level task-vector error.
    g = _gen(12)
    base = torch.randn(20_000, generator=g)
    experts = [base + 1e-4 * torch.randn(20_000, generator=g) for _ in range(8)]
    b = base.to(F64)
    ref = b + sum(e.to(F64) - b for e in experts)
    params = {"density": 1.0} if name == "dare_linear" else {}
    out = run(name, base, experts, params=params)
    # in units of the float32 spacing at max(|theta_0|, |result|) (the scale of the stored weights)
    scale = torch.maximum(ref.abs(), b.abs()).float()
    ulp = (torch.nextafter(scale, torch.tensor(math.inf)) - scale).to(F64)
    excess = ((out.to(F64) - ref).abs() / ulp).max().item()
    assert excess <= 2, excess


def test_ties_one_model_density_one_equals_task_arithmetic() -> None:
    base, experts = make(1, seed=13)
    for lam, w in ((1.0, 1.0), (0.5, 2.0)):
        ties = run("ties", base, experts, [w], {"density": 1.0, "lambda": lam})
        ta = run("task_arithmetic", base, experts, [w], {"lambda": lam})
        close(ties, ta.to(F64), 1e-6)


def test_ties_agreeing_signs_density_one_is_mean_of_task_vectors() -> None:
    g = _gen(14)
    base = torch.randn(40, generator=g)
    sign = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0)
    experts = [base + sign * (torch.rand(40, generator=g) + 0.1) for _ in range(3)]  # same sign per entry
    lam = 0.6
    for election in ("mass", "count"):
        ties = run("ties", base, experts, params={"density": 1.0, "lambda": lam, "sign_election": election})
        ta_over_n = run("task_arithmetic", base, experts, params={"lambda": lam / 3})
        close(ties, ta_over_n.to(F64), 1e-6)


def test_dare_at_density_one_equals_its_base_method() -> None:
    base, experts = make(3, seed=15)
    w = [1.0, 0.5, 2.0]
    close(run("dare_linear", base, experts, w, {"density": 1.0, "lambda": 0.7}),
          run("task_arithmetic", base, experts, w, {"lambda": 0.7}).to(F64), 1e-6)
    for election in ("mass", "count"):
        for divisor in ("count", "weight"):
            p = {"density": 1.0, "lambda": 0.7, "sign_election": election, "disjoint_divisor": divisor}
            assert torch.equal(run("dare_ties", base, experts, w, p), run("ties", base, experts, w, p))


def _mc_mean(name: str, base, experts, w, params, seeds: int) -> torch.Tensor:
    acc = torch.zeros(base.shape, dtype=F64)
    for seed in range(seeds):
        acc += run(name, base, experts, w, {**params, "seed": seed}, compute_dtype=F64)
    return acc / seeds


def test_dare_linear_expected_value_is_task_arithmetic() -> None:
    # merged - theta_0 = lam sum_i w_i m_i tau_i / d with independent m_i ~ Bernoulli(d): unbiased for
    # lam sum_i w_i tau_i, per-entry variance lam^2 sum_i w_i^2 tau_i^2 (1-d)/d. With S seeds the mean's
    # standard deviation is sqrt(var / S); 6 standard deviations fail by chance with probability ~2e-9 per
    # entry (and the seeds are fixed, so the test is deterministic).
    base, experts = make(3, shape=(12,), seed=16)
    base, experts = base.to(F64), [e.to(F64) for e in experts]
    w, d, lam, S = [1.0, 0.5, 2.0], 0.5, 0.8, 1500
    mean = _mc_mean("dare_linear", base, experts, w, {"density": d, "lambda": lam}, S)
    taus = [e - base for e in experts]
    expected = base + lam * sum(wi * t for wi, t in zip(w, taus))
    var = lam**2 * sum(wi**2 * t**2 for wi, t in zip(w, taus)) * (1 - d) / d
    assert torch.all((mean - expected).abs() <= 6 * (var / S).sqrt() + 1e-12)


def test_dare_ties_expected_value() -> None:
    # One model: sign election and disjoint mean are the identity on one task vector, so E = undropped TIES.
    # Two models agreeing in sign (unit weights, count divisor): both kept (p = d^2) -> (a+b)/(2d); one kept
    # -> a/d or b/d; so E = d(a+b)/2 + (1-d)(a+b) = (1 - d/2)(a+b), NOT the undropped (a+b)/2: DARE-TIES is
    # biased upwards for N >= 2 (the 1/d rescale assumes a sum, the disjoint mean divides by the survivors).
    g = _gen(17)
    base = torch.randn(10, generator=g, dtype=F64)
    a = torch.rand(10, generator=g, dtype=F64) + 0.5
    b = torch.rand(10, generator=g, dtype=F64) + 0.5
    d, S = 0.5, 1500
    one = _mc_mean("dare_ties", base, [base + a], [1.0], {"density": d}, S)
    undropped_one = run("ties", base, [base + a], params={"density": 1.0}, compute_dtype=F64)
    # per entry: a/d w.p. d, else 0: std a sqrt((1-d)/d) / sqrt(S)
    assert torch.all((one - undropped_one).abs() <= 6 * a * math.sqrt((1 - d) / (d * S)))
    two = _mc_mean("dare_ties", base, [base + a, base + b], [1.0, 1.0], {"density": d}, S)
    expected = base + (1 - d / 2) * (a + b)
    # the per-entry value is bounded by max(a, b)/d, so its std is at most that; 6 sigma as above
    bound = 6 * torch.maximum(a, b) / d / math.sqrt(S)
    assert torch.all((two - expected).abs() <= bound)
    undropped = run("ties", base, [base + a, base + b], params={"density": 1.0}, compute_dtype=F64)
    assert torch.all((two - undropped).abs() > bound)  # the bias is real, not noise


# ------------------------------------------------------------------------------------ parameter checks


def test_unknown_parameter_names_method_and_lists_allowed() -> None:
    with pytest.raises(SpecError) as exc:
        get_method("ties").parse_params({"densty": 0.3})
    msg = str(exc.value)
    assert "'ties'" in msg and "'densty'" in msg
    for allowed in ("density", "lambda", "trim_scope", "sign_election", "disjoint_divisor"):
        assert allowed in msg
    with pytest.raises(SpecError, match="no parameters"):
        get_method("arcee_fusion").parse_params({"lambda": 1.0})


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "breadcrumbs"])
@pytest.mark.parametrize("density", [0.0, 1.5, -0.2, float("nan")])
def test_bad_density_rejected(name: str, density: float) -> None:
    with pytest.raises(SpecError, match="density") as exc:
        get_method(name).parse_params({"density": density})
    assert f"'{name}'" in str(exc.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_lambda_rejected(value: float) -> None:
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"):
        with pytest.raises(SpecError, match="lambda"):
            get_method(name).parse_params({"lambda": value})


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan")])
def test_slerp_t_outside_unit_interval_rejected(t: float) -> None:
    with pytest.raises(SpecError, match="t must be in"):
        get_method("slerp").parse_params({"t": t})
    assert get_method("slerp").parse_params({"t": 0.0}).t == 0.0
    assert get_method("slerp").parse_params({"t": 1.0}).t == 1.0


@pytest.mark.parametrize(
    ("name", "raw", "word"),
    [("ties", {"trim_scope": "layer"}, "trim_scope"), ("ties", {"sign_election": "vote"}, "sign_election"),
     ("ties", {"disjoint_divisor": "sum"}, "disjoint_divisor"), ("dare_linear", {"rescale": "l2"}, "rescale"),
     ("breadcrumbs", {"gamma": 1.0}, "gamma"), ("ties", {"density": "lots"}, "density"),
     ("ties", {"rescale": "inverse"}, r"rescale: Input should be 'none' or 'l1' \(got 'inverse'\)"),
     ("breadcrumbs", {"rescale": True}, r"rescale: Input should be 'none' or 'l1' \(got True\)"),
     ("breadcrumbs_ties", {"rescale": "l2"}, r"rescale: Input should be 'none' or 'l1' \(got 'l2'\)")],
)
def test_bad_option_values_rejected(name: str, raw: dict, word: str) -> None:
    with pytest.raises(SpecError, match=word):
        get_method(name).parse_params(raw)


def test_defaults_follow_the_papers() -> None:
    ties = get_method("ties").parse_params({})
    assert (ties.density, ties.lambda_, ties.trim_scope, ties.sign_election, ties.disjoint_divisor) == (
        0.2, 1.0, "global", "mass", "count")
    assert get_method("dare_linear").parse_params({}).rescale == "inverse"
    # 'lambda' is the public name, 'lambda_' the attribute
    assert get_method("task_arithmetic").parse_params({"lambda": 0.3}).lambda_ == 0.3


def test_get_method_suggests_close_name() -> None:
    with pytest.raises(SpecError) as exc:
        get_method("tie")
    msg = str(exc.value)
    assert "did you mean 'ties'?" in msg and "weight_average" in msg
    with pytest.raises(SpecError, match="unknown method 'zzz'"):
        get_method("zzz")


@pytest.mark.parametrize("bad", [{"density": True}, {"density": "0.5"}, {"lambda": "1"}, {"seed": 1.5}])
def test_parameters_are_strictly_typed(bad: dict) -> None:
    method = get_method("dare_ties")
    with pytest.raises(SpecError, match="invalid parameter for method 'dare_ties'"):
        method.parse_params(bad)


def test_ties_global_scope_without_thresholds_is_an_error() -> None:
    base, experts = make(2, seed=3)
    p = get_method("ties").parse_params({"density": 0.5})
    with pytest.raises(ValueError, match="needs whole-model thresholds"):
        kernel("ties")(TensorInputs("w", base, experts, [1.0, 1.0]), p)


def test_every_method_fact_of_the_analysis_and_experiments_comes_from_the_catalog():
    """Diagnostics' operators, the bound's operators and coefficients, and compare's validation grids are
    read from the catalog's traits (Method.operator, sparsify, combination, validation_grid), never listed
    apart: each derived table equals what the catalog says, and each operator T is the method's own
    sparsification step (then the sign consensus for a disjoint mean)."""
    import torch

    from mergelab.analysis import diagnostics, excess_bound
    from mergelab.analysis.merge_coefficients import merge_coefficients
    from mergelab.experiments import comparison_rows
    from mergelab.methods.catalog import METHODS as CATALOG_METHODS

    with_operator = {m.name: m for m in CATALOG_METHODS.values() if m.operator is not None}
    assert diagnostics.OPERATORS == ("sign", "trim", *(m.operator for m in with_operator.values()))
    assert excess_bound.MERGE_OPERATORS == {name: m.operator for name, m in with_operator.items()}
    for m in CATALOG_METHODS.values():
        assert (m.operator is None) == (m.sparsify is None), m.name
        rule = merge_coefficients(m.name, {}, [1.0, 3.0]).alphas
        expected = {"sum": (1.0, 3.0), "disjoint_mean": (0.25, 0.75), "mean": (0.25, 0.75),
                    "interpolation": (0.25, 0.75), "spectral": (1.0, 3.0)}[m.combination]
        assert rule == pytest.approx(expected), m.name
    for row in comparison_rows.CATALOG.values():
        if row.method in CATALOG_METHODS:
            assert dict(row.grid) == dict(CATALOG_METHODS[row.method].validation_grid), row.name
    # the operator of a method is its catalog sparsification step (plus the consensus for TIES-like ones)
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(200, generator=g) for _ in range(3)]
    config = diagnostics.DiagnosticsConfig(density=0.4, seed=3)
    for name, m in with_operator.items():
        p = m.parse_params({"density": 0.4, **({"seed": 3} if "seed" in m.params.model_fields else {}),
                            **({"trim_scope": "tensor"} if name == "ties" else {})})
        expected = m.sparsify(list(taus), TensorInputs("w", None, [], [1.0] * 3), p)
        if m.combination == "disjoint_mean":
            expected = diagnostics.sign_consensus(expected, [1.0] * 3)
        got = diagnostics.apply_operator(m.operator, taus, [1.0] * 3, config, name="w")
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
