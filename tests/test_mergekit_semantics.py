"""mergekit's semantics as options of the native spec, each against a tensor computed by hand.

``disjoint_divisor: none`` (mergekit's ``normalize: false``), ``sign_test: weighted`` (mergekit tests the
sign of w_i tau_i), slerp's ``parallel_threshold`` (mergekit 0.9995), model stock's ``extrapolate`` and
``filter_wise``, and per-model parameters / per-tensor weights (mergekit's per-model ``density``,
gradient ``weight``). Both the catalog reference and the torch back-end's kernel are run.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import SpecError
from mergelab.merging.plan import ParamResolver
from mergelab.merging.torch_backend import kernel
from mergelab.methods import TensorInputs, get_method
from mergelab.spec import parse_spec


def run(name, base, experts, weights, params, model_params=None, *, use_kernel=True) -> torch.Tensor:
    method = get_method(name)
    p = method.parse_params(params)
    inp = TensorInputs("layer.weight", base, experts, weights, model_params=model_params,
                       compute_dtype=base.dtype)
    fn = kernel(method) if use_kernel and model_params is None else method.reference
    return fn(inp, p)


TIES_TENSOR = {"density": 1.0, "trim_scope": "tensor"}


@pytest.mark.parametrize("use_kernel", [True, False])
def test_disjoint_divisor_none_is_the_plain_sum_of_agreeing_entries(use_kernel):
    base = torch.tensor([10.0, 20.0])
    taus = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([-1.0, -4.0])]
    experts = [base + t for t in taus]
    # entry 0: mass 1+3-1 = 3 > 0, agreeing 1 and 3; entry 1: mass 2-1-4 = -3 < 0, agreeing -1 and -4
    summed = run("ties", base, experts, [1.0] * 3, {**TIES_TENSOR, "disjoint_divisor": "none"}, use_kernel=use_kernel)
    assert summed.tolist() == [10.0 + 4.0, 20.0 - 5.0]
    mean = run("ties", base, experts, [1.0] * 3, TIES_TENSOR, use_kernel=use_kernel)
    assert mean.tolist() == [10.0 + 2.0, 20.0 - 2.5]
    # weights 2, 1, 1: sum 2*1 + 3 = 5 and -1 - 4 = -5; agreeing-weight mean 5/3 and -5/2
    w = [2.0, 1.0, 1.0]
    assert run("ties", base, experts, w, {**TIES_TENSOR, "disjoint_divisor": "none"},
               use_kernel=use_kernel).tolist() == [15.0, 15.0]
    got = run("ties", base, experts, w, {**TIES_TENSOR, "disjoint_divisor": "weight"}, use_kernel=use_kernel)
    assert got.tolist() == pytest.approx([10.0 + 5.0 / 3.0, 20.0 - 2.5])


@pytest.mark.parametrize("use_kernel", [True, False])
def test_weighted_sign_test_with_a_negative_weight(use_kernel):
    base = torch.tensor([0.0, 0.0])
    experts = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5])]
    w = [1.0, -1.0]
    # entry 0: w tau = (1, -2), elected sgn(-1) = -1; tau test: no tau_i < 0 -> nobody agrees -> 0;
    # weighted test: model 2 (w tau = -2) agrees: sum -2, agreeing weight -1 -> mean +2 (mergekit's value)
    # entry 1: w tau = (1, -0.5), elected +1; tau test: both tau_i > 0 agree, weights 1 - 1 = 0 cancel -> 0;
    # weighted test: model 1 alone agrees: sum 1, weight 1
    p = {**TIES_TENSOR, "disjoint_divisor": "weight"}
    assert run("ties", base, experts, w, p, use_kernel=use_kernel).tolist() == [0.0, 0.0]
    assert run("ties", base, experts, w, {**p, "sign_test": "weighted"}, use_kernel=use_kernel).tolist() == [2.0, 1.0]
    assert run("ties", base, experts, w, {**p, "sign_test": "weighted", "disjoint_divisor": "none"},
               use_kernel=use_kernel).tolist() == [-2.0, 1.0]
    # dare_ties at density 1 (no drop) is the same consensus
    assert run("dare_ties", base, experts, w, {"density": 1.0, "sign_test": "weighted", "disjoint_divisor": "none"},
               use_kernel=use_kernel).tolist() == [-2.0, 1.0]


def test_slerp_parallel_threshold_mergekit_lerps_between_0_9995_and_1_minus_1e_6():
    phi = math.acos(0.9998)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float64)
    t = 0.3
    ours = run("slerp", a, [b], [1.0], {"t": t})
    mk = run("slerp", a, [b], [1.0], {"t": t, "parallel_threshold": 0.9995})
    av, bv = a.tolist(), b.tolist()
    slerp_hand = [math.sin((1 - t) * phi) / math.sin(phi) * av[i] + math.sin(t * phi) / math.sin(phi) * bv[i]
                  for i in range(2)]
    lerp_hand = [(1 - t) * av[i] + t * bv[i] for i in range(2)]
    assert ours.tolist() == pytest.approx(slerp_hand, rel=1e-9)
    assert mk.tolist() == pytest.approx(lerp_hand, rel=1e-12)
    assert abs(float(ours[0] - mk[0])) > 1e-6  # the two rules give different tensors here


def test_model_stock_extrapolates_as_mergekit_when_task_vectors_point_apart():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    taus = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)]
    experts = [base + t for t in taus]
    c = -1.0 / math.sqrt(2.0)
    ratio = 2 * c / (1 + c)  # N cos / (1 + (N - 1) cos), N = 2: -4.83
    assert run("model_stock", base, experts, [1.0, 1.0], {}).tolist() == [1.0, 1.0]  # ours: the base
    got = run("model_stock", base, experts, [1.0, 1.0], {"extrapolate": True})
    assert got.tolist() == pytest.approx([1.0 + ratio * 0.0, 1.0 + ratio * 0.5], rel=1e-12)
    # a zero task vector: ours averages (ratio 1), mergekit's clamped cosine is 0 -> ratio 0 (the base)
    zero = [base + taus[0], base.clone()]
    assert run("model_stock", base, zero, [1.0, 1.0], {}).tolist() == [1.5, 1.0]
    assert run("model_stock", base, zero, [1.0, 1.0], {"extrapolate": True}).tolist() == [1.0, 1.0]


def test_model_stock_filter_wise_has_one_ratio_per_row():
    base = torch.zeros(2, 2, dtype=torch.float64)
    t1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = run("model_stock", base, [t1, t2], [1.0, 1.0], {"filter_wise": True})
    # row 0: cos 1 -> ratio 1, mean (1, 0); row 1: cos 0 -> ratio 0 (our rule), mean (0.5, 0.5)
    assert got.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    whole = run("model_stock", base, [t1, t2], [1.0, 1.0], {})
    c = 1.0 / 2.0  # over the flat tensor: <t1, t2> = 1, |t1| |t2| = sqrt(2) sqrt(2)
    ratio = 2 * c / (1 + c)
    assert whole.reshape(-1).tolist() == pytest.approx([ratio, 0.0, ratio * 0.5, ratio * 0.5], rel=1e-12)


def test_per_model_density_trims_each_task_vector_at_its_own_density():
    base = torch.zeros(4)
    t1 = torch.tensor([4.0, 1.0, -3.0, 2.0])
    t2 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    got = run("ties", base, [t1, t2], [1.0, 1.0], {"trim_scope": "tensor", "density": 1.0,
                                                   "disjoint_divisor": "none"},
              model_params=[{"density": 0.5}, {}])
    # t1 trimmed to (4, 0, -3, 0); t2 kept: sums (5, 1, -3, 1) elect (+, +, -, +)
    assert got.tolist() == [5.0, 1.0, -3.0, 1.0]
    got = run("dare_linear", base, [t1, t2], [1.0, 1.0], {"density": 1.0}, model_params=[{}, {"density": 1.0}])
    assert got.tolist() == [5.0, 2.0, -2.0, 3.0]


def test_spec_per_model_parameters_and_override_weights_resolve_per_tensor():
    spec = parse_spec({
        "method": "ties", "base": "b", "models": [{"path": "x", "parameters": {"density": 0.5}}, "y"],
        "parameters": {"trim_scope": "tensor"},
        "overrides": [{"pattern": "re:layers\\.0\\.", "weights": [0.0, 2.0],
                       "model_parameters": [{}, {"density": 0.25}]}],
    })
    r = ParamResolver(spec, get_method("ties"))
    assert r.weights("model.layers.0.mlp.weight") == [0.0, 2.0]
    assert r.model_params("model.layers.0.mlp.weight") == [{"density": 0.5}, {"density": 0.25}]
    assert r.weights("model.norm.weight") == [1.0, 1.0]
    assert r.model_params("model.norm.weight") == [{"density": 0.5}, {}]
    assert r.varies_by_model


def test_spec_per_model_parameter_errors():
    bad = {"method": "ties", "base": "b", "models": [{"path": "x", "parameters": {"lambda": 2.0}}],
           "parameters": {"trim_scope": "tensor"}}
    with pytest.raises(SpecError, match="per-model parameters it takes: density"):
        ParamResolver(parse_spec(bad), get_method("ties"))
    glob = {"method": "ties", "base": "b", "models": [{"path": "x", "parameters": {"density": 0.5}}]}
    with pytest.raises(SpecError, match="trim_scope 'tensor'"):
        ParamResolver(parse_spec(glob), get_method("ties"))
    with pytest.raises(SpecError, match="2 entries for 1 models"):
        parse_spec({"method": "ties", "base": "b", "models": ["x"],
                    "overrides": [{"pattern": "*", "weights": [1.0, 2.0]}]})
    with pytest.raises(SpecError, match="density must be in"):
        ParamResolver(parse_spec({**glob, "parameters": {"trim_scope": "tensor"},
                                  "models": [{"path": "x", "parameters": {"density": 1.5}}]}), get_method("ties"))
