"""RegMean: the closed form against averaging, per-feature averaging (alpha = 0) and least squares
(alpha = 1), the input-capturing hooks (Linear and unfolded Conv2d), the ridge for singular Grams, and the
method end to end on a tiny zoo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.merging import merge
from mergelab.errors import SpecError
from mergelab.methods.data_informed import registry
from mergelab.methods.data_informed.regmean import (
    RegMeanAccumulator,
    gram_matrices,
    reduce_off_diagonal,
    regmean_layers,
    regmean_merge,
    regmean_merge_states,
)
from mergelab.models import build_backbone, read_backbone_state
from mergelab.models.pretraining import PretrainConfig
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

TASKS = ["mnist_parity", "mnist_rot90"]


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    return a.T @ a / (3 * d)


# ------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 3, 3)])
def test_identical_grams_give_the_weighted_average(shape):
    g = torch.Generator().manual_seed(0)
    d_in = int(torch.tensor(shape[1:]).prod())
    gram = _spd(d_in, g)
    ws = [torch.randn(*shape, generator=g) for _ in range(3)]
    cs = [1.0, 2.0, 0.5]
    for alpha in (0.0, 0.5, 0.9, 1.0):
        merged = regmean_merge(ws, [gram] * 3, cs, alpha=alpha)
        ref = sum(c * w.double() for c, w in zip(cs, ws)) / sum(cs)
        assert merged.shape == shape
        torch.testing.assert_close(merged.double(), ref, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_the_per_input_feature_weighted_average():
    g = torch.Generator().manual_seed(1)
    grams = [_spd(4, g), _spd(4, g) * 3.0]
    ws = [torch.randn(3, 4, generator=g) for _ in range(2)]
    cs = [1.0, 2.0]
    merged = regmean_merge(ws, grams, cs, alpha=0.0).double()
    d = [c * gr.diagonal() for c, gr in zip(cs, grams)]  # per-input-feature weights c_i G_i[j, j]
    ref = (d[0] * ws[0].double() + d[1] * ws[1].double()) / (d[0] + d[1])  # column j weighted by d_i[j]
    torch.testing.assert_close(merged, ref, rtol=1e-6, atol=1e-7)


def test_off_diagonal_scaling():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    expected = torch.tensor([[4.0, 0.5], [0.5, 9.0]], dtype=torch.float64)
    torch.testing.assert_close(reduce_off_diagonal(gram, 0.25), expected)
    assert torch.equal(reduce_off_diagonal(gram, 1.0), gram)


def test_alpha_one_solves_the_stacked_least_squares_problem():
    """min_W sum_i c_i ||X_i W^T - X_i W_i^T||^2 == lstsq on rows sqrt(c_i) X_i with targets sqrt(c_i) X_i W_i^T."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (20, 9, 14)]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in xs]
    cs = [1.0, 0.5, 2.0]
    merged = regmean_merge(ws, [x.T @ x for x in xs], cs, alpha=1.0)
    a = torch.cat([c**0.5 * x for c, x in zip(cs, xs)])
    b = torch.cat([c**0.5 * x @ w.T for c, x, w in zip(cs, xs, ws)])
    ref = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged, ref, rtol=1e-8, atol=1e-8)

    def objective(w):
        return sum(c * (x @ w.T - x @ wi.T).square().sum() for c, x, wi in zip(cs, xs, ws))

    for _ in range(5):  # and it is a minimum
        assert objective(merged) <= objective(merged + 1e-3 * torch.randn(4, 6, dtype=torch.float64, generator=g))


def test_exact_on_the_experts_inputs_but_outside_their_outputs_off_them():
    """The mechanism behind RegMean < averaging on the resnet_s zoo (module docstring), by construction.

    Expert 1 sees only x = e1 and maps it to 1 (W_1 = [1, 0]); expert 2 sees only x = e1 + e2 and maps
    everything to 0 (W_2 = [0, 0]). alpha = 1 fits both exactly with W = [1, -1], twice as far from the
    average [0.5, 0] as the average is from W_2. On e2, an input that neither expert produced, both experts
    output 0 but RegMean outputs -1, outside their range; the average outputs 0, their mean (for one linear
    map the average's output is always the mean of the experts' outputs). A merged network whose inputs
    drift away from every expert's (the zoo's large task vectors) meets exactly such inputs.
    """
    e1, e12, e2 = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0], [1.0, 1.0], [0.0, 1.0]))
    ws = [torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)]
    merged = regmean_merge(ws, [torch.outer(e1, e1), torch.outer(e12, e12)], alpha=1.0)
    torch.testing.assert_close(merged, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert float(merged @ e1) == pytest.approx(float(ws[0] @ e1))  # exact on each expert's own input
    assert float(merged @ e12) == pytest.approx(float(ws[1] @ e12))
    outs = [float(w @ e2) for w in ws]
    assert float(merged @ e2) == pytest.approx(-1.0) and float(merged @ e2) < min(outs)  # extrapolates
    assert float(((ws[0] + ws[1]) / 2) @ e2) == pytest.approx(sum(outs) / 2)
    # alpha = 0 keeps the diagonals only: per-feature weights, never outside the experts' range per entry
    diag = regmean_merge(ws, [torch.outer(e1, e1), torch.outer(e12, e12)], alpha=0.0)
    torch.testing.assert_close(diag, torch.tensor([[0.5, 0.0]], dtype=torch.float64))


def test_intermediate_alpha_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    grams = [_spd(5, g) for _ in range(3)]
    ws = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    cs = [0.3, 1.0, 2.0]
    alpha = 0.7
    gt = [alpha * gr + (1 - alpha) * torch.diag(gr.diagonal()) for gr in grams]
    lhs = sum(c * t for c, t in zip(cs, gt))
    rhs = sum(c * t @ w.T for c, t, w in zip(cs, gt, ws))
    torch.testing.assert_close(regmean_merge(ws, grams, cs, alpha=alpha), (torch.linalg.inv(lhs) @ rhs).T)


def test_a_dead_input_feature_gets_the_weighted_average_through_the_ridge():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # feature 2 is never active: every Gram has a zero row and column
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    acc = RegMeanAccumulator(alpha=1.0)
    for x, w, c in zip(xs, ws, (1.0, 3.0)):
        acc.add({"l.weight": w}, {"l": x.T @ x}, c)
    merged = acc.result()["l.weight"]
    assert "l" in acc.ridged and acc.ridged["l"] < 1e-4
    torch.testing.assert_close(merged[:, 2], (ws[0][:, 2] + 3 * ws[1][:, 2]) / 4, rtol=1e-9, atol=1e-9)
    live = [0, 1, 3]  # the other columns: the regression on the live features (up to the tiny ridge)
    ref = regmean_merge([w[:, live] for w in ws], [(x.T @ x)[live][:, live] for x in xs], [1.0, 3.0], alpha=1.0)
    torch.testing.assert_close(merged[:, live], ref, rtol=1e-4, atol=1e-5)


def test_accumulator_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        RegMeanAccumulator(alpha=1.5)
    with pytest.raises(ValueError, match="ridge"):
        RegMeanAccumulator(ridge=0.0)
    with pytest.raises(ValueError, match="positive model weights"):
        RegMeanAccumulator().add({"l.weight": torch.ones(2, 2)}, {"l": torch.eye(2)}, -1.0)
    with pytest.raises(ValueError, match="inputs"):
        RegMeanAccumulator().add({"l.weight": torch.ones(2, 2)}, {"l": torch.eye(3)}, 1.0)
    with pytest.raises(ValueError, match="no tensor"):
        RegMeanAccumulator().add({"m.weight": torch.ones(2, 2)}, {"l": torch.eye(2)}, 1.0)


# ------------------------------------------------------------------------------------------- hooks


def test_the_gram_of_a_single_linear_layer_is_x_transpose_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(10, 4, 5, dtype=torch.float64)  # tokens: rows are all (sample, token) pairs
    model.double()
    grams = gram_matrices(model, x, batch_size=3)
    rows = x.reshape(-1, 5)
    assert set(grams) == {"0"} and grams["0"].rows == 40
    torch.testing.assert_close(grams["0"].matrix, rows.T @ rows / 40)


def _patches(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """Explicit patch rows [B * H_out * W_out, C * k * k], channel-major then kernel row, kernel column."""
    xp = F.pad(x, (pad, pad, pad, pad))
    b, c, h, w = xp.shape
    rows = []
    for n in range(b):
        for i in range(0, h - k + 1, stride):
            for j in range(0, w - k + 1, stride):
                rows.append(xp[n, :, i : i + k, j : j + k].reshape(-1))
    return torch.stack(rows)


def test_the_gram_of_a_convolution_is_that_of_its_patches():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    p = _patches(x, 3, 2, 1)
    out = conv(x)  # the patch rows reproduce the convolution with the reshaped weight
    torch.testing.assert_close(p @ conv.weight.reshape(3, -1).T, out.permute(0, 2, 3, 1).reshape(-1, 3))
    grams = gram_matrices(nn.Sequential(conv), x)
    torch.testing.assert_close(grams["0"].matrix, p.T @ p / len(p))
    assert grams["0"].rows == len(p) == 2 * 3 * 3


def test_single_layer_models_merge_to_the_least_squares_solution():
    """Hooks + solve: two single-Linear experts, alpha 1 -> lstsq over both experts' inputs."""
    g = torch.Generator().manual_seed(5)
    experts, states, grams, xs = [], [], [], []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(4, 2)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.randn(2, 4, generator=g, dtype=torch.float64))
        x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        xs.append(x)
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        grams.append(gram_matrices(m, x))
    merged = regmean_merge_states(states, grams, alpha=1.0)
    a = torch.cat(xs)
    b = torch.cat([x @ s["0.weight"].T for x, s in zip(xs, states)])
    torch.testing.assert_close(merged["0.weight"], torch.linalg.lstsq(a, b).solution.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(merged["0.bias"], (states[0]["0.bias"] + states[1]["0.bias"]) / 2)


def test_layers_of_the_zoo_architectures():
    resnet = regmean_layers(build_backbone("resnet_s"))
    assert all(isinstance(m, nn.Conv2d) for m in resnet.values()) and len(resnet) == 9  # 7 3x3 + 2 shortcuts
    assert regmean_layers(build_backbone("resnet_s"), conv=False) == {}
    vit = regmean_layers(build_backbone("vit_s"))
    assert "patch_embed" in vit and sum(isinstance(m, nn.Linear) for m in vit.values()) == 16
    torch.manual_seed(0)
    model = build_backbone("vit_s")
    grams = gram_matrices(model, torch.randn(3, 1, 28, 28))
    assert grams["blocks.0.mlp.fc2"].rows == 3 * 17 and grams["blocks.0.mlp.fc2"].matrix.shape == (128, 128)
    assert grams["patch_embed"].rows == 3 * 16 and grams["patch_embed"].matrix.shape == (49, 49)


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(pretrained folder, two tiny resnet_s experts)."""
    root = tmp_path_factory.mktemp("zoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=10, batch_size=32, lr=0.05))
    experts = [finetune(dict(task=t, steps=10, batch_size=32, data_ratio=0.05), root) for t in TASKS]
    return pre.path, [e.path for e in experts]


def _spec(pre, paths, **kw):
    return dict(method="regmean", base=str(pre), models=[{"path": str(p)} for p in paths], **kw)


def test_regmean_is_registered():
    assert "regmean" in registry()


def test_merge_end_to_end(zoo, tmp_path):
    pre, paths = zoo
    r = merge(_spec(pre, paths, data={"samples_per_task": 24}), tmp_path / "out", progress=False)
    merged, a, b = (read_backbone_state(p) for p in (r.out_dir, *paths))
    assert set(merged) == set(a) and all(torch.isfinite(t).all() for t in merged.values())
    assert r.record["parameters"] == {"alpha": 0.9, "conv": True, "ridge": 1e-6}
    assert r.record["data"]["samples_per_task"] == 24
    conv = "layer2.0.conv1.weight"  # regressed: not the average
    assert not torch.allclose(merged[conv], (a[conv] + b[conv]) / 2, atol=1e-6)
    bn = "layer2.0.bn1.running_var"  # averaged
    torch.testing.assert_close(merged[bn], (a[bn] + b[bn]) / 2)


def test_without_conv_layers_a_resnet_is_weight_averaged(zoo, tmp_path):
    pre, paths = zoo
    r = merge(_spec(pre, paths, parameters={"conv": False}, data={"samples_per_task": 2}), tmp_path / "r",
              progress=False)
    avg = merge(dict(method="weight_average", base=str(pre), models=[{"path": str(p)} for p in paths]),
                tmp_path / "avg", progress=False)
    merged, ref = read_backbone_state(r.out_dir), read_backbone_state(avg.out_dir)
    for name, t in ref.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-7)


def test_merging_an_expert_with_itself_returns_it(zoo, tmp_path):
    pre, paths = zoo
    r = merge(_spec(pre, [paths[0], paths[0]], data={"samples_per_task": 8}), tmp_path / "same", progress=False)
    merged, expert = read_backbone_state(r.out_dir), read_backbone_state(paths[0])
    for name, t in expert.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-4, atol=1e-5)


def test_clear_errors(zoo, tmp_path):
    pre, paths = zoo
    with pytest.raises(SpecError, match="alpha"):
        merge(_spec(pre, paths, parameters={"alpha": 1.5}), tmp_path / "a", progress=False)
    with pytest.raises(SpecError, match="data.tasks leaves out"):
        merge(_spec(pre, paths, data={"tasks": ["mnist_rot90"]}), tmp_path / "b", progress=False)
    with pytest.raises(SpecError, match="positive model weights"):
        merge(dict(_spec(pre, paths), models=[{"path": str(paths[0]), "weight": 0.0}, {"path": str(paths[1])}]),
              tmp_path / "c", progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")
