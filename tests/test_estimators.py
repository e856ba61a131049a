"""Tests for mergelab.analysis.estimators against closed forms: Hessian spectra, per-sample variances,
heterogeneity of quadratic tasks, noise scales and normalised-layer learning rates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.analysis.effective_lr import normalized_layer_lrs
from mergelab.analysis.estimators import (
    gradient_heterogeneity,
    gradient_statistics,
    hessian_top_eigenvalue,
    hvp_operator,
    loss_and_gradient,
    measure_tasks,
    power_iteration,
)
from mergelab.analysis.heterogeneity import heterogeneity_from_gram
from mergelab.analysis.noise_scale import effective_noise_scale, measured_noise_scale


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)


def _spd(eigs: list[float], seed: int) -> np.ndarray:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


class Quadratic(nn.Module):
    """``0.5 (x - c)^T A (x - c)`` for every input row (the input is ignored): Hessian exactly A."""

    def __init__(self, a: np.ndarray, c: np.ndarray | None = None, x0: np.ndarray | None = None) -> None:
        super().__init__()
        d = a.shape[0]
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(np.zeros(d) if c is None else c, dtype=torch.float64))
        self.x = nn.Parameter(torch.tensor(np.ones(d) if x0 is None else x0, dtype=torch.float64))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        z = self.x - self.c
        return (0.5 * z @ self.a @ z).expand(inp.shape[0])


def _mean_out(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def _half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


# ------------------------------------------------------------------------------------------ smoothness
def test_power_iteration_quadratic_matches_eigvalsh():
    eigs = [10.0, 6.0, 3.0, 2.5, 1.0, 0.5, 0.1, -0.3, 0.0, 2.0]
    a = _spd(eigs, seed=1)
    x = torch.ones(10, dtype=torch.float64, requires_grad=True)
    at = torch.tensor(a)
    matvec = hvp_operator([(0.5 * x @ at @ x, 1.0)], [x])
    res = power_iteration(matvec, 10, iters=500, tol=1e-12, dtype=torch.float64)
    top = np.linalg.eigvalsh(a).max()
    assert res.eigenvalue == pytest.approx(top, rel=1e-8)
    assert res.converged and res.residual < 1e-4
    assert res.trace[-1] == res.eigenvalue and len(res.trace) == res.iterations
    # the trace approaches the top eigenvalue from below (Rayleigh quotients of a PSD-dominated operator)
    assert res.trace[0] < res.trace[-1]


def test_power_iteration_reports_dominant_magnitude():
    a = _spd([-8.0, 3.0, 1.0, 0.5], seed=2)
    res = power_iteration(lambda v: torch.tensor(a) @ v, 4, iters=500, tol=1e-12, dtype=torch.float64)
    assert res.eigenvalue == pytest.approx(-8.0, rel=1e-7)
    assert res.spectral_norm == pytest.approx(8.0, rel=1e-7)


def test_hessian_top_eigenvalue_of_a_quadratic_module():
    a = _spd([7.0, 2.0, 1.0, 0.2, 0.1], seed=3)
    model = Quadratic(a)
    inp, y = torch.zeros(8, 1), torch.zeros(8)
    res = hessian_top_eigenvalue(model, inp, y, _mean_out, batch_size=4, num_batches=2, iters=300, tol=1e-12)
    assert res.eigenvalue == pytest.approx(7.0, rel=1e-8)


def test_hessian_top_eigenvalue_linear_least_squares():
    """For 0.5 mean (w.x + b - y)^2 the Hessian is Z^T Z / n with Z = [X, 1]."""
    g = torch.Generator().manual_seed(0)
    n, d = 64, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    res = hessian_top_eigenvalue(model, x, y, _half_mse, batch_size=n, iters=500, tol=1e-13)
    z = np.hstack([x.numpy(), np.ones((n, 1))])
    top = np.linalg.eigvalsh(z.T @ z / n).max()
    assert res.eigenvalue == pytest.approx(top, rel=1e-7)
    assert res.converged


def test_hessian_train_mode_restores_bn_buffers_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    res = hessian_top_eigenvalue(model, x, y, batch_size=32, iters=5, train_mode=True)
    assert np.isfinite(res.eigenvalue)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training and not model[1].training


# ------------------------------------------------------------------------------------------ per-sample variance
def _linreg(n: int = 37, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.3)
    return model, x, y


def _linreg_reference(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, ddof: int = 0):
    """Per-sample gradients of 0.5 (w.x + b - y)^2: r_j [x_j, 1], by numpy."""
    w, b = model.weight.detach().numpy()[0], float(model.bias.detach())
    xn, yn = x.numpy(), y.numpy()
    r = xn @ w + b - yn
    g = np.hstack([r[:, None] * xn, r[:, None]])
    mean = g.mean(0)
    sigma2 = ((g - mean) ** 2).sum() / (len(g) - ddof)
    return mean, sigma2, float(np.mean(0.5 * r**2))


@pytest.mark.parametrize("method", ["vmap", "loop"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_per_sample_variance_linear_regression(method, ddof):
    model, x, y = _linreg()
    stats = gradient_statistics(model, x, y, _half_mse, chunk_size=8, ddof=ddof, method=method)
    mean, sigma2, loss = _linreg_reference(model, x, y, ddof)
    assert stats.method == method and stats.n == 37
    assert stats.sigma2 == pytest.approx(sigma2, rel=1e-10)
    assert stats.loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(stats.grad.numpy(), mean, rtol=1e-10, atol=1e-13)
    assert stats.grad_norm2 == pytest.approx(float(mean @ mean), rel=1e-10)
    # the full-batch gradient agrees with the mean of per-sample gradients
    full_loss, full_grad = loss_and_gradient(model, x, y, _half_mse, batch_size=10)
    assert full_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(full_grad.numpy(), mean, rtol=1e-10, atol=1e-13)


def test_per_sample_variance_on_a_subsample_and_a_parameter_subset():
    model, x, y = _linreg(n=50)
    stats = gradient_statistics(model, x, y, _half_mse, param_names=["weight"], max_samples=20, seed=3)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:20].sort().values
    w, b = model.weight.detach().numpy()[0], float(model.bias.detach())
    r = x[idx].numpy() @ w + b - y[idx].numpy()
    g = r[:, None] * x[idx].numpy()
    assert stats.n == 20 and stats.param_names == ("weight",)
    assert stats.sigma2 == pytest.approx(((g - g.mean(0)) ** 2).sum() / 20, rel=1e-10)


def test_per_sample_bn_model_vmap_equals_loop_in_eval_mode_and_mode_is_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    x, y = torch.randn(12, 1, 6, 6), torch.randint(0, 3, (12,))
    a = gradient_statistics(model, x, y, chunk_size=5, method="vmap")
    b = gradient_statistics(model, x, y, chunk_size=5, method="loop")
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert model.training and model[1].training


def test_auto_falls_back_to_the_loop():
    class NoVmap(nn.Linear):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            if inp.shape[0] == 1 and float(inp.sum()) > -1e9:  # data-dependent control flow breaks vmap
                return super().forward(inp)
            return super().forward(inp)

    torch.manual_seed(0)
    model = NoVmap(3, 1).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    stats = gradient_statistics(model, x, y, _half_mse, method="auto")
    ref = gradient_statistics(model, x, y, _half_mse, method="loop")
    assert stats.method == "loop"
    assert stats.sigma2 == pytest.approx(ref.sigma2, rel=1e-12)


# ------------------------------------------------------------------------------------------ heterogeneity
def test_heterogeneity_two_quadratic_tasks_closed_form():
    """F_i = 0.5 (x - c_i)^T A_i (x - c_i): g_i = A_i (x - c_i); with p = n / sum n,
    delta_1^2 = p_2^2 ||g_1 - g_2||^2 and delta_2^2 = p_1^2 ||g_1 - g_2||^2."""
    a1, a2 = _spd([3.0, 1.0, 0.5], 4), _spd([2.0, 2.0, 0.1], 5)
    c1, c2 = np.array([1.0, -1.0, 0.0]), np.array([0.0, 2.0, 1.0])
    x0 = np.array([0.5, 0.5, -0.5])
    grads = []
    for a, c in ((a1, c1), (a2, c2)):
        _, g = loss_and_gradient(Quadratic(a, c, x0), torch.zeros(3, 1), torch.zeros(3), _mean_out)
        np.testing.assert_allclose(g.numpy(), a @ (x0 - c), rtol=1e-12)
        grads.append(g)
    n = [30, 90]
    het = gradient_heterogeneity(grads, n)
    gap = np.sum((a1 @ (x0 - c1) - a2 @ (x0 - c2)) ** 2)
    p1, p2 = 0.25, 0.75
    assert het.delta2[0] == pytest.approx(p2**2 * gap, rel=1e-12)
    assert het.delta2[1] == pytest.approx(p1**2 * gap, rel=1e-12)
    assert het.mean_delta2 == pytest.approx(p1 * p2**2 * gap + p2 * p1**2 * gap, rel=1e-12)
    d2, p = heterogeneity_from_gram(het.gram, n)
    np.testing.assert_allclose(d2, het.delta2, rtol=1e-10)
    np.testing.assert_allclose(p, [p1, p2])


def test_heterogeneity_is_zero_for_identical_tasks():
    g = torch.randn(17, dtype=torch.float64)
    het = gradient_heterogeneity([g, g.clone(), g.clone()], [10, 20, 30])
    assert max(het.delta2) == pytest.approx(0.0, abs=1e-24)


class _TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.feature_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)


def test_measure_tasks_backbone_gradients_identical_tasks_have_zero_heterogeneity():
    torch.manual_seed(0)
    bb = _TinyBackbone()
    head = nn.Linear(4, 3)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    m = measure_tasks(bb, [head, head], [(x, y), (x, y)], ["a", "b"], max_samples=None, hessian_batch_size=40,
                      hessian_iters=10)
    n_backbone = sum(p.numel() for p in bb.parameters())
    assert all(k.startswith("backbone.") for k in m.param_names)
    assert m.tasks[0].grad.numel() == n_backbone
    assert max(m.delta2) == pytest.approx(0.0, abs=1e-20)
    assert m.tasks[0].sigma2 == pytest.approx(m.tasks[1].sigma2, rel=1e-12)
    assert m.smoothness == pytest.approx(max(t.smoothness.spectral_norm for t in m.tasks))
    for k, v in bb.state_dict().items():  # the caller's backbone is untouched (BN adapted on copies)
        assert torch.equal(v, before[k]), k
    d = m.to_dict()
    assert d["settings"]["params"] == "backbone" and len(d["tasks"]) == 2


def test_measure_tasks_distinct_heads_give_heterogeneity():
    torch.manual_seed(0)
    bb = _TinyBackbone()
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 3, (30,))
    m = measure_tasks(bb, [nn.Linear(4, 3), nn.Linear(4, 3)], [(x, y), (x, (y + 1) % 3)], hessian=False)
    assert min(m.delta2) > 0
    assert m.tasks[0].smoothness is None


# ------------------------------------------------------------------------------------------ noise scale, eta_eff
def test_effective_noise_scale_from_a_spec_and_trace():
    spec = SimpleNamespace(lr=0.1, batch_size=32, momentum=0.9, optimizer="sgd")
    rep = effective_noise_scale(spec, trace_sigma=4.0)
    assert rep.proxy == pytest.approx(0.1 / (32 * 0.1))
    assert rep.proxy_squared == pytest.approx(0.1 / (32 * 0.01))
    assert rep.T == pytest.approx(4.0 * 0.1 / (32 * 0.1))
    assert rep.beta_source == "sgd momentum" and rep.note == ""
    adam = effective_noise_scale(SimpleNamespace(lr=1e-3, batch_size=64, momentum=0.9, optimizer="adamw"))
    assert adam.beta_source == "adamw beta1" and "adamw" in adam.note and adam.T is None


def test_effective_noise_scale_reads_the_sidecar_record():
    ns = SimpleNamespace(value=0.5, value_squared=5.0, beta_source="sgd momentum")
    expert = SimpleNamespace(spec=SimpleNamespace(lr=0.05, batch_size=64, momentum=0.9, optimizer="sgd"), noise_scale=ns)
    rep = effective_noise_scale(expert, trace_sigma=2.0)
    assert rep.proxy == 0.5 and rep.T == pytest.approx(1.0) and rep.T_squared == pytest.approx(10.0)


def test_normalized_layer_lrs_finds_weights_feeding_norm_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),  # conv -> BN: scale-invariant
        nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False), nn.LayerNorm(5),  # linear (no bias) -> LN
        nn.Linear(5, 4), nn.LayerNorm(4),  # linear with bias -> LN: not invariant, skipped
        nn.Linear(4, 2),  # no norm after
    )
    res = {r.name: r for r in normalized_layer_lrs(model, torch.randn(2, 1, 6, 6), lr=0.1)}
    assert set(res) == {"0.weight", "4.weight"}
    w0 = float(model[0].weight.detach().pow(2).sum())
    assert res["0.weight"].eta_eff == pytest.approx(0.1 / w0, rel=1e-6)
    assert res["0.weight"].norm_kind == "BatchNorm2d" and res["4.weight"].norm_layer == "5"


def test_measured_noise_scale_multiplies_the_proxy_by_the_per_sample_variance():
    model, x, y = _linreg(n=30)
    spec = SimpleNamespace(lr=0.1, batch_size=10, momentum=0.5, optimizer="sgd", augment=False)
    rep = measured_noise_scale(spec, model, x, y, _half_mse, max_samples=None)
    _, sigma2, _ = _linreg_reference(model, x, y)
    assert rep.trace_sigma == pytest.approx(sigma2, rel=1e-10)
    assert rep.T == pytest.approx(0.1 / (10 * 0.5) * sigma2, rel=1e-10)


def test_hessian_top_eigenvalue_of_a_vision_transformer():
    """Hessian-vector products need a twice-differentiable attention: the fused CPU kernel has no double backward."""
    from mergelab.models.registry import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_s")
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 3))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))
    r = hessian_top_eigenvalue(model, x, y, batch_size=8, iters=3, tol=1e-9)
    assert math.isfinite(r.eigenvalue) and r.eigenvalue != 0.0
