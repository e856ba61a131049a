"""FW-Merging: the oracle, the gap, hard/soft FW on convex problems with known optima, and the zoo method
(loadable output, memory bounded by the selection whatever the pool size, irrelevant experts left out)."""

from __future__ import annotations

import json
import sys
import weakref

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergelab.errors import SpecError
from mergelab.methods.data_informed import parse_params, registry
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.frank_wolfe import (
    MODEL_GROUP,
    UNASSIGNED_GROUP,
    FunctionObjective,
    FWConfig,
    FWHardParams,
    FWSoftParams,
    TensorPool,
    frank_wolfe,
    line_search,
    linear_minimization_oracle,
    run_frank_wolfe,
    tensor_groups,
)
from mergelab.models import build_backbone, load_backbone_state, read_backbone_state
from mergelab.models.pretraining import PretrainConfig
from mergelab.spec import DataSpec
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune

F64 = torch.float64


# ------------------------------------------------------------------------------------ convex test bed


def _points(rows) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.tensor(r, dtype=F64)} for r in rows]


def _hull_projection(vertices: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Reference: argmin ||V^T w - p||^2 over the probability simplex (SLSQP), i.e. the projection onto the hull."""
    n = len(vertices)
    res = minimize(lambda w: ((vertices.T @ w - p) ** 2).sum(), np.full(n, 1 / n),
                   jac=lambda w: 2 * vertices @ (vertices.T @ w - p), bounds=[(0, 1)] * n,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    return vertices.T @ res.x


# A quadrilateral and a point outside it: the projection lies inside the edge (2,0)-(2,2).
SQUARE = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 1.5]])
P_OUT = np.array([3.0, 1.2])


def _quadratic(p: np.ndarray) -> FunctionObjective:
    target = torch.tensor(p, dtype=F64)
    return FunctionObjective(lambda th: ((th["x"] - target) ** 2).sum())


def test_reference_projection_is_on_the_edge():
    assert _hull_projection(SQUARE, P_OUT) == pytest.approx([2.0, 1.2], abs=1e-6)


# ------------------------------------------------------------------------------------------- the oracle


def test_lmo_picks_the_most_negative_inner_product():
    theta = {"x": torch.tensor([0.0, 0.0, 0.0], dtype=F64)}
    grad = {"x": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    rows = [[1, 0, 0], [0, 1, 0], [0, 0, -1], [-1, 0.4, 0], [0, 3, 0]]  # <g, v>: 1, -2, -0.5, -1.8, -6
    pool = TensorPool(_points(rows))
    lmo = linear_minimization_oracle(grad, theta, pool, {MODEL_GROUP: ["x"]}, k=3)
    assert lmo.selected() == {MODEL_GROUP: [4, 1, 3]}
    assert lmo.inner[:, 0].tolist() == pytest.approx([1.0, -2.0, -0.5, -1.8, -6.0])
    assert lmo.gap == pytest.approx(6.0) and lmo.selected_gap == pytest.approx(6.0)
    assert pool.loads == 5  # one streaming pass
    # theta enters as <g, s - theta>: the ranking is the same, the gap shifts by <g, theta>
    theta2 = {"x": torch.tensor([0.0, 1.0, 0.0], dtype=F64)}
    lmo2 = linear_minimization_oracle(grad, theta2, pool, {MODEL_GROUP: ["x"]}, k=1)
    assert lmo2.selected() == {MODEL_GROUP: [4]} and lmo2.gap == pytest.approx(6.0 - 2.0)
    # cosine scores (the public code's): sum over tensors of cos(g, s); the scale of s no longer matters
    cos = linear_minimization_oracle(grad, theta, pool, {MODEL_GROUP: ["x"]}, score="cosine", k=2)
    cosines = [float(torch.nn.functional.cosine_similarity(grad["x"], torch.tensor(r, dtype=F64), 0)) for r in rows]
    assert cos.cosine[:, 0].tolist() == pytest.approx(cosines)
    assert cos.selected()[MODEL_GROUP] == list(np.argsort(cosines, kind="stable")[:2])
    assert cos.gap == pytest.approx(6.0)  # the gap stays the inner-product FW gap
    assert cos.selected_gap == pytest.approx(-cos.inner[cos.selection[0, 0], 0].item())


def test_layer_wise_lmo_picks_a_vertex_per_tensor():
    theta = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    grad = {"a": torch.tensor([1.0, 0.0], dtype=F64), "b": torch.tensor([0.0, 1.0], dtype=F64)}
    vertices = [
        {"a": torch.tensor([-1.0, 0], dtype=F64), "b": torch.tensor([0, 2.0], dtype=F64)},  # a: -1, b: 2
        {"a": torch.tensor([3.0, 0], dtype=F64), "b": torch.tensor([0, -3.0], dtype=F64)},  # a: 3, b: -3
        {"a": torch.tensor([-0.5, 9], dtype=F64), "b": torch.tensor([5, -1.0], dtype=F64)},  # a: -0.5, b: -1
    ]
    pool = TensorPool(vertices)
    layer = linear_minimization_oracle(grad, theta, pool, {"a": ["a"], "b": ["b"]}, k=2)
    assert layer.selected() == {"a": [0, 2], "b": [1, 2]}
    assert layer.gap == pytest.approx(1.0 + 3.0)  # sum of the per-tensor gaps
    task = linear_minimization_oracle(grad, theta, pool, {MODEL_GROUP: ["a", "b"]}, k=1)
    assert task.selected() == {MODEL_GROUP: [2]} and task.gap == pytest.approx(1.5)  # totals 1, 0, -1.5
    assert layer.gap >= task.gap  # the product of the per-tensor hulls contains the joint hull


def test_tensor_groups_buffers_follow_their_module():
    names = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "norm_free.running_mean"]
    params = {"conv.weight", "bn.weight", "bn.bias"}
    assert tensor_groups(names, "task", params) == {MODEL_GROUP: names}
    assert tensor_groups(names, "layer", params) == {
        "conv.weight": ["conv.weight"],
        "bn.weight": ["bn.weight", "bn.running_mean", "bn.running_var"],
        "bn.bias": ["bn.bias"],
        UNASSIGNED_GROUP: ["norm_free.running_mean"],
    }
    groups = tensor_groups([n for n, _ in build_backbone("resnet_s").state_dict().items()
                            if not n.endswith("num_batches_tracked")], "layer",
                           {n for n, _ in build_backbone("resnet_s").named_parameters()})
    assert groups["stem.bn.weight"] == ["stem.bn.weight", "stem.bn.running_mean", "stem.bn.running_var"]
    assert UNASSIGNED_GROUP not in groups


def test_line_search_finds_the_minimum_and_never_increases():
    gamma, value, evals = line_search(lambda g: (g - 0.37) ** 2, 0.37**2, steps=20)
    assert gamma == pytest.approx(0.37, abs=1e-4) and value <= 0.37**2 and evals == 4 + 20
    gamma, value, _ = line_search(lambda g: g, 0.0)  # increasing: stay
    assert gamma == 0.0 and value == 0.0
    gamma, _, _ = line_search(lambda g: -g, 0.0, upper=0.5)  # decreasing: the end of the interval
    assert gamma == 0.5


# --------------------------------------------------------------------------------------- FW core, convex


def test_hard_fw_with_line_search_converges_to_the_projection_onto_the_hull():
    x_star = _hull_projection(SQUARE, P_OUT)
    f_star = float(((x_star - P_OUT) ** 2).sum())
    pool = TensorPool(_points(SQUARE))
    theta0 = {"x": torch.tensor([0.0, 0.0], dtype=F64)}
    theta, trace = run_frank_wolfe(_quadratic(P_OUT), pool, theta0,
                                   FWConfig("hard", 300, "line_search", line_search_steps=30, gap_tolerance=-1.0))
    assert theta["x"].numpy() == pytest.approx(x_star, abs=1e-2)
    assert trace.final_objective == pytest.approx(f_star, abs=1e-3)
    objectives = [it.objective for it in trace.iterations]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:]))  # monotone with a line search
    assert all(it.gap >= -1e-12 for it in trace.iterations)  # the start is a vertex: always in the hull
    assert theta0["x"].tolist() == [0.0, 0.0]  # the start is not modified
    # an optimum at a vertex is reached exactly, and the gap test stops the run there
    theta, trace = run_frank_wolfe(_quadratic(np.array([3.0, 3.0])), pool, theta0, FWConfig("hard", 50))
    assert theta["x"].tolist() == pytest.approx([2.0, 2.0]) and trace.stop_reason == "gap"
    assert trace.iterations[-1].gap == pytest.approx(0.0, abs=1e-12)


def test_hard_fw_with_the_schedule_has_the_o_one_over_t_rate():
    x_star = _hull_projection(SQUARE, P_OUT)
    f_star = float(((x_star - P_OUT) ** 2).sum())
    pool = TensorPool(_points(SQUARE))
    _, trace = run_frank_wolfe(_quadratic(P_OUT), pool, {"x": torch.tensor([0.0, 1.5], dtype=F64)},
                               FWConfig("hard", 400, "schedule", gap_tolerance=-1.0))
    # Jaggi (2013): h_t <= 2 C_f / (t + 2) and min_{s<=t} g_s <= 27/4 C_f / (t + 2), with C_f <= L diam^2 = 2 * 8
    c_f = 2.0 * 8.0
    gaps = np.array(trace.gaps)
    for it in trace.iterations[1:]:
        assert it.objective - f_star <= 2 * c_f / (it.t + 2) + 1e-9
        assert gaps[: it.t + 1].min() <= 6.75 * c_f / (it.t + 2)
    assert (gaps >= -1e-12).all()
    # and the rate is really ~1/t: 4x the iterations shrink the (window-averaged) primal and FW gaps over 2x
    h = np.array([it.objective for it in trace.iterations]) - f_star
    assert h[300:400].mean() < 0.5 * h[75:100].mean() and gaps[300:400].mean() < 0.5 * gaps[75:100].mean()
    assert [it.step for it in trace.iterations[:3]] == pytest.approx([1.0, 2 / 3, 0.5])
    _, scaled = run_frank_wolfe(_quadratic(P_OUT), pool, {"x": torch.tensor([0.0, 1.5], dtype=F64)},
                                FWConfig("hard", 2, "schedule", step_size=0.5))
    assert [it.step for it in scaled.iterations] == pytest.approx([0.5, 1 / 3])


@pytest.mark.parametrize("simplex", ["solid", "probability"])
def test_soft_fw_with_all_vertices_reaches_the_optimum_in_a_few_iterations(simplex):
    x_star = _hull_projection(SQUARE, P_OUT)
    pool = TensorPool(_points(SQUARE))
    theta, trace = run_frank_wolfe(_quadratic(P_OUT), pool, {"x": torch.tensor([0.0, 0.0], dtype=F64)},
                                   FWConfig("soft", 3, k=4, pgd_steps=300, pgd_lr=0.1, simplex=simplex,
                                            gap_tolerance=1e-3))
    assert theta["x"].numpy() == pytest.approx(x_star, abs=2e-3)
    coefficients = trace.iterations[0].coefficients[MODEL_GROUP]
    assert min(coefficients) >= 0 and sum(coefficients) <= 1 + 1e-9
    if simplex == "probability":
        assert sum(coefficients) == pytest.approx(1.0)


def test_soft_fw_from_outside_the_hull_keeps_the_current_point_as_an_option():
    # the start is the optimum of the objective itself (outside the hull): the solid simplex allows lambda = 0
    p = np.array([3.0, 1.2])
    pool = TensorPool(_points(SQUARE))
    theta, trace = run_frank_wolfe(_quadratic(p), pool, {"x": torch.tensor(p, dtype=F64)},
                                   FWConfig("soft", 5, k=2, pgd_steps=50))
    assert theta["x"].numpy() == pytest.approx(p) and trace.stop_reason in ("gap", "no_progress")


def test_the_gap_is_nonnegative_in_the_hull_and_the_stopping_rule_fires():
    gen = torch.Generator().manual_seed(0)
    vertices = torch.randn(6, 5, generator=gen, dtype=F64)
    target = torch.randn(5, generator=gen, dtype=F64) * 3
    # a smooth non-quadratic objective (log-sum-exp + quadratic), started inside the hull
    obj = FunctionObjective(lambda th: torch.logsumexp(th["x"], 0) + ((th["x"] - target) ** 2).sum())
    start = {"x": vertices.mean(0)}
    _, trace = run_frank_wolfe(obj, TensorPool([{"x": v} for v in vertices]), start,
                               FWConfig("hard", 500, "schedule", gap_tolerance=0.05))
    assert all(g >= -1e-9 for g in trace.gaps)
    assert trace.stop_reason == "gap" and len(trace.iterations) < 500
    assert trace.iterations[-1].stopped and 0 <= trace.iterations[-1].gap <= 0.05
    assert all(g > 0.05 for g in trace.gaps[:-1])
    json.dumps(trace.to_dict())


def test_the_pool_is_streamed_once_per_iteration():
    pool = TensorPool(_points(SQUARE))
    run_frank_wolfe(_quadratic(P_OUT), pool, {"x": torch.zeros(2, dtype=F64)},
                    FWConfig("hard", 5, "schedule", gap_tolerance=-1.0))
    assert pool.loads == 5 * (4 + 1)  # the oracle's pass + the selected vertex


# ------------------------------------------------------------------------------------------ parameters


def test_parameters_and_registry():
    methods = registry()
    assert {"fw_hard", "fw_soft"} <= set(methods)
    hard = parse_params(methods["fw_hard"], {})
    assert (hard.iterations, hard.init, hard.init_lambda, hard.step, hard.granularity, hard.objective, hard.score) == (
        3, "task_arithmetic", 0.3, "line_search", "task", "ce", "inner_product")
    soft = parse_params(methods["fw_soft"], {"k": 2, "granularity": "layer"})
    assert (soft.iterations, soft.init, soft.k, soft.simplex) == (15, "pretrained", 2, "solid")
    with pytest.raises(SpecError, match="does not take parameter.*'step'"):
        parse_params(methods["fw_soft"], {"step": "schedule"})
    with pytest.raises(SpecError, match="step_size"):
        parse_params(methods["fw_hard"], {"step_size": 1.5})
    with pytest.raises(SpecError, match="granularity"):
        parse_params(methods["fw_hard"], {"granularity": "row"})
    with pytest.raises(SpecError, match="pgd_lr"):
        parse_params(methods["fw_soft"], {"pgd_lr": 0.0})


# --------------------------------------------------------------------------------------- the zoo method

RELEVANT = ["mnist_parity", "mnist_rot90"]
IRRELEVANT = "shapes"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(pretrained folder, {task: expert folder}) with a tiny pretrained resnet_s and three quick experts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fwzoo")
    pre = pretrain_tiny(root, PretrainConfig(steps=8, batch_size=32, lr=0.05))
    experts = {t: finetune(dict(task=t, steps=15, batch_size=32, data_ratio=0.1), root).path
               for t in [*RELEVANT, IRRELEVANT]}
    yield pre.path, experts
    torch.set_num_threads(before)


def _context(zoo, models, tasks=None, samples=32) -> MergeContext:
    pre, experts = zoo
    return MergeContext.from_spec(pre, [(experts[m], 1.0) for m in models],
                                  DataSpec(tasks=tasks, samples_per_task=samples), torch.device("cpu"), False)


def test_fw_hard_and_soft_merge_through_the_engine_into_a_loadable_backbone(zoo, tmp_path):
    from mergelab.engine import merge

    pre, experts = zoo
    for method, params in [("fw_hard", {"iterations": 1, "line_search_steps": 2}),
                           ("fw_soft", {"iterations": 2, "pgd_steps": 2, "granularity": "layer"})]:
        out = tmp_path / method
        spec = {"method": method, "base": str(pre), "models": [str(experts[t]) for t in RELEVANT],
                "parameters": params, "data": {"samples_per_task": 16}}
        result = merge(spec, out, progress=False)
        assert result.method == method
        state = read_backbone_state(out)
        backbone = build_backbone("resnet_s")
        load_backbone_state(backbone, state, source=str(out))
        record = json.loads((out / "mergelab_merge.json").read_text())
        assert record["method"] == method and record["parameters"]["iterations"] == params["iterations"]


class _LiveExperts:
    """Instrument ``MergeContext.expert_state``: bytes of expert tensors still alive, and the peak."""

    def __init__(self, monkeypatch) -> None:
        self.live = 0
        self.peak = 0
        self.calls = 0
        original = MergeContext.expert_state

        def counted(ctx, index):
            state = original(ctx, index)
            self.calls += 1
            for t in state.values():
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._release, n)
            self.peak = max(self.peak, self.live)
            return state

        monkeypatch.setattr(MergeContext, "expert_state", counted)

    def _release(self, n: int) -> None:
        self.live -= n


@pytest.mark.parametrize(
    ("params", "held"),
    [
        (FWHardParams(iterations=2, init="pretrained", line_search_steps=1), 1),
        (FWHardParams(iterations=2, granularity="layer", step="schedule"), 1),
        (FWSoftParams(iterations=2, k=2, pgd_steps=2), 2),
        (FWSoftParams(iterations=2, k=2, pgd_steps=2, granularity="layer", score="cosine"), 2),
    ],
)
def test_memory_is_bounded_by_the_selection_not_the_pool(zoo, monkeypatch, params, held):
    models = [*RELEVANT, IRRELEVANT] * 2  # a pool of 6 checkpoints
    context = _context(zoo, models, tasks=RELEVANT, samples=8)
    model_bytes = sum(t.numel() * t.element_size() for t in context.base_state().values())
    live = _LiveExperts(monkeypatch)
    state, trace = frank_wolfe(context, params)
    iterations = len([it for it in trace.iterations if not it.stopped])
    assert live.peak <= (held + 1) * model_bytes * 1.001  # the selected vertices + one streamed expert
    assert live.peak < len(models) * model_bytes
    assert live.calls <= len(trace.iterations) * len(models) + iterations * len(models)  # no caching
    assert live.live == 0  # nothing left behind
    assert set(state) == set(context.base_state())


def test_irrelevant_experts_are_not_selected_when_relevant_ones_exist():
    # by construction (no training): two tasks whose optima are the relevant vertices e1 and e2, and an
    # irrelevant vertex along a direction neither task's loss rewards. From theta_0 = 0 the gradient is
    # -2 (e1 + e2), so <g, e1> = <g, e2> = -2 and <g, irrelevant> = 0: the top-2 are the relevant vertices.
    e1, e2 = torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    irrelevant = torch.tensor([0.0, 0.0, 5.0], dtype=F64)
    objective = FunctionObjective(lambda th: ((th["x"] - e1) ** 2).sum() + ((th["x"] - e2) ** 2).sum())
    pool = TensorPool([{"x": irrelevant}, {"x": e1}, {"x": e2}])
    _, trace = run_frank_wolfe(objective, pool, {"x": torch.zeros(3, dtype=F64)},
                               FWConfig("soft", 1, k=2, pgd_steps=20))
    assert sorted(trace.iterations[0].selected[MODEL_GROUP]) == [1, 2]
    assert trace.final_objective < trace.initial_objective


def test_entropy_objective_and_missing_adamerging(zoo, monkeypatch):
    context = _context(zoo, RELEVANT, samples=8)
    state, trace = frank_wolfe(context, FWHardParams(iterations=1, objective="entropy", init="pretrained",
                                                     line_search_steps=1))
    assert trace.iterations[0].objective > 0 and set(state) == set(context.base_state())
    monkeypatch.setitem(sys.modules, "mergelab.methods.data_informed.adamerging", None)
    with pytest.raises(SpecError, match="init 'adamerging' needs"):
        frank_wolfe(context, FWHardParams(iterations=1, init="adamerging"))
