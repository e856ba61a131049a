"""Tests of issue 15's methods (della, della_linear, breadcrumbs_ties, sce, nuslerp, multislerp, karcher,
nearswap, arcee_fusion, passthrough) and of breadcrumbs' exact band: each against a closed form or the
paper's formula written independently (float64, explicit loops), random ones statistically."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab import ops
from mergelab.merging.torch_backend import kernel
from mergelab.methods import TensorInputs, get_method

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)


def run(name, base, experts, weights=None, params=None, *, reference=False, tensor="w"):
    method = get_method(name)
    weights = [1.0] * len(experts) if weights is None else weights
    p = method.parse_params(params or {})
    fn = method.reference if reference else kernel(method)
    return fn(TensorInputs(tensor, base, experts, weights), p)


def both(name, base, experts, weights=None, params=None):
    """The reference and the torch back-end's kernel, asserted equal; returns the result."""
    ref = run(name, base, experts, weights, params, reference=True)
    out = run(name, base, experts, weights, params)
    assert torch.equal(out, ref), name
    return out


def ref_consensus(taus, weights, divisor="count"):
    """TIES's sign election (by mass, 0 on a tie) and disjoint mean, entry by entry with Python loops."""
    flat = [t.reshape(-1).tolist() for t in taus]
    out = []
    for j in range(len(flat[0])):
        vals = [f[j] for f in flat]
        s = sum(w * v for w, v in zip(weights, vals))
        gamma = (s > 0) - (s < 0)
        agree = [i for i, v in enumerate(vals) if v != 0 and ((v > 0) - (v < 0)) == gamma]
        if not agree or gamma == 0:
            out.append(0.0)
            continue
        num = sum(weights[i] * vals[i] for i in agree)
        den = {"count": len(agree), "weight": sum(weights[i] for i in agree), "none": 1.0}[divisor]
        out.append(num / den)
    return torch.tensor(out, dtype=F64).reshape(taus[0].shape)


# ------------------------------------------------------------------------------------------ breadcrumbs


def test_breadcrumbs_keeps_an_exact_count_on_tied_magnitudes():
    """All |tau| equal (bf16's tied magnitudes taken to the limit): n = 80, density 0.8, gamma 0.1 keep exactly
    n_keep = 64 entries, ranks 8..71 in flat order (the top 8 are the outliers), as trim breaks ties. The old
    band by value (low <= |tau| < high with low == high) kept none."""
    base = torch.zeros(80)
    signs = torch.tensor([1.0, -1.0] * 40)
    expert = base + 0.5 * signs
    for dtype in (torch.float32, torch.bfloat16):
        out = both("breadcrumbs", base.to(dtype), [expert.to(dtype)], params={"density": 0.8, "gamma": 0.1})
        kept = (out != 0).nonzero().squeeze(1).tolist()
        assert kept == list(range(8, 72))
        assert torch.equal(out[8:72], expert[8:72])


def test_breadcrumbs_band_by_rank_with_partial_ties():
    """Magnitudes 5 5 4 4 4 3 3 2 1 1 (n = 10), gamma 0.1 (n_top 1), density 0.5 (n_keep 5): sorted by
    decreasing |tau| with ties by position the ranks 1..5 are entries 1, 2, 3, 4, 5."""
    tau = torch.tensor([5.0, -5, 4, 4, -4, 3, 3, 2, 1, 1])
    out = ops.trim_band(tau, 0.5, 0.1)
    assert (out != 0).nonzero().squeeze(1).tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(out[1:6], tau[1:6])


# ------------------------------------------------------------------------------------------------ DELLA


def test_magprune_probabilities_follow_the_paper_and_mergekit_spacings():
    """One row of magnitudes 4 3 2 1 (shuffled), p = 1 - density = 0.5, epsilon 0.2: the paper's drop
    probabilities p_i = p - eps/2 + eps r_i / n are 0.40 0.45 0.50 0.55 by decreasing magnitude; mergekit's
    keep probabilities density -+ eps (eps 0.1 half width) are linear in the ascending rank: 0.6 .. 0.4."""
    mag = torch.tensor([[2.0, 4.0, 1.0, 3.0]])
    paper = ops.magprune_keep_probabilities(mag, 0.5, 0.2, "paper")
    assert torch.allclose(paper, 1 - torch.tensor([[0.50, 0.40, 0.55, 0.45]]))
    mk = ops.magprune_keep_probabilities(mag, 0.5, 0.1, "mergekit")
    assert torch.allclose(mk, torch.tensor([[0.4 + 0.2 / 3, 0.6, 0.4, 0.4 + 0.4 / 3]]))
    # ranks are per row (output node): each row of a matrix gets the whole spread
    rows = ops.magprune_keep_probabilities(torch.tensor([[1.0, 2.0], [20.0, 10.0]]), 0.5, 0.2, "paper")
    assert torch.allclose(rows, torch.tensor([[0.5, 0.6], [0.6, 0.5]]))


def test_descending_order_ranks_by_magnitude_then_position():
    """Hand-built ties: rows 3 1 3 0 1 3 and 0 2 0 2 give positions 0 2 5 1 4 3 and 1 3 0 2 (equal values in
    position order); -0 ties with +0. Values that differ only in their float32 bits' low half (1 and the
    next floats above it) take the radix sort's low pass: 1+2u 1 1+u 1+2u 1 -> 0 3 2 1 4. The same as
    torch's stable descending sort on a tied random matrix, and per row."""
    mag = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0, 3.0]])
    assert ops.descending_order(mag).tolist() == [[0, 2, 5, 1, 4, 3]]
    assert ops.descending_order(torch.tensor([[0.0, 2.0, -0.0, 2.0]])).tolist() == [[1, 3, 0, 2]]
    one = torch.tensor(1.0)
    up = torch.nextafter(one, torch.tensor(2.0))
    up2 = torch.nextafter(up, torch.tensor(2.0))
    row = torch.stack([up2, one, up, up2, one]).reshape(1, 5)
    assert ops.descending_order(row).tolist() == [[0, 3, 2, 1, 4]]
    # one entry in 16 off bf16 (the merge sort of the nearly sorted key): 1 1+u 1 ... 1 2 -> 15 1 0 2 3 .. 14
    row = torch.ones(1, 16)
    row[0, 1], row[0, 15] = up, 2.0
    assert ops.descending_order(row).tolist() == [[15, 1, 0] + list(range(2, 15))]
    g = torch.Generator().manual_seed(0)
    tied = torch.randint(0, 6, (7, 300), generator=g).float() * (1 + torch.rand(1, 300, generator=g) * 1e-6)
    few = tied.bfloat16().float()
    few[:, ::20] = tied[:, ::20]  # one entry in 20 off bf16
    for x in (tied, tied.double(), tied[:, :1], tied[:1], few, few.bfloat16()):
        assert torch.equal(ops.descending_order(x), torch.sort(x.float(), dim=1, descending=True, stable=True).indices)
    # by_rank puts the value of rank k at the entry of rank k: the probabilities of the test above
    table = ops.magprune_rank_probabilities(4, 0.5, 0.2, "paper")
    assert torch.allclose(table, 1 - torch.tensor([0.40, 0.45, 0.50, 0.55]))
    assert torch.equal(ops.by_rank(ops.descending_order(torch.tensor([[2.0, 4.0, 1.0, 3.0]])), table),
                       table[torch.tensor([[2, 0, 3, 1]])])


def test_magprune_keep_frequency_and_unbiasedness_match_the_probabilities():
    """Over 4000 seeds, each entry's keep frequency is its keep probability 1 - p_i (within 4.5 standard
    errors), and with the paper's 1/(1 - p_i) rescaling the mean of the pruned vector is tau."""
    tau = torch.tensor([[0.3, -1.0, 0.7, 0.1, -0.5, 0.9, -0.2, 0.6, 0.05, -0.8]])
    density, eps, runs = 0.4, 0.3, 4000
    q = ops.magprune_keep_probabilities(tau.abs(), density, eps, "paper")[0].double()
    kept = torch.zeros(10, dtype=F64)
    total = torch.zeros(10, dtype=F64)
    for seed in range(runs):
        out = ops.magprune(tau, density, eps, generator=torch.Generator().manual_seed(seed))[0].double()
        kept += out != 0
        total += out
    freq = kept / runs
    se = (q * (1 - q) / runs).sqrt()
    assert ((freq - q).abs() <= 4.5 * se).all(), (freq, q)
    # the largest magnitude has the highest keep probability, the smallest the lowest; the paper's ranks
    # 0..n-1 make the mean keep probability density + eps / (2 n)
    assert q[1] == q.max() and q[8] == q.min() and abs(float(q.mean()) - (density + eps / 20)) < 1e-6
    mean = total / runs
    se_mean = (tau[0].double().abs() * ((1 - q) / q / runs).sqrt())
    assert ((mean - tau[0].double()).abs() <= 4.5 * se_mean).all()


def _della_expected(base, experts, weights, p, inp_name="w"):
    """DELLA by the paper's formula, float64: masks u < q from the documented generators, tau m / q."""
    b = base.to(F64)
    pruned = []
    for i, e in enumerate(experts):
        tau = e.to(F64) - b
        rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
        n = rows.shape[1]
        q = torch.empty_like(rows)
        for r in range(rows.shape[0]):
            order = sorted(range(n), key=lambda j: (-abs(float(rows[r, j])), j))
            for rank, j in enumerate(order):
                q[r, j] = 1 - ((1 - p["density"]) - p["epsilon"] / 2 + p["epsilon"] * rank / n)
        q = q.reshape(tau.shape)
        u = torch.rand(tau.shape, generator=TensorInputs(inp_name, None, [], []).generator(p["seed"], i))
        mask = u < q.float()
        pruned.append(tau * mask / q)
    return b, pruned


def test_della_equals_the_paper_formula():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, generator=g)
    experts = [base + torch.randn(6, 7, generator=g) for _ in range(3)]
    p = {"density": 0.6, "epsilon": 0.2, "seed": 5, "lambda": 0.8}
    weights = [1.0, 0.5, 2.0]
    b, pruned = _della_expected(base, experts, weights, p)
    expect = b + 0.8 * ref_consensus(pruned, weights)
    assert torch.allclose(both("della", base, experts, weights, p).double(), expect, atol=1e-5)
    linear = b + 0.8 * sum(w * t for w, t in zip(weights, pruned))
    assert torch.allclose(both("della_linear", base, experts, weights, p).double(), linear, atol=1e-5)


def test_della_mergekit_options_and_validation():
    """spacing mergekit + rescale l1 (mergekit's della): the kept entries are rescaled by ||tau||_1/||m tau||_1."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 8, generator=g)
    expert = base + torch.randn(5, 8, generator=g)
    p = {"density": 0.5, "epsilon": 0.15, "spacing": "mergekit", "rescale": "l1", "seed": 2}
    out = both("della_linear", base, [expert], params=p) - base
    tau = expert - base
    mask = out != 0
    assert torch.allclose(out[mask], tau[mask] * tau.abs().sum() / tau[mask].abs().sum(), rtol=1e-5)
    with pytest.raises(Exception, match="epsilon"):
        get_method("della").parse_params({"density": 0.9, "epsilon": 0.15, "spacing": "mergekit"})


# ------------------------------------------------------------------------------------- breadcrumbs_ties


def _band_by_sort(tau: torch.Tensor, top: int, keep: int) -> torch.Tensor:
    """``tau`` kept at the magnitude ranks ``top .. top + keep - 1`` of a full sort (ties by position)."""
    order = sorted(range(tau.numel()), key=lambda j: (-abs(float(tau[j])), j))
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[order[top:top + keep]] = True
    return tau * mask


def test_breadcrumbs_ties_is_the_band_then_the_consensus():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(40, generator=g)
    experts = [base + torch.randn(40, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    b = base.to(F64)
    banded = [_band_by_sort(e.to(F64) - b, 4, 20) for e in experts]  # gamma 0.1 -> n_top 4, density 0.5 -> 20
    for divisor in ("count", "weight", "none"):
        out = both("breadcrumbs_ties", base, experts, weights,
                   {"density": 0.5, "gamma": 0.1, "disjoint_divisor": divisor, "lambda": 0.7})
        assert torch.allclose(out.double(), b + 0.7 * ref_consensus(banded, weights, divisor), atol=1e-5)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties", "ties"])
def test_rescale_l1_is_the_sparsified_vector_times_its_l1_ratio(name):
    """``rescale: l1`` (mergekit's ``rescale: true``): each expert's band (trim) times
    ||tau_i||_1 / ||band(tau_i)||_1, per model, before the weights and the consensus; against a float64
    construction (full sort, ties by position), reference and kernel equal."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, generator=g)
    experts = [base + torch.randn(40, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    b = base.to(F64)
    kept = []
    top, n_keep = (0, 12) if name == "ties" else (4, 20)  # ties: density 0.3; band: gamma 0.1, density 0.5
    for e in experts:
        tau = e.to(F64) - b
        band = _band_by_sort(tau, top, n_keep)
        kept.append(band * (tau.abs().sum() / band.abs().sum()))
    params = ({"density": 0.3, "trim_scope": "tensor"} if name == "ties" else {"density": 0.5, "gamma": 0.1})
    out = both(name, base, experts, weights, {**params, "rescale": "l1", "lambda": 0.7})
    if name == "breadcrumbs":
        expected = b + 0.7 * sum(w * t for w, t in zip(weights, kept))
    else:
        expected = b + 0.7 * ref_consensus(kept, weights, "count")
    assert torch.allclose(out.double(), expected, atol=1e-5)
    plain = both(name, base, experts, weights, {**params, "lambda": 0.7})
    assert not torch.allclose(out, plain, atol=1e-3)


# ------------------------------------------------------------------------------------------------- SCE


def test_sce_by_hand():
    """Task vectors (1, 2, 0, -1), (1, -2, 0, 3), (1, 2, 0, 1): variances 0, 32/9, 0, 8/3. select_topk 0.5 keeps
    floor(0.5 * 2) = 1 entry (entry 1); energies 1, 1, 1; sign +; the agreeing models 1 and 3: 2. Without
    selection: energies 1.5, 3.5, 1.5 -> weights 3/13, 7/13, 3/13; entries 1, 2, 0, (7*3 + 3*1)/10 = 2.4."""
    base = torch.tensor([0.5, -1.0, 2.0, 0.0])
    taus = [torch.tensor([1.0, 2, 0, -1]), torch.tensor([1.0, -2, 0, 3]), torch.tensor([1.0, 2, 0, 1])]
    experts = [base + t for t in taus]
    assert torch.allclose(ops.expert_variance(taus), torch.tensor([0.0, 32 / 9, 0, 8 / 3]))
    out = both("sce", base, experts, params={"select_topk": 0.5})
    assert torch.allclose(out, base + torch.tensor([0.0, 2, 0, 0]))
    out = both("sce", base, experts)
    assert torch.allclose(out, base + torch.tensor([1.0, 2, 0, 2.4]), atol=1e-6)
    assert ops.energy_weights([6.0, 14.0, 6.0], 4) == pytest.approx([3 / 13, 7 / 13, 3 / 13])
    assert ops.energy_weights([1e-7, 1e-7], 1, 1e-6) == [0.5, 0.5]  # mergekit's floor


# ------------------------------------------------------------------------------------ spherical methods


def test_nuslerp_closed_forms():
    """Orthogonal unit vectors at t = w_1/(w_0 + w_1): (sin((1-t) pi/2), sin(t pi/2)); colinear ones lerp;
    with a base the task vectors are interpolated and the base added back."""
    e1, e2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 0])
    out = both("nuslerp", None, [e1, 3 * e2], [1.0, 3.0])
    c = math.sin(0.25 * math.pi / 2), 3 * math.sin(0.75 * math.pi / 2)
    assert torch.allclose(out, torch.tensor([c[0], c[1], 0, 0]), atol=1e-6)
    base = torch.tensor([1.0, 2, 3, 4])
    assert torch.allclose(both("nuslerp", base, [base + e1, base + e2]), base + (e1 + e2) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(both("nuslerp", None, [e1, 2 * e1], [1.0, 1.0]), 1.5 * e1)


def test_nuslerp_row_wise_interpolates_each_row_or_column():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    def slerp64(x, y, t):
        x, y = x.double(), y.double()
        om = math.acos(float(x @ y) / float(x.norm() * y.norm()))
        return (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)

    out = both("nuslerp", None, [a, b], [1.0, 1.0], {"flatten": False}).double()
    assert torch.allclose(out, torch.stack([slerp64(a[r], b[r], 0.5) for r in range(3)]), atol=1e-5)
    out = both("nuslerp", None, [a, b], [2.0, 1.0], {"flatten": False, "row_wise": True}).double()
    cols = torch.stack([slerp64(a[:, c], b[:, c], 1 / 3) for c in range(5)], dim=1)
    assert torch.allclose(out, cols, atol=1e-5)


def _multislerp_tangent(xs, w, eps=1e-8):
    """Multi-SLERP as the blog writes it, float64 vectors: tangent space at the mean, exponential map back."""
    xs = [x.double().reshape(-1) for x in xs]
    w = torch.tensor(w, dtype=F64) / sum(w)
    norms = torch.stack([x.norm() for x in xs])
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = tangent.norm() + eps
    return (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms * w).sum()


def test_multislerp_closed_form_and_the_tangent_space_algorithm():
    """2 e1 and 4 e2 at equal weights: direction (e1 + e2)/sqrt 2, norm 3. Random vectors: the coefficients
    equal the blog's tangent-space algorithm (whose tangent mean vanishes) to float32 rounding."""
    e1, e2 = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    out = both("multislerp", None, [2 * e1, 4 * e2])
    assert torch.allclose(out, 3 * (e1 + e2) / math.sqrt(2), atol=1e-6)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(4, 6, generator=g)
    experts = [base + torch.randn(4, 6, generator=g) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    out = both("multislerp", base, experts, w)
    expect = _multislerp_tangent([e - base for e in experts], w).reshape(4, 6) + base.double()
    assert torch.allclose(out.double(), expect, atol=1e-5)


def _karcher_vectors(xs, w, max_iter=100, tol=1e-12):
    """The Karcher mean iteration on float64 vectors (log maps averaged, exponential map), times the mean norm."""
    xs = [x.double().reshape(-1) for x in xs]
    a = torch.tensor(w, dtype=F64) / sum(w)
    norms = [x.norm() for x in xs]
    us = [x / n for x, n in zip(xs, norms)]
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = u / u.norm()
    for _ in range(max_iter):
        t = torch.zeros_like(u)
        for ai, ui in zip(a, us):
            d = torch.clamp(u @ ui, -1, 1)
            th = torch.arccos(d)
            if th > tol:
                t += ai * th / torch.sin(th) * (ui - d * u)
        if t.norm() < tol:
            break
        u = torch.cos(t.norm()) * u + torch.sin(t.norm()) * t / t.norm()
        u = u / u.norm()
    return u * sum(ai * n for ai, n in zip(a, norms))


def test_karcher_mean_closed_forms():
    """Two directions at weights 1 and 3: the geodesic point at t = 3/4 (SLERP), scaled by 0.25 |x_1| + 0.75
    |x_2|; three orthonormal directions at equal weights: (e1 + e2 + e3)/sqrt 3 by symmetry."""
    x1, x2 = torch.tensor([2.0, 0, 0]), torch.tensor([1.0, 1.0, 0])
    out = both("karcher", None, [x1, x2], [1.0, 3.0], {"max_iter": 50, "tol": 1e-9})
    om = math.pi / 4
    u = (math.sin(0.25 * om) * x1 / 2 + math.sin(0.75 * om) * x2 / math.sqrt(2)) / math.sin(om)
    assert torch.allclose(out, u * (0.25 * 2 + 0.75 * math.sqrt(2)), atol=1e-6)
    eye = [torch.eye(3)[i] * (i + 1) for i in range(3)]
    out = both("karcher", None, eye)
    assert torch.allclose(out, torch.ones(3) / math.sqrt(3) * 2.0, atol=1e-6)
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(5, 4, generator=g) + 1.0 for _ in range(4)]
    w = [1.0, 2.0, 0.5, 1.5]
    out = both("karcher", None, xs, w, {"max_iter": 100, "tol": 1e-10})
    assert torch.allclose(out.double().reshape(-1), _karcher_vectors(xs, w), atol=1e-5)


# ------------------------------------------------------------------------------- nearswap, fusion, copy


def test_nearswap_by_hand():
    """a = 0, b = (5e-5, 1e-4, 2e-4, 1), t = 1e-4: w = 1, 1, 0.5, 1e-4 -> 5e-5, 1e-4, 1e-4, 1e-4."""
    a = torch.zeros(4)
    b = torch.tensor([5e-5, 1e-4, 2e-4, 1.0])
    out = both("nearswap", a, [b])
    assert torch.allclose(out, torch.tensor([5e-5, 1e-4, 1e-4, 1e-4]), rtol=1e-6)
    assert torch.allclose(both("nearswap", a, [b], params={"t": 0.5}), torch.tensor([5e-5, 1e-4, 2e-4, 0.5]))


def test_arcee_fusion_takes_the_outlying_importance():
    """1-D: one row, so the importance is |b - a| times one KL divergence; differences 0..7 and 100 (n = 9):
    q1, median, q3 = sorted[2], [4], [6] = 2, 4, 6 (times KL), threshold (4 + 1.5 * 4) KL: only the last entry."""
    a = torch.zeros(9)
    diff = torch.tensor([3.0, 0, 7, 1, 100, 5, 2, 6, 4])
    b = a + diff * 0.01
    out = both("arcee_fusion", a, [b])
    expect = a.clone()
    expect[4] = b[4]
    assert torch.equal(out, expect)
    # 2-D: the KL divergence is per row (last axis); checked against its formula
    g = torch.Generator().manual_seed(11)
    a2 = torch.randn(30, 8, generator=g)
    b2 = a2 + 0.3 * torch.randn(30, 8, generator=g) * (torch.rand(30, 1, generator=g) > 0.7)
    p_, q_ = torch.softmax(b2.double(), -1) + 1e-8, torch.softmax(a2.double(), -1) + 1e-8
    imp = (b2 - a2).double().abs() * (p_ * (p_ / q_).log()).sum(-1, keepdim=True)
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    thr = s[int(0.5 * (n - 1))] + 1.5 * (s[int(0.75 * (n - 1))] - s[int(0.25 * (n - 1))])
    out = both("arcee_fusion", a2, [b2])
    changed = out != a2
    assert changed.any() and torch.equal(changed, (imp >= thr) & (b2 != a2))


def test_fusion_merge_is_the_base_plus_the_kept_differences_with_signed_zeros():
    """``a + d [s >= t]``: kept entries a + d, the others a + (+-0): -0.0 + (+0.0) = +0.0 where d > 0 is
    dropped at a = -0.0, as a float product by the mask gives (the numpy path on the CPU, torch's elsewhere)."""
    a = torch.tensor([1.0, -0.0, -0.0, 2.0, 5.0])
    d = torch.tensor([0.5, 3.0, -3.0, -1.0, 0.25])
    s = torch.tensor([2.0, 0.5, 0.5, 1.0, 0.999])
    out = ops.fusion_merge(a, d.clone(), s, 1.0)
    assert out.tolist() == [1.5, 0.0, -0.0, 1.0, 5.0]
    assert [math.copysign(1.0, v) for v in out.tolist()] == [1.0, 1.0, -1.0, 1.0, 1.0]
    assert torch.equal(out.view(torch.int32), (a + d * (s >= 1.0)).view(torch.int32))
    assert torch.equal(ops.fusion_importance_of(d, torch.tensor(2.0)), d.abs() * 2.0)


def test_passthrough_copies_the_model():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(both("passthrough", None, [x]), x)
    assert torch.equal(both("passthrough", None, [x], params={"scale": 0.5}), x * 0.5)
