"""Linear CKA: invariances, a hand-computed value, and model features."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.analysis.alignment import apply_permutation, mlp, mlp_permutation_spec, random_permutation
from mergelab.analysis.cka import features, linear_cka, model_cka
from mergelab.errors import SpecError
from mergelab.models import Classifier, make_head


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reps(seed: int = 0, n: int = 40, d1: int = 6, d2: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    mix = torch.randn(d2, d2, generator=g, dtype=torch.float64)
    y = x[:, :d2] @ mix + 0.5 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = _reps()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x.float(), x.float()) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_symmetric_and_in_unit_interval():
    x, y = _reps(1)
    v = linear_cka(x, y)
    assert 0.0 < v < 1.0
    assert linear_cka(y, x) == pytest.approx(v, rel=1e-12)


def test_cka_invariant_to_orthogonal_transforms():
    x, y = _reps(2)
    ref = linear_cka(x, y)
    qx, qy = _orthogonal(x.shape[1], 3), _orthogonal(y.shape[1], 4)
    assert linear_cka(x @ qx, y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x @ qx, y @ qy) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x, x @ qx) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_isotropic_scaling_and_mean_shift():
    x, y = _reps(5)
    ref = linear_cka(x, y)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(ref, rel=1e-10)  # columns are centred


def test_cka_not_invariant_to_non_isotropic_scaling():
    x, y = _reps(6)
    scale = torch.diag(torch.tensor([10.0, 1.0, 1.0, 0.1, 1.0, 3.0], dtype=torch.float64))
    assert abs(linear_cka(x @ scale, y) - linear_cka(x, y)) > 1e-2


def test_cka_hand_computed_values():
    # 1-D: centred x = (-1, 0, 1), y = (1, 4, 9) - 14/3; Y^T X = 8, ||X^T X|| = 2, ||Y^T Y|| = 294/9
    # -> CKA = 64 / (2 * 294 / 9) = 48/49 (the squared Pearson correlation).
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [4.0], [9.0]])
    assert linear_cka(x, y) == pytest.approx(48 / 49, rel=1e-14)
    # X^T X = 2 I (||.|| = 2 sqrt 2), Y = first column: Y^T Y = 2, Y^T X = (2, 0) -> 4 / (4 sqrt 2) = 1/sqrt 2
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(x2, x2[:, :1]) == pytest.approx(1 / math.sqrt(2), rel=1e-14)


def test_gram_form_used_for_wide_features_gives_the_same_value():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 30, generator=g, dtype=torch.float64)
    y = torch.randn(6, 40, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = torch.linalg.norm(yc.T @ xc) ** 2 / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(float(direct), rel=1e-10)


def test_cka_errors():
    with pytest.raises(SpecError, match="same inputs"):
        linear_cka(torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(SpecError, match="2-D"):
        linear_cka(torch.randn(5), torch.randn(5, 2))
    with pytest.raises(SpecError, match="NaN"):
        linear_cka(torch.full((3, 2), float("nan")), torch.randn(3, 2))
    assert math.isnan(linear_cka(torch.ones(4, 2), torch.randn(4, 2)))


def test_model_cka_uses_backbone_features_and_sees_through_permutations():
    torch.manual_seed(0)
    net = mlp([10, 16, 8])
    x = torch.randn(32, 10)
    clf = Classifier(net, make_head(8, 3))
    assert torch.equal(features(clf, x), features(net, x))  # Classifier -> its backbone's output
    assert features(clf, x).dtype == torch.float64
    assert model_cka(clf, net, x) == pytest.approx(1.0, abs=1e-12)
    # permuting the output features is an orthogonal transform of the representation
    spec = mlp_permutation_spec(net, permute_output=True)
    perm = random_permutation(spec, net.state_dict(), seed=1)
    permuted = mlp([10, 16, 8])
    permuted.load_state_dict(apply_permutation(net.state_dict(), spec, perm))
    assert not torch.allclose(permuted(x), net(x))
    assert model_cka(net, permuted, x) == pytest.approx(1.0, abs=1e-10)
    other = mlp([10, 16, 8])
    assert model_cka(net, other, x) < 0.999
