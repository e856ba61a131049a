"""AdaMerging: zero steps = task arithmetic, entropy decreases, exact gradients, clamping, coefficient layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.engine import merge
from mergelab.errors import SpecError
from mergelab.methods.data_informed import registry
from mergelab.methods.data_informed.adamerging import (
    AdaMergingParams,
    CoefficientMerge,
    TaskVectorPool,
    _run,
    adamerging,
    entropy_objective,
    load_task_vectors,
    softmax_entropy,
)
from mergelab.methods.data_informed.context import MergeContext
from mergelab.models import load_backbone_state, read_backbone_state
from mergelab.models.pretraining import PretrainConfig
from mergelab.spec import DataSpec
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

TASKS = ["mnist_parity", "mnist_rot90"]
ZOO_DIR = "tiny_zoo_adamerging_surgery"  # shared with tests/test_surgery.py (same specs: cached the second time)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(pretrained folder, experts) of a tiny resnet_s zoo: 5 pretraining steps, 10 fine-tuning steps."""
    root = tmp_path_factory.getbasetemp() / ZOO_DIR
    pre = pretrain_tiny(root, PretrainConfig(steps=5, batch_size=16, lr=0.05), n=128)
    experts = [finetune(dict(task=t, steps=10, batch_size=16, data_ratio=0.05), root) for t in TASKS]
    return pre.path, experts


def _context(zoo, weights=(1.0, 1.0), **data) -> MergeContext:
    pre, experts = zoo
    return MergeContext.from_spec(pre, [(e.path, w) for e, w in zip(experts, weights)], DataSpec(**data),
                                  torch.device("cpu"), progress=False)


def _spec(zoo, method, parameters, weights=(1.0, 1.0), **extra):
    pre, experts = zoo
    return {"method": method, "base": str(pre), "parameters": parameters,
            "models": [{"path": str(e.path), "weight": w} for e, w in zip(experts, weights)], **extra}


# ------------------------------------------------------------------------------------------ closed form


def test_coefficient_merge_matches_hand_computed_values():
    base = {"a.weight": torch.tensor([1.0, 2.0]), "a.running_mean": torch.tensor([0.0]),
            "a.running_var": torch.tensor([1.0]), "b.weight": torch.tensor([10.0]), "a.count": torch.tensor([7])}
    taus = {"a.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "a.running_mean": torch.tensor([[2.0], [4.0]]),
            "a.running_var": torch.tensor([[-0.5], [-0.9]]), "b.weight": torch.tensor([[1.0], [-1.0]])}
    pool = TaskVectorPool(base, taus, ["t1", "t2"])
    layer = CoefficientMerge(pool, ["a.weight", "b.weight"], "layer")
    lam = torch.tensor([[0.5, 0.1], [0.25, 0.2]], requires_grad=True)
    out = layer.state(lam)
    assert torch.allclose(out["a.weight"], torch.tensor([1.5, 2.25]))
    assert torch.allclose(out["b.weight"], torch.tensor([10.0 + 0.1 - 0.2]))
    assert torch.allclose(out["a.running_mean"], torch.tensor([0.5 * 2 + 0.25 * 4]))  # a.weight's column
    assert torch.equal(out["a.count"], base["a.count"])
    assert torch.allclose(out["a.running_var"], torch.tensor([1.0 - 0.25 - 0.225]))
    assert not out["a.running_mean"].requires_grad and out["a.weight"].requires_grad
    task = CoefficientMerge(pool, ["a.weight", "b.weight"], "task")
    assert task.shape == (2, 1) and task.columns == ["all"]
    out = task.state(torch.tensor([[0.5], [2.0]]))
    assert torch.allclose(out["b.weight"], torch.tensor([10.0 + 0.5 - 2.0]))
    assert torch.equal(out["a.running_var"], torch.tensor([0.0]))  # 1 - 0.25 - 1.8 < 0: a variance stays >= 0
    assert torch.allclose(out["a.running_mean"], torch.tensor([0.5 * 2 + 2.0 * 4]))
    assert torch.equal(task.initial(0.3, [1.0, 2.0]), torch.tensor([[0.3], [0.6]]))


def test_softmax_entropy_closed_form():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [0.0, 0.0, torch.log(torch.tensor(3.0)), 0.0]])
    h = softmax_entropy(logits)
    p = torch.tensor([1 / 6, 1 / 6, 1 / 2, 1 / 6])
    assert h[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    assert h[2].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


# --------------------------------------------------------------------------------------- on tiny experts


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_steps_equals_task_arithmetic(zoo, tmp_path, granularity):
    weights = (1.0, 0.5)  # lambda_i(0) = init * w_i, as task arithmetic scales w_i tau_i by lambda
    ta = merge(_spec(zoo, "task_arithmetic", {"lambda": 0.3}, weights), tmp_path / "ta", progress=False)
    ada = merge(_spec(zoo, "adamerging", {"granularity": granularity, "steps": 0}, weights), tmp_path / "ada",
                progress=False)
    assert ada.method == "adamerging" and ada.record["parameters"]["init"] == 0.3
    expected, got = read_backbone_state(ta.out_dir), read_backbone_state(ada.out_dir)
    assert list(got) == list(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-6, atol=1e-7), name


def test_bn_batch_mode_reestimates_running_statistics_of_the_result(zoo, tmp_path):
    from mergelab.evaluation import reset_bn_statistics

    context = _context(zoo, samples_per_task=40, batch_size=16)
    state, coef = adamerging(context, {"granularity": "task", "steps": 0, "bn": "batch"})
    ta = merge(_spec(zoo, "task_arithmetic", {"lambda": 0.3}), tmp_path / "ta", progress=False)
    backbone = context.build_backbone()
    load_backbone_state(backbone, read_backbone_state(ta.out_dir))
    x = torch.cat([context.samples(t, "test")[0] for t in context.tasks])
    reset_bn_statistics(backbone, x, batch_size=16, num_batches=5, seed=0)
    expected = backbone.state_dict()
    for name, t in state.items():
        assert torch.allclose(t, expected[name], rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(state["stem.bn.running_var"], read_backbone_state(ta.out_dir)["stem.bn.running_var"])
    _, coef = adamerging(context, {"granularity": "task", "steps": 3, "bn": "batch", "lr": 0.05})
    assert len(coef.objective) == 3 and all(v > 0 for v in coef.objective)


def test_entropy_objective_decreases(zoo):
    # batch_size >= samples_per_task: every step sees each task's whole set, so the objective is exact
    context = _context(zoo, samples_per_task=24, batch_size=24)
    state, coef = adamerging(context, {"granularity": "layer", "steps": 12, "lr": 0.02})
    assert len(coef.objective) == 12
    assert coef.objective[-1] < coef.objective[0] - 1e-3
    assert coef.values.shape == (2, 27) and not torch.equal(coef.values, coef.initial)
    # the returned state is theta(lambda) at the learned coefficients: its objective is the lowest
    backbone = context.build_backbone().eval()
    xs = {t: context.samples(t, "test")[0] for t in context.tasks}
    heads = {t: context.head(t) for t in context.tasks}
    with torch.no_grad():
        final = entropy_objective(backbone, heads, state, xs).item()
    assert final < coef.objective[0]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_matches_finite_differences(zoo, granularity):
    context = _context(zoo, samples_per_task=6)
    backbone = context.build_backbone().eval()
    pool = load_task_vectors(context, backbone, dtype=torch.float64)
    merge_fn = CoefficientMerge(pool, [n for n, _ in backbone.named_parameters()], granularity)
    heads = {t: context.head(t) for t in context.tasks}
    batches = {t: context.samples(t, "test")[0].double() for t in context.tasks}
    g = torch.Generator().manual_seed(1)
    lam = (0.2 + 0.3 * torch.rand(merge_fn.shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    # BN running statistics follow lambda without gradient (eval-mode batch_norm is not differentiable in
    # them): the gradient is the partial one through the parameters, so they stay fixed at lam here
    with torch.no_grad():
        frozen = {n: t for n, t in merge_fn.state(lam).items() if n not in merge_fn.parameter_names}

    def f(c: torch.Tensor) -> torch.Tensor:
        return entropy_objective(backbone, heads, merge_fn.state(c) | frozen, batches)

    (grad,) = torch.autograd.grad(f(lam), lam)
    eps = 1e-6
    coords = [(i, k) for i in range(2) for k in ([0] if granularity == "task" else [0, 1, 5, 13, 26])]
    checked = 0
    with torch.no_grad():
        f0 = f(lam).item()
        for i, k in coords:
            step = torch.zeros_like(lam)
            step[i, k] = eps
            up, down = f(lam + step).item(), f(lam - step).item()
            forward, backward = (up - f0) / eps, (f0 - down) / eps
            # a ReLU switching inside [lam - eps, lam + eps] makes f non-differentiable there (the one-sided
            # slopes differ): where the weights put a kink is an accident of training, so such a coordinate
            # is skipped rather than failed; everywhere else the central difference must match
            if abs(forward - backward) > 1e-4 * max(1.0, abs(forward)):
                continue
            checked += 1
            assert grad[i, k].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9), (i, k)
    assert checked >= len(coords) // 2


def test_clamping_keeps_coefficients_in_the_unit_interval(zoo):
    context = _context(zoo, samples_per_task=8, batch_size=8)
    _, clamped = adamerging(context, {"granularity": "layer", "steps": 3, "lr": 0.5, "clamp": True})
    v = clamped.values
    assert v.min() >= 0.0 and v.max() <= 1.0
    assert ((v == 0.0) | (v == 1.0)).any()  # the projection was active
    _, free = adamerging(context, {"granularity": "layer", "steps": 3, "lr": 0.5, "clamp": False})
    assert (free.values < 0.0).any() or (free.values > 1.0).any()


def test_layer_wise_has_one_coefficient_per_expert_and_tensor(zoo):
    context = _context(zoo, samples_per_task=8, batch_size=8)
    backbone = context.build_backbone()
    names = [n for n, _ in backbone.named_parameters()]
    _, layer = adamerging(context, {"granularity": "layer", "steps": 1})
    assert layer.values.shape == (len(context.experts), len(names)) and layer.tensors == names
    assert layer.experts == TASKS
    _, task = adamerging(context, {"granularity": "task", "steps": 1})
    assert task.values.shape == (2, 1) and task.tensors == ["all"]
    pool = load_task_vectors(context, backbone)
    m = CoefficientMerge(pool, names, "layer")
    assert m.column_of("layer2.0.bn1.running_var") == names.index("layer2.0.bn1.weight")
    assert m.column_of("layer2.0.shortcut.bn.running_mean") == names.index("layer2.0.shortcut.bn.weight")


def test_coefficients_are_recorded_when_the_context_collects_outputs(zoo):
    context = _context(zoo, samples_per_task=8, batch_size=8)
    context.outputs = {}  # the proposed MergeContext.outputs
    _run(context, AdaMergingParams(granularity="task", steps=1))
    rec = context.outputs["adamerging"]
    assert rec["granularity"] == "task" and rec["experts"] == TASKS and len(rec["values"]) == 2
    assert rec["objective"]["steps"] == 1


def test_errors(zoo, tmp_path):
    assert "adamerging" in registry()
    with pytest.raises(SpecError, match="no expert in the pool for task.*mnist_invert"):
        merge(_spec(zoo, "adamerging", {"steps": 0}, data={"tasks": ["mnist_invert"]}), tmp_path / "a",
              progress=False)
    with pytest.raises(SpecError, match="granularity"):
        merge(_spec(zoo, "adamerging", {"granularity": "block"}), tmp_path / "b", progress=False)
    with pytest.raises(SpecError, match="does not take parameter.*'lambda'"):
        merge(_spec(zoo, "adamerging", {"lambda": 0.3}), tmp_path / "c", progress=False)
    with pytest.raises(SpecError, match="lr"):
        merge(_spec(zoo, "adamerging", {"lr": 0.0}), tmp_path / "d", progress=False)
    assert not any(Path(tmp_path).iterdir())
