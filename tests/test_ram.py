"""RAM and RAM+ (``ram``, ``ramplus_tl``; Yuan et al. 2026, arXiv 2601.13572): closed forms on hand-built
tensors (unique entries pass through, shared ones are averaged, entries below epsilon dropped;
``lambda_i = 1 + r clamp(rho_i, 0, alpha)``), the operators of :mod:`mergelab.ops.overlap`, the block kernels
against the references with blocks smaller than the tensor, and the stacked formula (mergekit's form) bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab import ops
from mergelab.errors import SpecError
from mergelab.merging.torch_backend import kernel
from mergelab.methods import TensorInputs, get_method
from mergelab.ops import blocks as blocks_mod

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)

#: three task vectors of six entries (dyadic values, exact in float32):
#: entry 0 only model 1 changed; 1 models 1, 2; 2 only model 3; 3 model 1 below epsilon (2^-20 < 1e-5);
#: 4 models 1, 2; 5 all three.
TAUS = [
    [0.5, 0.25, 0.0, 2.0 ** -20, -0.25, 0.5],
    [0.0, 0.75, 0.0, 0.0, -0.5, 0.25],
    [0.0, 0.0, 0.75, 0.0, 0.0, 0.75],
]
BASE = [1.0, 2.0, -3.0, 4.0, 5.0, -6.0]


def _inputs(dtype=torch.float32, shape=(6,)):
    base = torch.tensor(BASE, dtype=dtype).reshape(shape)
    experts = [(torch.tensor(BASE) + torch.tensor(t)).to(dtype).reshape(shape) for t in TAUS]
    return TensorInputs("w", base, experts, [1.0, 1.0, 1.0])


def _both(name, inp, params=None):
    method = get_method(name)
    p = method.parse_params(params or {})
    ref = method.reference(inp, p)
    out = kernel(name)(inp, p)
    assert torch.equal(out, ref), name
    return out


@pytest.mark.parametrize("block", [4, 1 << 18])
def test_ram_by_hand(monkeypatch, block):
    """Unique entries pass through (0.5, 0.75), shared ones are averaged ((0.25 + 0.75)/2 = 0.5, (-0.25 - 0.5)/2
    = -0.375, (0.5 + 0.25 + 0.75)/3 = 0.5), the entry below epsilon stays at the base; blocks of 4 and one block."""
    monkeypatch.setattr(blocks_mod, "BLOCK", block)
    out = _both("ram", _inputs())
    merged = [0.5, 0.5, 0.75, 0.0, -0.375, 0.5]
    expect = torch.tensor([b + m for b, m in zip(BASE, merged)])
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
    assert out[3] == BASE[3]  # 2^-20 is below epsilon 1e-5: dropped
    # a larger epsilon drops model 1's 0.25 at entry 1 (unique to model 2 now) and entry 4's -0.25
    out = _both("ram", _inputs(), {"epsilon": 0.3})
    merged = [0.5, 0.75, 0.75, 0.0, -0.5, (0.5 + 0.75) / 2]
    torch.testing.assert_close(out, torch.tensor([b + m for b, m in zip(BASE, merged)]), rtol=0, atol=1e-6)


def test_ram_ignores_nothing_but_small_changes_and_needs_unit_weights():
    """A model alone (N = 1) is returned where it moved more than epsilon; per-model weights are rejected by the
    method's traits (uses_weights false), as the paper and mergekit take none."""
    inp = _inputs()
    one = TensorInputs("w", inp.base, inp.experts[:1], [1.0])
    out = _both("ram", one)
    expect = inp.experts[0].clone()
    expect[3] = inp.base[3]
    assert torch.equal(out, expect)
    assert not get_method("ram").uses_weights and not get_method("ramplus_tl").uses_weights


@pytest.mark.parametrize("block", [4, 1 << 18])
def test_ramplus_by_hand(monkeypatch, block):
    """Per-tensor counts: model 1 changed entries 0, 1, 4, 5 (S = 3 shared, U = 1 unique: rho 3), model 2 only
    shared ones (U = 0: nothing to scale), model 3 entries 2, 5 (S = 1, U = 1: rho 1). With r 0.5, alpha 2:
    lambda_1 = 1 + 0.5 * 2 = 2, lambda_3 = 1 + 0.5 * 1 = 1.5; unique entries 0.5 * 2 = 1 and 0.75 * 1.5 = 1.125,
    shared entries as RAM. Blocks of 4 split the counts over two blocks."""
    monkeypatch.setattr(blocks_mod, "BLOCK", block)
    out = _both("ramplus_tl", _inputs(), {"r": 0.5, "alpha": 2.0})
    merged = [1.0, 0.5, 1.125, 0.0, -0.375, 0.5]
    torch.testing.assert_close(out, torch.tensor([b + m for b, m in zip(BASE, merged)]), rtol=0, atol=1e-6)
    # defaults r 0.1, alpha 0.2: both ratios (3 and 1) are capped, lambda = 1 + 0.1 * 0.2 = 1.02 (float32)
    out = _both("ramplus_tl", _inputs())
    lam = float(np.float32(1) + np.float32(0.1) * np.float32(0.2))
    assert out[0] == torch.tensor(BASE[0]) + torch.tensor(0.5) * lam
    assert out[2] == torch.tensor(BASE[2]) + torch.tensor(0.75) * lam
    # r 0: RAM exactly
    assert torch.equal(_both("ramplus_tl", _inputs(), {"r": 0.0}), _both("ram", _inputs()))


def test_unique_scale_in_float32():
    """lambda = 1 + r clamp(S/U, 0, alpha), each step rounded to float32; U = 0: 1 + r alpha (or 1 if S = 0)."""
    f = np.float32
    assert ops.unique_scale(3, 1, 0.5, 2.0) == 2.0
    assert ops.unique_scale(1, 1, 0.5, 2.0) == 1.5
    assert ops.unique_scale(0, 4, 0.5, 2.0) == 1.0
    assert ops.unique_scale(1, 3, 0.1, 0.5) == float(f(1) + f(0.1) * (f(1) / f(3)))
    assert ops.unique_scale(1, 3, 0.1, 0.2) == float(f(1) + f(0.1) * f(0.2))
    assert ops.unique_scale(5, 0, 0.1, 0.2) == float(f(1) + f(0.1) * f(0.2))
    assert ops.unique_scale(0, 0, 0.1, 0.2) == 1.0
    # counts beyond 2^24 are rounded to float32 before the division (as torch divides int64 by float32)
    big = 2 ** 24 + 1
    assert ops.unique_scale(big, 3 * big, 1.0, 1.0) == float(f(1) + f(f(big) / f(3 * big)))


def test_overlap_operators():
    taus = [torch.tensor(t) for t in TAUS]
    masks = ops.active_masks(taus, 1e-5)
    count = ops.active_count(masks)
    assert count.tolist() == [1, 2, 1, 0, 2, 3]
    assert ops.shared_unique_counts(masks, count) == [(3, 1), (3, 0), (1, 1)]
    merged = ops.overlap_merge(taus, masks, count, [2.0, 1.0, 1.5])
    torch.testing.assert_close(merged, torch.tensor([1.0, 0.5, 1.125, 0.0, -0.375, 0.5]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        ops.overlap_merge(taus, masks[:2], count)


def _stacked(base, experts, epsilon, r=None, alpha=None):
    """The stacked form of the formula (as mergekit writes it): tau (N, n), m = |tau| > eps, c = sum m,
    terms (tau m)[c == 1] lambda + (tau m)[c > 1] / max(c, 1), summed over the models; lambda from the
    per-model counts of the whole tensor."""
    tau = torch.stack([e.float() - base.float() for e in experts]).reshape(len(experts), -1)
    m = tau.abs() > epsilon
    c = m.sum(0, keepdim=True)
    unique, shared = c == 1, c > 1
    tz = tau * m
    if r is None:
        merged = (tz * unique + tz * shared / c.clamp(min=1)).sum(0)
    else:
        s_counts = (m & shared).sum(1)
        u_counts = (m & unique).sum(1)
        rho = s_counts / u_counts.clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        merged = (tz * unique * lam.unsqueeze(-1) + tz * shared / c.clamp(min=1)).sum(0)
    return base.float() + merged.reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_experts", [2, 3, 4])
def test_stacked_formula_bit_for_bit(monkeypatch, dtype, n_experts):
    """Sparse random task vectors (each entry changed with probability 0.4, so unique, shared and unchanged
    entries all occur): the reference and the block kernel (blocks of 37) equal the stacked formula bit for
    bit, RAM and RAM+ (float32 compute; bf16 inputs)."""
    monkeypatch.setattr(blocks_mod, "BLOCK", 37)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 25, generator=g).to(dtype)
    experts = [(base.float() + 0.05 * torch.randn(40, 25, generator=g) * (torch.rand(40, 25, generator=g) < 0.4))
               .to(dtype) for _ in range(n_experts)]
    inp = TensorInputs("w", base, experts, [1.0] * n_experts)
    for eps in (1e-5, 0.02):
        assert torch.equal(_both("ram", inp, {"epsilon": eps}), _stacked(base, experts, eps))
        for r, alpha in ((0.1, 0.2), (0.5, 3.0)):
            out = _both("ramplus_tl", inp, {"epsilon": eps, "r": r, "alpha": alpha})
            assert torch.equal(out, _stacked(base, experts, eps, r, alpha))


def test_params_are_validated():
    for name, params in (("ram", {"epsilon": -1.0}), ("ramplus_tl", {"r": float("inf")}),
                         ("ramplus_tl", {"alpha": -0.1}), ("ram", {"r": 0.1})):
        with pytest.raises(SpecError):
            get_method(name).parse_params(params)
