"""Weight matching: exact recovery of known permutations (MLP, zoo ResNet), function preservation, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergelab.analysis.alignment import (
    UnsupportedArchitectureError,
    align,
    aligned_interpolation,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    matching_objective,
    mlp,
    mlp_permutation_spec,
    permutation_spec,
    permute_head,
    random_permutation,
    resnet_permutation_spec,
    weight_distance,
    weight_matching,
)
from mergelab.analysis.landscape import EvalTask
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.models import Classifier, build_backbone, make_head


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (init has ones/zeros everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _load(model: nn.Module, state: dict) -> nn.Module:
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------------------------- MLP
def test_mlp_spec_layout():
    spec = mlp_permutation_spec(mlp([4, 8, 6, 3]))
    assert spec.axes == {
        "0.weight": ("h0", None),
        "0.bias": ("h0",),
        "2.weight": ("h1", "h0"),
        "2.bias": ("h1",),
        "4.weight": (None, "h1"),
        "4.bias": (None,),
    }
    assert spec.output_perm is None
    assert mlp_permutation_spec(mlp([4, 8, 3]), permute_output=True).output_perm == "h1"


def test_mlp_weight_matching_recovers_a_known_permutation_exactly():
    torch.manual_seed(0)
    net = mlp([12, 32, 24, 16, 5]).eval()
    spec = mlp_permutation_spec(net)
    state = net.state_dict()
    q = random_permutation(spec, state, seed=1)
    assert all(not torch.equal(v, torch.arange(len(v))) for v in q.values())
    permuted = _load(mlp([12, 32, 24, 16, 5]), apply_permutation(state, spec, q))
    x = torch.randn(20, 12)
    assert torch.allclose(permuted(x), net(x), atol=1e-6)  # same function
    assert weight_distance(state, permuted.state_dict()) > 1.0  # different weights

    p = weight_matching(state, permuted.state_dict(), spec, seed=3)
    inv = invert_permutation(q)
    assert set(p) == set(q)
    for name in q:
        assert torch.equal(p[name], inv[name]), name
    restored = apply_permutation(permuted.state_dict(), spec, p)
    assert weight_distance(state, restored) == 0.0
    pstate = permuted.state_dict()
    assert matching_objective(state, pstate, spec, p) > matching_objective(state, pstate, spec)


def test_apply_then_inverse_is_identity_and_identity_is_a_no_op():
    net = mlp([3, 5, 4, 2])
    spec = mlp_permutation_spec(net)
    state = net.state_dict()
    q = random_permutation(spec, state, seed=4)
    back = apply_permutation(apply_permutation(state, spec, q), spec, invert_permutation(q))
    assert weight_distance(state, back) == 0.0
    assert weight_distance(state, apply_permutation(state, spec, identity_permutation(spec, state))) == 0.0


def test_align_independent_mlps_preserves_function_and_reduces_distance():
    torch.manual_seed(1)
    a, b = mlp([6, 16, 16, 3]), mlp([6, 16, 16, 3])
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned = align(a, b)
    assert weight_distance(before, b.state_dict()) == 0.0  # model_b untouched
    x = torch.randn(10, 6)
    assert torch.allclose(aligned(x), b(x), atol=1e-6)
    assert weight_distance(a.state_dict(), aligned.state_dict()) < weight_distance(a.state_dict(), b.state_dict())
    spec = mlp_permutation_spec(a)
    ident = matching_objective(a.state_dict(), b.state_dict(), spec)
    assert matching_objective(a.state_dict(), aligned.state_dict(), spec) > ident


def test_interpolating_a_permuted_copy_is_flat_after_alignment():
    torch.manual_seed(2)
    a = mlp([5, 24, 3])
    spec = mlp_permutation_spec(a)
    b = _load(mlp([5, 24, 3]), apply_permutation(a.state_dict(), spec, random_permutation(spec, a.state_dict(), 5)))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    naive, aligned = aligned_interpolation(a, b, EvalTask("t", (x, y)), [0.0, 0.25, 0.5, 0.75, 1.0])
    naive_loss = naive.curves["t"].loss
    assert max(naive_loss) - min(naive_loss) > 1e-3  # the naive path leaves the permuted copy's function
    flat = aligned.curves["t"].loss
    assert max(flat) - min(flat) < 1e-6
    assert aligned.curves["t"].loss_barrier < 1e-6


def test_mlp_with_batchnorm_and_flatten():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 2))
    _randomise_bn(net, 0)
    net.eval()
    spec = mlp_permutation_spec(net)
    assert spec.axes["2.running_var"] == ("h0",)
    q = random_permutation(spec, net.state_dict(), 6)
    twin = nn.Sequential(nn.Flatten(), nn.Linear(8, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 2))
    _load(twin, apply_permutation(net.state_dict(), spec, q))
    x = torch.randn(7, 2, 4)
    assert torch.allclose(twin(x), net(x), atol=1e-6)


# ------------------------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("arch", ["resnet_s", "resnet_m"])
def test_resnet_permutation_preserves_the_function(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    _randomise_bn(backbone, 1)
    backbone.eval()
    x = torch.randn(3, 1, 28, 28)
    state = backbone.state_dict()
    # every tensor except the integer counters is covered by the spec
    spec = resnet_permutation_spec(backbone, permute_output=True)
    assert set(spec.axes) == {k for k in state if not k.endswith("num_batches_tracked")}
    q = random_permutation(spec, state, seed=2)
    twin = _load(build_backbone(arch), apply_permutation(state, spec, q))
    ref = backbone(x)
    assert torch.allclose(twin(x), ref[:, q[spec.output_perm]], atol=1e-5)  # features permuted by the last stream
    head = make_head(64, 7)
    assert torch.allclose(permute_head(head, spec, q)(twin(x)), head(ref), atol=1e-5)
    # default backbone spec: the feature axis stays in place
    spec_fixed = permutation_spec(backbone)
    assert spec_fixed.output_perm is None
    q2 = random_permutation(spec_fixed, state, seed=3)
    twin2 = _load(build_backbone(arch), apply_permutation(state, spec_fixed, q2))
    assert torch.allclose(twin2(x), ref, atol=1e-5)


def test_resnet_s_spec_streams():
    spec = resnet_permutation_spec(build_backbone("resnet_s"), permute_output=True)
    assert spec.perm_names == ["stream0", "layer1.0.inner", "layer2.0.inner", "stream2", "layer3.0.inner", "stream3"]
    assert spec.axes["layer1.0.conv2.weight"] == ("stream0", "layer1.0.inner", None, None)
    assert spec.axes["layer2.0.shortcut.conv.weight"] == ("stream2", "stream0", None, None)
    assert spec.axes["layer3.0.bn2.running_mean"] == ("stream3",)


def test_resnet_weight_matching_recovers_a_known_permutation_exactly():
    torch.manual_seed(4)
    model = Classifier(build_backbone("resnet_s"), make_head(64, 5))
    _randomise_bn(model, 2)
    model.eval()
    spec = permutation_spec(model)  # Classifier: every stream permuted, head columns follow
    assert spec.axes["head.weight"] == (None, "stream3")
    state = model.state_dict()
    q = random_permutation(spec, state, seed=7)
    permuted = _load(Classifier(build_backbone("resnet_s"), make_head(64, 5)), apply_permutation(state, spec, q))
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(permuted(x), model(x), atol=1e-5)
    p = weight_matching(state, permuted.state_dict(), spec, seed=0)
    inv = invert_permutation(q)
    for name in q:
        assert torch.equal(p[name], inv[name]), name
    assert weight_distance(state, apply_permutation(permuted.state_dict(), spec, p)) == 0.0
    aligned = align(model, permuted)
    assert weight_distance(state, aligned.state_dict()) == 0.0


# ------------------------------------------------------------------------------------------- errors
def test_unsupported_architectures_raise_clear_errors():
    with pytest.raises(UnsupportedArchitectureError, match="ViTBackbone.*vit_s are not supported"):
        permutation_spec(build_backbone("vit_s"))
    with pytest.raises(UnsupportedArchitectureError, match="ViTBackbone"):
        align(build_backbone("vit_s"), build_backbone("vit_s"))
    with pytest.raises(UnsupportedArchitectureError, match="Conv2d"):
        mlp_permutation_spec(nn.Sequential(nn.Linear(2, 3), nn.Conv2d(1, 1, 1)))
    assert issubclass(UnsupportedArchitectureError, SpecError)


def test_mismatched_states_are_rejected():
    spec = mlp_permutation_spec(mlp([3, 4, 2]))
    with pytest.raises(TensorMismatchError, match="different permutation sizes|has size"):
        weight_matching(mlp([3, 4, 2]).state_dict(), mlp([3, 5, 2]).state_dict(), spec)
    with pytest.raises(SpecError, match="lacks"):
        apply_permutation(mlp([3, 4, 2]).state_dict(), spec, {})
