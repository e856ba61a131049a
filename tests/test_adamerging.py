"""AdaMerging: zero steps = task arithmetic, entropy decreases, exact gradients, clamping, coefficient layout.

What depends on the optimisation's outcome (the entropy falls, the projection becomes active) is tested on a
hand-built pool whose objective is known in closed form (:class:`HandContext`); the tiny trained experts only
serve properties that hold whatever training gave.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.merging import merge
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
)
from mergelab.methods.data_informed.context import ExpertHandle, MergeContext
from mergelab.methods.data_informed.objectives import softmax_entropy
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


class HandContext(MergeContext):
    """A MergeContext over hand-built tensors (no files, no training): the backbone is ``Linear(2, 2)`` with
    base weight 0 and bias 0, every expert's task vector is ``I`` on the weight (0 on the bias), and every
    task's head is the identity. So the merged features are ``s * x`` with ``s = sum_i lambda_i`` (layer-wise:
    the weight column's coefficients), and the entropy objective is ``sum_t mean_x H(softmax(s x))``, which
    strictly *decreases* in ``s > 0`` for any ``x`` with unequal coordinates (``dH/ds = -s Var_p(x) < 0``):
    every coefficient's gradient is negative wherever ``s > 0``.
    """

    X = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [2.0, 0.5], [0.0, 1.5]])

    def __init__(self, tasks=("a", "b"), batch_size: int = 4):
        experts = [ExpertHandle(Path(f"/hand/{t}"), t, "hand", 1.0, 2, 1.0) for t in tasks]
        super().__init__("hand", Path("/hand/base"), experts, list(tasks), DataSpec(batch_size=batch_size),
                         torch.device("cpu"), progress=False)

    def build_backbone(self) -> nn.Module:
        return nn.Linear(2, 2)

    def base_state(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}

    def expert_state(self, index: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.eye(2), "bias": torch.zeros(2)}

    def head(self, task: str) -> nn.Linear:
        head = nn.Linear(2, 2)
        with torch.no_grad():
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
        return head.requires_grad_(False)

    def samples(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X, torch.zeros(len(self.X), dtype=torch.long)


def _hand_objective(s: float) -> float:
    """The hand context's objective at ``s = sum of the weight coefficients`` (two tasks, same inputs)."""
    return 2 * softmax_entropy(s * HandContext.X).mean().item()


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
    bound = sum(math.log(context.head(t).out_features) for t in context.tasks)  # entropies in [0, log classes]
    assert len(coef.objective) == 3 and all(0.0 <= v <= bound + 1e-6 for v in coef.objective)


def test_entropy_objective_decreases_at_every_step():
    """By construction (:class:`HandContext`): every gradient coordinate of the weight coefficients is negative,
    so Adam's first moment stays negative and every step raises them; the objective, strictly decreasing in
    their sum, falls at every step. lr 0.01 keeps 12 steps inside [0, 1] (an Adam step moves a coordinate by at
    most lr (1 - beta1) / sqrt(1 - beta2) = 3.2 lr), so the projection never stops them."""
    context = HandContext()
    state, coef = adamerging(context, {"granularity": "layer", "steps": 12, "lr": 0.01})
    assert coef.tensors == ["weight", "bias"] and coef.values.shape == (2, 2)
    assert coef.objective[0] == pytest.approx(_hand_objective(0.6), rel=1e-6)  # init 0.3 per expert
    assert all(b < a for a, b in zip(coef.objective, coef.objective[1:])), coef.objective
    w = coef.values[:, 0]
    assert (w > coef.initial[:, 0]).all() and (w < 1.0).all()
    assert torch.equal(coef.values[:, 1], coef.initial[:, 1])  # the bias has no task vector: zero gradient
    # the returned state is theta(lambda) at the learned coefficients, and its objective is the lowest
    s = w.sum().item()
    torch.testing.assert_close(state["weight"], s * torch.eye(2))
    assert _hand_objective(s) < coef.objective[-1]


def test_objective_and_state_on_tiny_experts(zoo):
    """On real (trained) experts: what holds whatever the training gave -- one finite objective value per step,
    each a sum of two tasks' mean entropies in [0, 2 log(classes)], and the returned state is theta(lambda)
    at the returned coefficients."""
    # batch_size >= samples_per_task: every step sees each task's whole set, so the objective is exact
    context = _context(zoo, samples_per_task=24, batch_size=24)
    state, coef = adamerging(context, {"granularity": "layer", "steps": 3, "lr": 0.02})
    assert len(coef.objective) == 3 and coef.values.shape == (2, 27)
    bound = sum(math.log(context.head(t).out_features) for t in context.tasks)
    assert all(0.0 <= v <= bound + 1e-6 for v in coef.objective)
    backbone = context.build_backbone().eval()
    merge_fn = CoefficientMerge(load_task_vectors(context, backbone), [n for n, _ in backbone.named_parameters()],
                                "layer")
    with torch.no_grad():
        expected = merge_fn.state(coef.values)
    for name, t in expected.items():
        torch.testing.assert_close(state[name], t, rtol=1e-6, atol=1e-7)


class _SmoothFunctional:
    """``torch.nn.functional`` with ``relu`` replaced by the (exact, erf) GELU: a C-infinity backbone."""

    relu = staticmethod(nn.functional.gelu)

    def __getattr__(self, name: str):
        return getattr(nn.functional, name)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_matches_finite_differences(zoo, granularity, monkeypatch):
    """The gradient through the coefficient merge equals a central difference at every probed coordinate.

    The resnet's ReLUs are swapped for GELU (the merge and its gradient do not care which activation the
    backbone uses): with ReLUs, whether a kink lies within +-eps of a coordinate is an accident of the trained
    weights, so such coordinates had to be skipped and the test could only count how many remained. A smooth
    backbone makes f C-infinity in lambda, and in float64 with eps = 1e-6 the central difference is exact to
    O(eps^2) everywhere."""
    import mergelab.models.resnet

    monkeypatch.setattr(mergelab.models.resnet, "F", _SmoothFunctional())
    context = _context(zoo, samples_per_task=6)
    backbone = context.build_backbone().eval()
    backbone.stem.relu = nn.GELU()
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
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    eps = 1e-6
    coords = [(i, k) for i in range(2) for k in ([0] if granularity == "task" else [0, 1, 5, 13, 26])]
    with torch.no_grad():
        for i, k in coords:
            step = torch.zeros_like(lam)
            step[i, k] = eps
            central = (f(lam + step).item() - f(lam - step).item()) / (2 * eps)
            assert grad[i, k].item() == pytest.approx(central, rel=1e-5, abs=1e-9), (i, k)


def test_clamping_keeps_coefficients_in_the_unit_interval():
    """By construction (:class:`HandContext`, negative gradients): Adam's first step moves each weight
    coefficient by lr (1 - 1e-8 / |g|) upwards, 0.3 -> 1.3 with lr 1, and later steps move it further up. With
    the projection it stops at exactly 1; without it, it leaves [0, 1]."""
    context = HandContext()
    _, clamped = adamerging(context, {"granularity": "layer", "steps": 3, "lr": 1.0, "clamp": True})
    v = clamped.values
    assert v.min() >= 0.0 and v.max() <= 1.0
    assert torch.equal(v[:, 0], torch.ones(2))  # the projection was active
    _, free = adamerging(context, {"granularity": "layer", "steps": 3, "lr": 1.0, "clamp": False})
    assert (free.values[:, 0] > 1.3 - 1e-6).all()


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
