"""Fisher merging: the weighted-average formula, epsilon / zero-Fisher handling, the diagonal Fisher against
closed forms (softmax regression) and torch.func, and the method end to end on a tiny zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from mergelab.merging import merge
from mergelab.errors import SpecError
from mergelab.methods.data_informed import registry
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.fisher import (
    DEFAULT_SAMPLES,
    FisherAccumulator,
    diagonal_fisher,
    fisher_merge,
    normalized_fisher,
    use_default_samples,
)
from mergelab.models import build_backbone, read_backbone_state
from mergelab.models.pretraining import PretrainConfig
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

TASKS = ["mnist_parity", "mnist_rot90"]


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g),
         "bn.running_var": torch.rand(4, generator=g)}
        for _ in range(n)
    ]


def _weighted_mean(tensors, weights):
    return sum(w * t.double() for t, w in zip(tensors, weights)) / sum(weights)


# ------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("normalize", [False, True])
def test_equal_fishers_give_the_weighted_average(normalize):
    states, weights = _states(3), [1.0, 2.0, 0.5]
    g = torch.Generator().manual_seed(1)
    fisher = {"w": torch.rand(4, 3, generator=g) + 0.1, "b": torch.rand(4, generator=g) + 0.1}
    merged = fisher_merge(states, [fisher] * 3, weights, normalize=normalize)
    for name in states[0]:  # parameters and the buffer (no Fisher: weighted mean)
        ref = _weighted_mean([s[name] for s in states], weights)
        torch.testing.assert_close(merged[name].double(), ref, rtol=1e-6, atol=1e-6)
        assert merged[name].dtype == states[0][name].dtype


def test_matches_the_formula_with_epsilon_and_normalisation():
    states, weights = _states(3, seed=2), [1.0, 3.0, 2.0]
    g = torch.Generator().manual_seed(3)
    fishers = [{"w": torch.rand(4, 3, generator=g) * s, "b": torch.rand(4, generator=g) * s} for s in (1.0, 10.0, 0.1)]
    for eps, normalize in [(0.0, False), (1e-3, False), (1e-2, True)]:
        merged = fisher_merge(states, fishers, weights, epsilon=eps, normalize=normalize)
        for name in ("w", "b"):
            fs = []
            for f in fishers:
                norm = torch.sqrt(sum(t.double().square().sum() for t in f.values())) if normalize else 1.0
                fs.append(f[name].double() / norm + eps)
            num = sum(w * f * s[name].double() for w, f, s in zip(weights, fs, states))
            den = sum(w * f for w, f in zip(weights, fs))
            torch.testing.assert_close(merged[name].double(), num / den, rtol=1e-5, atol=1e-6)


def test_coordinates_where_one_fisher_is_zero_come_from_the_other_expert():
    a, b = _states(2, seed=4)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[::2] = True
    fa = {"w": torch.where(mask, 0.0, 1.0), "b": torch.ones(4)}
    fb = {"w": torch.full((4, 3), 2.0), "b": torch.ones(4)}
    exact = fisher_merge([a, b], [fa, fb], [1.0, 1.0], epsilon=0.0)
    torch.testing.assert_close(exact["w"][mask], b["w"][mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(exact["w"][~mask], ((a["w"] + 2 * b["w"]) / 3)[~mask], rtol=1e-6, atol=1e-6)
    # with the default epsilon (1e-6 against a Fisher of 2) the other expert's value, up to ~1e-6 relative
    default = fisher_merge([a, b], [fa, fb], [1.0, 1.0])
    torch.testing.assert_close(default["w"][mask], b["w"][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_all_zero_fishers_fall_back_to_the_weighted_average(eps):
    states, weights = _states(3, seed=5), [1.0, 2.0, 3.0]
    zero = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    merged = fisher_merge(states, [zero] * 3, weights, epsilon=eps, normalize=True)
    for name in states[0]:
        assert torch.isfinite(merged[name]).all()
        torch.testing.assert_close(merged[name].double(), _weighted_mean([s[name] for s in states], weights),
                                   rtol=1e-6, atol=1e-6)


def test_normalized_fisher_has_unit_norm_and_keeps_zero():
    f = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    n = normalized_fisher(f)
    assert torch.equal(n["a"], torch.tensor([0.6, 0.0])) and torch.equal(n["b"], torch.tensor([[0.8]]))
    z = normalized_fisher({"a": torch.zeros(2)})
    assert torch.equal(z["a"], torch.zeros(2))


def test_accumulator_rejects_bad_input():
    s = _states(1)[0]
    with pytest.raises(ValueError, match="positive model weights"):
        FisherAccumulator().add(s, {}, 0.0)
    with pytest.raises(ValueError, match="negative or non-finite"):
        FisherAccumulator().add(s, {"w": -torch.ones(4, 3)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        FisherAccumulator().add(s, {"w": torch.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        FisherAccumulator(-1.0)
    acc = FisherAccumulator()
    acc.add(s, {}, 1.0)
    with pytest.raises(ValueError, match="different tensors"):
        acc.add({"w": s["w"]}, {}, 1.0)


# ------------------------------------------------------------------------------------ diagonal Fisher


def _softmax_regression(seed: int = 0, d: int = 5, c: int = 4, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, c)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g))
        model.bias.copy_(torch.randn(c, generator=g) * 0.5)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return model, x, y


def test_exact_fisher_of_softmax_regression_matches_the_closed_form():
    """grad_W log p_c = (e_c - p) x^T, so F_W = mean_n sum_c p_c ((e_c - p) x^T)^2 and F_b = ... (e_c - p)^2."""
    model, x, y = _softmax_regression()
    fisher = diagonal_fisher(model, nn.Identity(), x, y, kind="exact")
    p = torch.softmax(model(x).double(), -1).detach()  # [n, C]
    e = torch.eye(p.shape[1], dtype=torch.float64)
    r = e[None, :, :] - p[:, None, :]  # r[n, c] = e_c - p_n   [n, C(sampled class), C(output)]
    fw = (p[:, :, None, None] * (r[:, :, :, None] * x.double()[:, None, None, :]) ** 2).sum(1).mean(0)
    fb = (p[:, :, None] * r**2).sum(1).mean(0)
    torch.testing.assert_close(fisher["weight"].double(), fw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"].double(), fb, rtol=1e-5, atol=1e-7)


def test_empirical_fisher_of_softmax_regression_uses_the_labels():
    model, x, y = _softmax_regression(seed=1)
    fisher = diagonal_fisher(model, nn.Identity(), x, y, kind="empirical")
    p = torch.softmax(model(x).double(), -1).detach()
    r = torch.nn.functional.one_hot(y, p.shape[1]).double() - p  # [n, C]
    torch.testing.assert_close(fisher["weight"].double(), ((r[:, :, None] * x.double()[:, None, :]) ** 2).mean(0),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"].double(), (r**2).mean(0), rtol=1e-5, atol=1e-7)


def test_sampled_fisher_is_a_seeded_unbiased_estimate_of_the_exact_one():
    model, x, _ = _softmax_regression(seed=2, n=1)
    xs = x.expand(1000, -1)
    exact = diagonal_fisher(model, nn.Identity(), x, kind="exact")

    def sampled(n: int) -> dict[str, torch.Tensor]:
        return diagonal_fisher(model, nn.Identity(), xs[:n], kind="sampled", generator=torch.Generator().manual_seed(0))

    assert torch.equal(sampled(20)["bias"], sampled(20)["bias"])
    # entries of (e_y - p)^2 lie in [0, 1]: the mean of 1000 draws is within 0.05 of its expectation (> 3 sigma)
    torch.testing.assert_close(sampled(1000)["bias"], exact["bias"], rtol=0, atol=0.05)


def test_fisher_through_a_resnet_in_eval_mode_matches_torch_func():
    """BN must use its running statistics (eval); reference: per-sample Jacobians of log-softmax via vmap."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet_s")
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    backbone.train()
    head = nn.Linear(backbone.feature_dim, 3)
    x = torch.randn(2, 1, 28, 28)
    fisher = diagonal_fisher(backbone, head, x, kind="exact")
    assert backbone.training and head.training  # modes restored

    backbone.eval()
    params = {k: v.detach() for k, v in backbone.named_parameters()}
    buffers = dict(backbone.named_buffers())

    def logp(p, xi):
        return torch.log_softmax(head(functional_call(backbone, (p, buffers), (xi[None],))), -1)[0]

    jac = vmap(jacrev(logp), in_dims=(None, 0))(params, x)  # name -> [n, C, *shape]
    probs = torch.softmax(head(backbone(x)), -1).detach()
    for name, j in jac.items():
        ref = (probs.reshape(*probs.shape, *[1] * (j.dim() - 2)) * j.square()).sum(1).mean(0)
        torch.testing.assert_close(fisher[name], ref, rtol=1e-4, atol=1e-9)


def test_diagonal_fisher_rejects_bad_input():
    model, x, _ = _softmax_regression()
    with pytest.raises(ValueError, match="labels"):
        diagonal_fisher(model, nn.Identity(), x, kind="empirical")
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        diagonal_fisher(model, nn.Identity(), x, kind="hessian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no samples"):
        diagonal_fisher(model, nn.Identity(), x[:0])


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(pretrained folder, two tiny resnet_s experts)."""
    root = tmp_path_factory.mktemp("zoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=10, batch_size=32, lr=0.05))
    experts = [finetune(dict(task=t, steps=10, batch_size=32, data_ratio=0.05), root) for t in TASKS]
    return pre.path, [e.path for e in experts]


def _spec(pre, paths, **kw):
    return dict(method="fisher", base=str(pre), models=[{"path": str(p)} for p in paths], **kw)


def test_fisher_is_registered():
    assert "fisher" in registry()


def test_merge_end_to_end_and_record(zoo, tmp_path):
    pre, paths = zoo
    spec = _spec(pre, paths, parameters={"fisher": "sampled", "normalize": True}, data={"samples_per_task": 12})
    r = merge(spec, tmp_path / "out", progress=False)
    state = read_backbone_state(r.out_dir)
    assert set(state) == set(read_backbone_state(paths[0]))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert r.record["method"] == "fisher" and r.record["parameters"]["fisher"] == "sampled"
    assert r.record["data"]["samples_per_task"] == 12 and r.record["data"]["tasks"] == TASKS


def test_merging_an_expert_with_itself_returns_it(zoo, tmp_path):
    pre, paths = zoo
    r = merge(_spec(pre, [paths[1], paths[1]], data={"samples_per_task": 4}), tmp_path / "same", progress=False)
    merged, expert = read_backbone_state(r.out_dir), read_backbone_state(paths[1])
    for name, t in expert.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6)


def test_default_sample_count_applies_only_when_the_spec_leaves_it_out(zoo):
    pre, paths = zoo
    from mergelab.spec import DataSpec

    ctx = MergeContext.from_spec(pre, [(p, 1.0) for p in paths], None, torch.device("cpu"), False)
    use_default_samples(ctx, DEFAULT_SAMPLES)
    assert ctx.data.samples_per_task == 256
    ctx = MergeContext.from_spec(pre, [(p, 1.0) for p in paths], DataSpec(samples_per_task=100),
                                 torch.device("cpu"), False)
    use_default_samples(ctx, DEFAULT_SAMPLES)
    assert ctx.data.samples_per_task == 100


def test_clear_errors(zoo, tmp_path):
    pre, paths = zoo
    with pytest.raises(SpecError, match="data.tasks leaves out mnist_rot90"):
        merge(_spec(pre, paths, data={"tasks": ["mnist_parity"]}), tmp_path / "a", progress=False)
    with pytest.raises(SpecError, match="positive model weights"):
        merge(dict(_spec(pre, paths), models=[{"path": str(paths[0]), "weight": -1.0}, {"path": str(paths[1])}]),
              tmp_path / "b", progress=False)
    with pytest.raises(SpecError, match="epsilon"):
        merge(_spec(pre, paths, parameters={"epsilon": -1.0}), tmp_path / "c", progress=False)
    with pytest.raises(SpecError, match="fisher"):
        merge(_spec(pre, paths, parameters={"fisher": "hessian"}), tmp_path / "d", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_head_that_does_not_fit_the_task_is_reported(zoo, tmp_path, monkeypatch):
    pre, paths = zoo
    real = MergeContext.samples

    def shifted(self, task, split):
        x, y = real(self, task, split)
        return x, y + 10  # labels beyond every head

    monkeypatch.setattr(MergeContext, "samples", shifted)
    with pytest.raises(SpecError, match="another version of the task"):
        merge(_spec(pre, paths, data={"samples_per_task": 2}), tmp_path / "e", progress=False)
