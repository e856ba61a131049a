"""FW-Merging: the oracle, the gap, hard/soft FW on convex problems with known optima, and the zoo method
(loadable output, memory bounded by the selection whatever the pool size, irrelevant experts left out)."""

from __future__ import annotations

import json
import math
import sys
import weakref

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergelab.errors import SpecError
from mergelab.methods.data_informed import parse_params, registry
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.frank_wolfe import FWConfig, FWHardParams, FWSoftParams, frank_wolfe, run_frank_wolfe
from mergelab.methods.data_informed.frank_wolfe_oracle import (
    MODEL_GROUP,
    UNASSIGNED_GROUP,
    linear_minimization_oracle,
    tensor_groups,
)
from mergelab.methods.data_informed.line_search import line_search
from mergelab.methods.data_informed.objectives import FunctionObjective, ModelObjective, TaskFunctionObjective
from mergelab.methods.data_informed.vertex_pools import TensorPool
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


# ----------------------------------------------------------------------------------- per-task oracle


def _unit(i: int, n: int = 4, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(n, dtype=F64)
    v[i] = scale
    return v


def _loud_task_objective() -> TaskFunctionObjective:
    # three tasks with optima e0, e1, e2; task "loud" weighs 10x, so at theta = 0 its gradient -20 e0 is 10x the
    # others' (-2 e1, -2 e2): the mean loss is dominated by it
    e = [_unit(i) for i in range(3)]
    return TaskFunctionObjective({
        "loud": lambda th: 10 * ((th["x"] - e[0]) ** 2).sum(),
        "quiet1": lambda th: ((th["x"] - e[1]) ** 2).sum(),
        "quiet2": lambda th: ((th["x"] - e[2]) ** 2).sum(),
    })


# vertices 0-2 serve the loud task (e0 scaled), 3 and 4 the quiet ones, 5 none (an irrelevant direction)
LOUD_POOL = [_unit(0), _unit(0, scale=0.9), _unit(0, scale=0.8), _unit(1), _unit(2), _unit(3, scale=5.0)]


def test_joint_oracle_follows_the_loud_task_and_per_task_gives_each_task_its_vertex():
    objective = _loud_task_objective()
    theta = {"x": torch.zeros(4, dtype=F64)}
    pool = TensorPool([{"x": v} for v in LOUD_POOL])
    value, task_values, task_grads = objective.task_values_and_grads(theta)
    assert task_values == pytest.approx({"loud": 10.0, "quiet1": 1.0, "quiet2": 1.0}) and value == pytest.approx(4.0)
    _, grad = objective.value_and_grad(theta)
    # joint scores <g, v> with g = (1/3)(-20 e0 - 2 e1 - 2 e2): -20/3, -18/3, -16/3, -2/3, -2/3, 0
    joint = linear_minimization_oracle(grad, theta, pool, {MODEL_GROUP: ["x"]}, k=3)
    assert joint.selected() == {MODEL_GROUP: [0, 1, 2]}  # only the loud task's vertices
    per_task = linear_minimization_oracle(None, theta, pool, {MODEL_GROUP: ["x"]}, k=3, oracle="per_task",
                                          task_grads=task_grads)
    assert per_task.proposed() == {MODEL_GROUP: [0, 3, 4]}  # each task's own argmin
    assert per_task.selected() == {MODEL_GROUP: [0, 3, 4]}  # one per task, best joint score first
    # the tables and the gap are the joint oracle's (the joint gradient is the mean of the tasks')
    assert per_task.inner[:, 0].tolist() == pytest.approx([-20 / 3, -6.0, -16 / 3, -2 / 3, -2 / 3, 0.0])
    assert per_task.gap == pytest.approx(joint.gap) and per_task.selected_gap == pytest.approx(20 / 3)
    assert per_task.task_tensor_inner[1, :, 0].tolist() == pytest.approx([0, 0, 0, -2.0, 0, 0])
    # k below the number of distinct proposals: the proposals with the best joint score (fw_hard's per_task)
    one = linear_minimization_oracle(None, theta, pool, {MODEL_GROUP: ["x"]}, k=1, oracle="per_task",
                                     task_grads=task_grads)
    assert one.selected() == {MODEL_GROUP: [0]}
    # k above it: filled with the best remaining vertices by joint score
    five = linear_minimization_oracle(None, theta, pool, {MODEL_GROUP: ["x"]}, k=5, oracle="per_task",
                                      task_grads=task_grads)
    assert five.selected() == {MODEL_GROUP: [0, 1, 2, 3, 4]}
    with pytest.raises(ValueError, match="per_task.*task_grads"):
        linear_minimization_oracle(grad, theta, pool, {MODEL_GROUP: ["x"]}, oracle="per_task")


def test_per_task_oracle_fills_coinciding_proposals_by_the_joint_score():
    # both quiet tasks' optima lie along e1 + e2, so both propose vertex 3; k = 3 takes the best other vertex
    # by joint score (the loud task's second vertex), never the irrelevant one
    both = _unit(1) + _unit(2)
    objective = TaskFunctionObjective({
        "loud": lambda th: 10 * ((th["x"] - _unit(0)) ** 2).sum(),
        "quiet1": lambda th: ((th["x"] - both) ** 2).sum(),
        "quiet2": lambda th: ((th["x"] - both) ** 2).sum(),
    })
    pool = TensorPool([{"x": v} for v in [_unit(0), _unit(0, scale=0.9), _unit(3, scale=5.0), both]])
    theta = {"x": torch.zeros(4, dtype=F64)}
    _, _, task_grads = objective.task_values_and_grads(theta)
    lmo = linear_minimization_oracle(None, theta, pool, {MODEL_GROUP: ["x"]}, k=3, oracle="per_task",
                                     task_grads=task_grads)
    assert lmo.proposed() == {MODEL_GROUP: [0, 3, 3]}
    assert lmo.selected() == {MODEL_GROUP: [0, 1, 3]}  # joint scores -20/3, -6, 0, -8/3


def test_layer_wise_per_task_oracle_proposes_per_block():
    # two blocks; task A cares about block a only, task B about block b only; in each block the task that
    # cares proposes its best vertex, the indifferent one (zero gradient there: no vertex decreases its
    # linearised loss) proposes none (-1), and the second slot is filled by the joint score
    objective = TaskFunctionObjective({
        "A": lambda th: 10 * ((th["a"] - 1.0) ** 2).sum(),
        "B": lambda th: ((th["b"] - 1.0) ** 2).sum(),
    })
    theta = {"a": torch.zeros(1, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    rows = [(0.0, 0.0), (1.0, 0.2), (0.3, 1.0), (0.9, 0.9)]
    pool = TensorPool([{"a": torch.tensor([a], dtype=F64), "b": torch.tensor([b], dtype=F64)} for a, b in rows])
    _, _, task_grads = objective.task_values_and_grads(theta)
    lmo = linear_minimization_oracle(None, theta, pool, {"a": ["a"], "b": ["b"]}, k=2, oracle="per_task",
                                     task_grads=task_grads)
    assert lmo.proposed() == {"a": [1, -1], "b": [-1, 2]}
    assert lmo.selected() == {"a": [1, 3], "b": [2, 3]}  # joint scores: a 0, -10, -3, -9; b 0, -0.2, -1, -0.9


def test_soft_fw_with_the_per_task_oracle_reaches_the_optimum_the_joint_oracle_cannot():
    # the mean loss's minimiser x* = (10 e0 + e1 + e2) / 12 is the convex combination 10/12, 1/12, 1/12 of
    # the vertices e0, e1, e2: one soft step on the per-task selection reaches it; the joint selection (three
    # multiples of e0) only reaches the best point on the e0 axis, x = 10/12 e0
    objective = _loud_task_objective()
    theta0 = {"x": torch.zeros(4, dtype=F64)}
    x_star = (10 * _unit(0) + _unit(1) + _unit(2)) / 12
    f_star = float(objective.value({"x": x_star}))
    f_axis = float(objective.value({"x": _unit(0, scale=10 / 12)}))
    assert f_axis > f_star + 0.05
    config = dict(k=3, pgd_steps=400, pgd_lr=0.01)
    theta, per_task = run_frank_wolfe(objective, TensorPool([{"x": v} for v in LOUD_POOL]), theta0,
                                      FWConfig("soft", 1, oracle="per_task", **config))
    assert per_task.iterations[0].selected == {MODEL_GROUP: [0, 3, 4]}
    assert per_task.iterations[0].proposals == {MODEL_GROUP: [0, 3, 4]}
    assert per_task.tasks == ["loud", "quiet1", "quiet2"]
    assert per_task.iterations[0].task_objectives == pytest.approx({"loud": 10.0, "quiet1": 1.0, "quiet2": 1.0})
    assert theta["x"].numpy() == pytest.approx(x_star.numpy(), abs=5e-3)
    assert per_task.final_objective == pytest.approx(f_star, abs=1e-4)  # f_axis - f_star = 0.056
    _, joint = run_frank_wolfe(objective, TensorPool([{"x": v} for v in LOUD_POOL]), theta0,
                               FWConfig("soft", 1, oracle="joint", **config))
    assert joint.iterations[0].selected == {MODEL_GROUP: [0, 1, 2]} and joint.iterations[0].proposals is None
    assert joint.final_objective >= f_axis - 1e-9
    json.dumps(per_task.to_dict())
    with pytest.raises(ValueError, match="per-task gradients"):
        run_frank_wolfe(_quadratic(P_OUT), TensorPool(_points(SQUARE)), {"x": torch.zeros(2, dtype=F64)},
                        FWConfig("soft", 1, oracle="per_task"))


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


def test_task_wise_oracle_with_layer_wise_coefficients_solves_each_block():
    # two blocks; the objective ||a - p_a||^2 + ||b - p_b||^2 is separable, so with one coefficient vector per
    # block the optimum is each block's own least-squares solution, in closed form: a = lam_a1 v1_a + lam_a2 v2_a
    # gives lam_a = p_a = (0.2, 0.5); b = (2 lam_b1, 4 lam_b2) = (1, 1) gives lam_b = (0.5, 0.25) (both inside the
    # solid simplex), objective 0. One vector for the whole model is a compromise: d/dl1 = 2(l1 - .2) + 4(2 l1 - 1)
    # = 0 -> l1 = 0.44; d/dl2 = 2(l2 - .5) + 8(4 l2 - 1) = 0 -> l2 = 9/34, objective 0.1308 > 0.
    p_a, p_b = torch.tensor([0.2, 0.5], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    objective = FunctionObjective(lambda th: ((th["a"] - p_a) ** 2).sum() + ((th["b"] - p_b) ** 2).sum())

    def vertex(a, b):
        return {"a": torch.tensor(a, dtype=F64), "b": torch.tensor(b, dtype=F64)}

    # v0, v1 and a third vertex the task-wise oracle leaves out (<g, v2> = +2.4 > 0)
    pool = TensorPool([vertex([1, 0], [2, 0]), vertex([0, 1], [0, 4]), vertex([-1, 0], [0, -1])])
    theta0 = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    task = {MODEL_GROUP: ["a", "b"]}
    layer = {"a": ["a"], "b": ["b"]}
    _, grad = objective.value_and_grad(theta0)
    lmo = linear_minimization_oracle(grad, theta0, pool, task, k=2)
    assert lmo.selected() == {MODEL_GROUP: [1, 0]}  # <g, v>: -4.4, -9, +2.4
    # the coefficient gradient at lam = 0 from the oracle's per-tensor table: <grad_C, s_j,C - theta_C>
    assert lmo.coefficient_gradient(layer, task).tolist() == [[-1.0, -0.4], [-8.0, -4.0]]
    assert lmo.coefficient_gradient(task, task).tolist() == [[-9.0, -4.4]]
    config = FWConfig("soft", 1, k=2, pgd_steps=500, pgd_lr=0.05)
    theta, trace = run_frank_wolfe(objective, pool, theta0, config, task, coefficient_groups=layer)
    assert trace.granularity == "task" and trace.coefficients == "layer" and trace.coefficient_groups == ["a", "b"]
    coefficients = trace.iterations[0].coefficients  # slots: vertex 1, then vertex 0
    assert coefficients["a"] == pytest.approx([0.5, 0.2], abs=5e-3)
    assert coefficients["b"] == pytest.approx([0.25, 0.5], abs=5e-3)
    assert theta["a"].tolist() == pytest.approx(p_a.tolist(), abs=5e-3)
    assert theta["b"].tolist() == pytest.approx(p_b.tolist(), abs=5e-3)
    assert trace.final_objective == pytest.approx(0.0, abs=1e-4)
    _, whole = run_frank_wolfe(objective, pool, theta0, config, task)
    assert whole.coefficients == "task"
    assert whole.iterations[0].coefficients[MODEL_GROUP] == pytest.approx([9 / 34, 0.44], abs=5e-3)
    assert whole.final_objective == pytest.approx(0.24**2 + (0.5 - 9 / 34) ** 2 + 0.12**2 + (1 - 36 / 34) ** 2,
                                                  abs=1e-4)


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


# ------------------------------------------------------------------------------ BatchNorm and the gradient


def test_an_oracle_blind_to_a_tensor_the_update_moves_stalls_at_its_start():
    # The mechanism of fw_hard returning its task-arithmetic start on the BatchNorm zoo: the update moves every
    # floating tensor (weights and BN running statistics) towards the vertex, but the gradient covered the
    # parameters only. Here l = (w - 1)^2 + 10 (m + 0.2)^2 at w = m = 0 (m plays a running statistic):
    # the w-only gradient (-2) scores vertex 0 (w = 1, m = 1) at -2, vertex 1 (w = 0.5, m = 0) at -1, and picks
    # vertex 0; along it phi(gamma) = (gamma - 1)^2 + 10 (gamma + 0.2)^2 rises from gamma = 0 (phi'(0) = +2),
    # so the line search returns gamma = 0 and the run stops at iteration 0 with the start unchanged (its FW
    # gap, +2, is positive: nothing is wrong with the gap test). With the gradient in m too (+4), vertex 0
    # scores +2, vertex 1 -1, and the run descends.
    fn = lambda th: ((th["w"] - 1) ** 2).sum() + 10 * ((th["m"] + 0.2) ** 2).sum()  # noqa: E731
    pool = TensorPool([{"w": torch.tensor([1.0], dtype=F64), "m": torch.tensor([1.0], dtype=F64)},
                       {"w": torch.tensor([0.5], dtype=F64), "m": torch.tensor([0.0], dtype=F64)}])
    start = {"w": torch.zeros(1, dtype=F64), "m": torch.zeros(1, dtype=F64)}
    theta, blind = run_frank_wolfe(FunctionObjective(fn, differentiable=["w"]), pool, start, FWConfig("hard", 3))
    assert blind.stop_reason == "no_progress" and len(blind.iterations) == 1
    first = blind.iterations[0]
    assert first.selected == {MODEL_GROUP: [0]} and first.step == 0.0 and first.gap == pytest.approx(2.0)
    assert theta["w"].item() == 0.0 and theta["m"].item() == 0.0
    theta, full = run_frank_wolfe(FunctionObjective(fn), pool, start, FWConfig("hard", 3))
    assert full.iterations[0].selected == {MODEL_GROUP: [1]} and full.iterations[0].step == 1.0
    assert full.final_objective == pytest.approx(0.25 + 0.4) and theta["w"].item() == pytest.approx(0.5)


class _TinyBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def _tiny_bn_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _TinyBN().double()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.randn(3, generator=gen, dtype=F64) * 0.3)
        net.bn.running_var.copy_(torch.rand(3, generator=gen, dtype=F64) + 0.5)
        net.bn.weight.copy_(torch.rand(3, generator=gen, dtype=F64) + 0.5)
        net.bn.bias.copy_(torch.randn(3, generator=gen, dtype=F64) * 0.1)
    heads = {t: torch.nn.Linear(3, 4).double() for t in ("t1", "t2")}
    data = {t: (torch.randn(7, 1, 5, 5, generator=gen, dtype=F64), torch.randint(0, 4, (7,), generator=gen))
            for t in heads}
    theta = {n: t.detach().clone() for n, t in net.state_dict().items() if t.is_floating_point()}
    return net, heads, data, theta


def _reference_loss(net, heads, data, theta, train: bool) -> float:
    """Mean over tasks of the mean CE, each task's examples in one forward of a plain copy of ``net``."""
    import copy

    ref = copy.deepcopy(net)
    ref.load_state_dict(theta, strict=False)
    ref.train(train)
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(heads[t](ref(x)), y)) for t, (x, y) in data.items()) / 2


def test_merged_bn_objective_differentiates_the_running_statistics():
    net, heads, data, theta = _tiny_bn_problem()
    expected = _reference_loss(net, heads, data, theta, train=False)  # before the objective takes the module over
    objective = ModelObjective(net, heads, data, "ce", batch_size=3)
    assert {"bn.running_mean", "bn.running_var"} <= set(objective.differentiable)
    assert objective.value(theta) == pytest.approx(expected, rel=1e-12)  # the same function as eval-mode BN
    value, grad = objective.value_and_grad(theta)
    assert value == pytest.approx(expected, rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    for name in ("bn.running_mean", "bn.running_var", "conv.weight"):  # central differences, random direction
        d = torch.randn(theta[name].shape, generator=gen, dtype=F64)
        eps = 1e-6
        plus = objective.value({**theta, name: theta[name] + eps * d})
        minus = objective.value({**theta, name: theta[name] - eps * d})
        assert float((grad[name] * d).sum()) == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)
    total, values, task_grads = objective.task_values_and_grads(theta)
    assert total == pytest.approx(value) and set(values) == {"t1", "t2"}
    for name in grad:
        assert torch.allclose((task_grads["t1"][name] + task_grads["t2"][name]) / 2, grad[name])
    net2, heads2, data2, theta2 = _tiny_bn_problem()
    params_only = ModelObjective(net2, heads2, data2, "ce", statistics_gradient=False)
    assert "bn.running_mean" not in params_only.differentiable
    assert params_only.value(theta2) == pytest.approx(expected, rel=1e-12)


def test_batch_bn_objective_uses_each_task_batch_and_never_the_running_statistics():
    net, heads, data, theta = _tiny_bn_problem()
    expected = _reference_loss(net, heads, data, theta, train=True)  # train-mode BN on each task's whole set
    objective = ModelObjective(net, heads, data, "ce", batch_size=3, bn="batch")
    assert "bn.running_mean" not in objective.differentiable and "bn.weight" in objective.differentiable
    before = {n: t.clone() for n, t in theta.items()}
    value, grad = objective.value_and_grad(theta)
    assert value == pytest.approx(expected, rel=1e-12)  # one batch per task, whatever batch_size is
    assert all(torch.equal(theta[n], before[n]) for n in theta)  # the point's statistics are never written
    other = {**theta, "bn.running_mean": theta["bn.running_mean"] + 5.0, "bn.running_var": theta["bn.running_var"] * 9}
    assert objective.value(other) == pytest.approx(value, rel=1e-12)  # and never read
    assert set(grad) == set(objective.parameter_names)


def test_bn_batch_reestimates_the_statistics_of_the_result_on_the_objective_examples(zoo):
    from mergelab.evaluation import reset_bn_statistics

    context = _context(zoo, RELEVANT, samples=8)
    merged, _ = frank_wolfe(context, FWHardParams(iterations=0))  # the task-arithmetic start, statistics as merged
    batch, trace = frank_wolfe(context, FWHardParams(iterations=0, bn="batch"))
    stats = [n for n in merged if n.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(merged[n], batch[n]) for n in merged if n not in stats)
    # the same as re-estimating by hand on the objective's examples (labelled train split for ce)
    backbone = build_backbone("resnet_s")
    load_backbone_state(backbone, merged, source="test")
    x = torch.cat([context.samples(t, "train")[0].float() for t in context.tasks])
    reset_bn_statistics(backbone, x, batch_size=context.data.batch_size,
                        num_batches=-(-len(x) // context.data.batch_size), seed=context.data.seed)
    own = backbone.state_dict()
    assert all(torch.allclose(batch[n], own[n]) for n in stats)
    assert any(not torch.allclose(batch[n], merged[n]) for n in stats)


# ------------------------------------------------------------------------------------ pool scaling


def test_pool_scaling_gives_the_fw_rows_the_entropy_objective_and_records_it(monkeypatch):
    import mergelab.evaluation
    from mergelab.experiments import pool_scaling
    from mergelab.experiments.comparison_table import ComparisonTable

    class _Expert:
        def __init__(self, task):
            self.task, self.path = task, f"/experts/{task}"

    monkeypatch.setattr(mergelab.evaluation, "default_experts",
                        lambda arch, tasks=None, cache_dir=None, required=True: [_Expert(t) for t in "abc"])
    calls = []

    def fake(arch, tasks, methods, **kwargs):
        calls.append(kwargs["overrides"])
        return ComparisonTable(arch, list(tasks), [], {"bn": "joint"})

    monkeypatch.setattr(pool_scaling, "run_comparison", fake)
    result = pool_scaling.run_pool_scaling("irrelevant", tasks=["a"], sizes=(1, 3),
                                           methods=["ties", "fw_soft", "fw_hard"], progress=False,
                                           overrides={"fw_hard": {"iterations": 1}})
    assert calls == [{"fw_soft": {"objective": "entropy"}, "fw_hard": {"objective": "entropy", "iterations": 1}}] * 2
    assert result.meta["fw_objective"] == "entropy"
    assert result.meta["fw_objectives"] == {"fw_soft": "entropy", "fw_hard": "entropy"}
    calls.clear()
    result = pool_scaling.run_pool_scaling("irrelevant", tasks=["a"], sizes=(1,), methods=["fw_soft"], progress=False,
                                           fw_objective="ce")
    assert calls == [{"fw_soft": {"objective": "ce"}}] and result.meta["fw_objective"] == "ce"
    calls.clear()  # an explicit override wins, and the record says what ran
    result = pool_scaling.run_pool_scaling("irrelevant", tasks=["a"], sizes=(1,), methods=["ties"], progress=False)
    assert calls == [{}] and result.meta["fw_objectives"] == {}
    result = pool_scaling.run_pool_scaling("irrelevant", tasks=["a"], sizes=(1,), methods=["fw_soft"], progress=False,
                                           overrides={"fw_soft": {"objective": "ce"}})
    assert result.meta["fw_objectives"] == {"fw_soft": "ce"}
    with pytest.raises(SpecError, match="fw_objective"):
        pool_scaling.run_pool_scaling("irrelevant", tasks=["a"], sizes=(1,),
                                      fw_objective="mse")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ parameters


def test_parameters_and_registry():
    methods = registry()
    assert {"fw_hard", "fw_soft"} <= set(methods)
    hard = parse_params(methods["fw_hard"], {})
    assert (hard.iterations, hard.init, hard.init_lambda, hard.step, hard.granularity, hard.objective, hard.score) == (
        3, "task_arithmetic", 0.3, "line_search", "layer", "ce", "inner_product")
    assert (hard.oracle, hard.bn) == ("joint", "merged")
    assert not hasattr(hard, "coefficients")  # one step size gamma
    soft = parse_params(methods["fw_soft"], {})
    assert (soft.iterations, soft.init, soft.k, soft.simplex, soft.granularity, soft.coefficients, soft.oracle,
            soft.bn) == (15, "pretrained", None, "solid", "task", "layer", "per_task", "merged")
    soft = parse_params(methods["fw_soft"], {"k": 2, "granularity": "layer", "coefficients": "task", "oracle": "joint",
                                             "bn": "batch"})
    assert (soft.k, soft.granularity, soft.coefficients, soft.oracle, soft.bn) == (2, "layer", "task", "joint", "batch")
    for method, bad in [("fw_soft", {"oracle": "tasks"}), ("fw_hard", {"bn": "train"}),
                        ("fw_soft", {"coefficients": "row"})]:
        with pytest.raises(SpecError, match=next(iter(bad))):
            parse_params(methods[method], bad)
    with pytest.raises(SpecError, match="does not take parameter.*'coefficients'"):
        parse_params(methods["fw_hard"], {"coefficients": "layer"})
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
    from mergelab.merging import merge

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
    entropy = trace.iterations[0].objective  # a mean of entropies of 2 tasks' predictions: in [0, log(classes)]
    assert 0.0 <= entropy <= max(math.log(context.head(t).out_features) for t in context.tasks) + 1e-6
    assert set(state) == set(context.base_state())
    monkeypatch.setitem(sys.modules, "mergelab.methods.data_informed.adamerging", None)
    with pytest.raises(SpecError, match="init 'adamerging' needs"):
        frank_wolfe(context, FWHardParams(iterations=1, init="adamerging"))
