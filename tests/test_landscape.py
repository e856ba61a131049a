"""Landscape tools against closed forms: flat self-interpolation, convex chords, a known barrier, the TA path,
the 2-D plane's coordinates, BatchNorm handling, results and plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mergelab.analysis.alignment import mlp
from mergelab.analysis.landscape import (
    EvalTask,
    barrier_height,
    combine_states,
    evaluate_module,
    interpolate_states,
    linear_interpolation,
    loss_plane,
    merge_gain,
    midpoint_gain,
    plot_interpolation,
    plot_plane,
    task_arithmetic_path,
)
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.models import build_backbone, make_head


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cls_data(seed: int = 0, n: int = 96, d: int = 6, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _nets(n: int, sizes=(6, 12, 3), seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [mlp(list(sizes)) for _ in range(n)]


class _Scalar(nn.Module):
    """One parameter w; the output is w for every input (for hand-computed landscapes)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x))


# --------------------------------------------------------------------------------- interpolation
def test_interpolating_a_model_with_itself_is_flat():
    (a,) = _nets(1)
    res = linear_interpolation(a, a, _cls_data())
    curve = res.curves["task"]
    assert res.alphas == pytest.approx([i / 10 for i in range(11)])
    assert len(set(curve.loss)) == 1 and len(set(curve.accuracy)) == 1
    assert curve.loss_barrier == 0.0 and curve.accuracy_barrier == 0.0
    assert curve.loss_gain == 0.0 and curve.accuracy_gain == 0.0


def test_barrier_of_a_convex_problem_is_zero_and_the_curve_matches_the_closed_form():
    # linear model + MSE: L(a) = mean((r_A + a (r_B - r_A))^2) with residuals r = f(x) - y, so
    # L(a) - chord(a) = -a (1 - a) mean((f_B - f_A)^2) <= 0: barrier 0 (at the endpoints), gain -1/4 mean(..).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    a, b = nn.Linear(4, 1).double(), nn.Linear(4, 1).double()
    task = EvalTask("reg", (x, y), loss_fn=F.mse_loss)
    res = linear_interpolation(a, b, task, [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    c = res.curves["reg"]
    assert c.loss_barrier == 0.0
    with torch.no_grad():
        gap = float(((b(x) - a(x)) ** 2).mean())
    for alpha, loss in zip(c.alphas, c.loss):
        chord = (1 - alpha) * c.loss[0] + alpha * c.loss[-1]
        assert loss - chord == pytest.approx(-alpha * (1 - alpha) * gap, abs=1e-12)
    assert c.loss_gain == pytest.approx(-0.25 * gap, abs=1e-12)
    assert all(math.isnan(v) for v in c.accuracy)  # float targets: no accuracy
    assert math.isnan(c.accuracy_barrier)


def test_known_barrier_of_a_double_well():
    # loss (w^2 - 1)^2 between the minima w = -1 and w = +1: along w = 2a - 1 the loss is ((2a-1)^2 - 1)^2,
    # peaking at a = 0.5 with height 1 above the (zero) chord.
    task = EvalTask("well", (torch.zeros(4, 1), torch.zeros(4)), loss_fn=lambda out, _: ((out**2 - 1) ** 2).mean())
    res = linear_interpolation(_Scalar(-1.0), _Scalar(1.0), task, [0.0, 0.25, 0.5, 0.75, 1.0])
    c = res.curves["well"]
    assert c.loss == pytest.approx([0.0, 0.5625, 1.0, 0.5625, 0.0], abs=1e-15)
    assert c.loss_barrier == pytest.approx(1.0)
    assert c.loss_gain == pytest.approx(1.0)


def test_barrier_and_gain_formulas_on_arrays():
    alphas = [0.0, 0.5, 1.0]
    assert barrier_height(alphas, [1.0, 3.0, 2.0]) == pytest.approx(1.5)  # 3 - 1.5
    assert barrier_height(alphas, [0.8, 0.5, 0.6], higher_is_better=True) == pytest.approx(0.2)  # 0.7 - 0.5
    assert midpoint_gain(alphas, [0.8, 0.9, 0.6]) == pytest.approx(0.2)
    # points outside [0, 1] do not count towards the barrier
    assert barrier_height([-0.5, 0.0, 1.0, 1.5], [9.0, 1.0, 1.0, 9.0]) == 0.0
    with pytest.raises(SpecError, match="a = 0.5"):
        midpoint_gain([0.0, 1.0], [1.0, 2.0])


def test_per_task_heads_and_endpoints():
    a, b = _nets(2, sizes=(6, 12, 8))
    h1, h2 = make_head(8, 3), make_head(8, 5)
    (x1, y1), (x2, y2) = _cls_data(2), _cls_data(3, k=5)
    tasks = [EvalTask("t1", (x1, y1), head=h1), EvalTask("t2", (x2, y2), head=h2)]
    res = linear_interpolation(a, b, tasks)
    assert set(res.curves) == {"t1", "t2"}
    for task, (x, y), head in ((tasks[0], (x1, y1), h1), (tasks[1], (x2, y2), h2)):
        c = res.curves[task.name]
        assert (c.loss[0], c.accuracy[0]) == evaluate_module(a, (x, y), head=head)
        assert (c.loss[-1], c.accuracy[-1]) == evaluate_module(b, (x, y), head=head)
    gains = merge_gain(a, b, tasks)
    assert gains["t1"]["accuracy_gain"] == pytest.approx(res.curves["t1"].accuracy_gain)
    summary = res.to_dict()["summary"]
    assert set(summary) == {"t1", "t2", "mean"}
    json.dumps(res.to_dict())


def test_dataloader_and_tensors_agree():
    a, b = _nets(2)
    x, y = _cls_data(4)
    r1 = linear_interpolation(a, b, (x, y), [0.0, 0.5, 1.0])
    loader = DataLoader(TensorDataset(x, y), batch_size=17)
    r2 = linear_interpolation(a, b, loader, [0.0, 0.5, 1.0])
    assert r2.curves["task"].loss == pytest.approx(r1.curves["task"].loss, rel=1e-6)
    assert r2.curves["task"].accuracy == r1.curves["task"].accuracy


def test_state_dict_endpoint_and_mismatch_errors():
    a, b = _nets(2)
    data = _cls_data()
    r1 = linear_interpolation(a, b, data, [0.5])
    r2 = linear_interpolation(a, b.state_dict(), data, [0.5])
    assert r1.curves["task"].loss == r2.curves["task"].loss
    with pytest.raises(TensorMismatchError, match="model_b"):
        linear_interpolation(a, mlp([6, 10, 3]), data)
    with pytest.raises(SpecError, match="unique"):
        linear_interpolation(a, b, [EvalTask("t", data), EvalTask("t", data)])


# ---------------------------------------------------------------------------------- BatchNorm
def test_integer_buffers_are_not_interpolated_and_bn_stats_are():
    nbt = "bn.num_batches_tracked"
    sa = {"w": torch.tensor([0.0, 2.0]), "bn.running_var": torch.tensor([1.0]), nbt: torch.tensor(3)}
    sb = {"w": torch.tensor([4.0, 6.0]), "bn.running_var": torch.tensor([3.0]), nbt: torch.tensor(100)}
    mid = interpolate_states(sa, sb, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(mid["bn.running_var"], torch.tensor([1.5]))
    assert mid["bn.num_batches_tracked"].item() == 3 and mid["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(combine_states([sa, sb], [1.0, 0.0])["w"], sa["w"])


def test_bn_reset_re_estimates_statistics_at_every_point():
    torch.manual_seed(0)
    a, b = build_backbone("resnet_s"), build_backbone("resnet_s")
    head = make_head(64, 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 28, 28, generator=g), torch.randint(0, 4, (24,), generator=g)
    xb = torch.randn(32, 1, 28, 28, generator=g)
    task = EvalTask("img", (x, y), head=head)
    res = linear_interpolation(a, b, task, [0.5], bn="reset", bn_data=xb, bn_batches=2, bn_batch_size=16)
    # reference: interpolate, then reset_bn_statistics on the same inputs, then evaluate
    ref = build_backbone("resnet_s")
    ref.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.5))
    reset_bn_statistics(ref, xb, batch_size=16, num_batches=2)
    loss, acc = evaluate_module(ref, (x, y), head=head)
    assert res.bn == "reset"
    assert res.curves["img"].loss[0] == pytest.approx(loss, rel=1e-6)
    assert res.curves["img"].accuracy[0] == acc
    plain = linear_interpolation(a, b, task, [0.5])
    assert plain.bn == "interpolate" and plain.curves["img"].loss[0] != pytest.approx(loss, rel=1e-6)
    # per-task training inputs work as well; no inputs at all is an error
    per_task = EvalTask("img", (x, y), head=head, bn_data=xb)
    res2 = linear_interpolation(a, b, per_task, [0.5], bn="reset", bn_batches=2, bn_batch_size=16)
    assert res2.curves["img"].loss[0] == pytest.approx(loss, rel=1e-6)
    with pytest.raises(SpecError, match="bn='reset' needs training inputs"):
        linear_interpolation(a, b, task, bn="reset")
    with pytest.raises(SpecError, match="bn must be"):
        linear_interpolation(a, b, task, bn="repair")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_path_starts_at_the_base_and_hits_the_average():
    base, e1, e2 = _nets(3)
    (x1, y1), (x2, y2) = _cls_data(5), _cls_data(6)
    tasks = [EvalTask("t1", (x1, y1)), EvalTask("t2", (x2, y2))]
    res = task_arithmetic_path(base, [e1, e2], tasks, [0.0, 0.5, 1.0])
    assert res.kind == "task_arithmetic"
    for name, data in (("t1", (x1, y1)), ("t2", (x2, y2))):
        assert (res.curves[name].loss[0], res.curves[name].accuracy[0]) == evaluate_module(base, data)
    # a = 1/N is the simple average of the experts
    avg = mlp([6, 12, 3])
    avg.load_state_dict(combine_states([e1.state_dict(), e2.state_dict()], [0.5, 0.5]))
    assert res.curves["t1"].loss[1] == pytest.approx(evaluate_module(avg, (x1, y1))[0], rel=1e-6)
    # one expert at a = 1 is the expert itself
    single = task_arithmetic_path(base, [e1], tasks[0], [1.0])
    assert single.curves["t1"].loss[0] == pytest.approx(evaluate_module(e1, (x1, y1))[0], rel=1e-6)
    assert "loss_barrier" not in res.summary()["t1"]
    json.dumps(res.to_dict())


# ------------------------------------------------------------------------------------- 2-D plane
def _flat(state):
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def test_plane_puts_the_three_models_at_their_coordinates():
    m1, m2, m3 = _nets(3)
    data = _cls_data(7)
    probe = loss_plane(m1, m2, m3, data, xs=[0.0], ys=[0.0])
    (c1, c2, c3) = probe.model_coordinates
    assert c1 == (0.0, 0.0) and c2[1] == 0.0 and c3[1] > 0
    # the coordinates reproduce the pairwise distances of the models (orthonormal basis)
    t1, t2, t3 = (_flat(m.state_dict()) for m in (m1, m2, m3))
    assert math.dist(c1, c2) == pytest.approx(float(torch.linalg.norm(t2 - t1)), rel=1e-10)
    assert math.dist(c1, c3) == pytest.approx(float(torch.linalg.norm(t3 - t1)), rel=1e-10)
    assert math.dist(c2, c3) == pytest.approx(float(torch.linalg.norm(t3 - t2)), rel=1e-10)
    # evaluating the plane at the model coordinates gives the models' own losses
    xs, ys = [c1[0], c2[0], c3[0]], [0.0, c3[1]]
    res = loss_plane(m1, m2, m3, data, xs=xs, ys=ys)
    own = [evaluate_module(m, data) for m in (m1, m2, m3)]
    assert res.loss["task"][0][0] == pytest.approx(own[0][0], rel=1e-6)
    assert res.loss["task"][0][1] == pytest.approx(own[1][0], rel=1e-6)
    assert res.loss["task"][1][2] == pytest.approx(own[2][0], rel=1e-6)
    assert res.accuracy["task"][1][2] == own[2][1]
    assert res.grid("task").shape == (2, 3)
    json.dumps(res.to_dict())


def test_plane_default_grid_and_degenerate_inputs():
    m1, m2, m3 = _nets(3)
    data = _cls_data(8)
    res = loss_plane(m1, m2, m3, data, resolution=3, margin=0.1)
    assert len(res.xs) == 3 and len(res.ys) == 3
    xs_model = [c[0] for c in res.model_coordinates]
    assert res.xs[0] < min(xs_model) and res.xs[-1] > max(xs_model)
    mid = mlp([6, 12, 3])
    mid.load_state_dict(interpolate_states(m1.state_dict(), m2.state_dict(), 0.5))
    with pytest.raises(SpecError, match="collinear"):
        loss_plane(m1, m2, mid, data, resolution=2)
    with pytest.raises(SpecError, match="coincides"):
        loss_plane(m1, m1, m3, data, resolution=2)


# ------------------------------------------------------------------------------------------ plots
def test_plots_write_png_files(tmp_path):
    m1, m2, m3 = _nets(3)
    data = _cls_data(9)
    path_res = linear_interpolation(m1, m2, data, [0.0, 0.5, 1.0])
    fig = plot_interpolation(path_res, metric="accuracy", path=tmp_path / "interp.png")
    assert fig.axes and (tmp_path / "interp.png").stat().st_size > 0
    plane = loss_plane(m1, m2, m3, data, resolution=3)
    plot_plane(plane, path=tmp_path / "plane.png")
    assert (tmp_path / "plane.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SpecError, match="metric"):
        plot_interpolation(path_res, metric="f1")


def test_task_names_with_dollar_signs_are_drawn_as_text(tmp_path):
    # issue 12: "$x^$" crashed matplotlib's math parser when saving; "cost $5 vs $10" was drawn as math
    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    from mergelab.analysis.landscape import Curve, PathResult

    names = ["cost $5 vs $10", "$x^$"]
    res = PathResult(kind="linear", alphas=[0.0, 0.5, 1.0], bn="none",
                     curves={n: Curve(task=n, alphas=[0.0, 0.5, 1.0], loss=[1.0, 2.0, 1.5], accuracy=[0.5, 0.4, 0.6])
                             for n in names})
    fig = plot_interpolation(res, path=tmp_path / "dollar.png")
    assert (tmp_path / "dollar.png").read_bytes().startswith(b"\x89PNG")
    legend = [t.get_text() for t in fig.findobj(Text) if "$x^" in t.get_text() or "cost" in t.get_text()]
    assert len(legend) == 2 and not any(is_math_text(t) for t in legend)
    assert {t.replace("\\$", "$") for t in legend} == set(names)
