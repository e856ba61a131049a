"""Estimators of the quantities the stability bound needs, measured at theta_0 (or at any checkpoint).

Everything here is generic over an ``nn.Module``, tensors ``(x, y)`` and a loss ``loss_fn(outputs, targets)``
that returns the **mean** loss of a batch (``F.cross_entropy`` by default). Gradients are taken over a chosen
set of parameters (``param_names``, default: all parameters that require grad). For a task model
``Classifier(backbone, head)`` the bound is about the **backbone**: merging acts on the backbone and every task
keeps its own head, so :func:`measure_tasks` differentiates with respect to the backbone parameters only (the
shared part) while each task's loss goes through that task's head.

Quantities (THEORY.md section 1, "Measurable quantities"; section 2 for the noise scale):

* **smoothness** ``L``: the dominant eigenvalue of the Hessian of the training loss on fixed batches, by power
  iteration on Hessian-vector products ``Hv = d/dtheta <grad F(theta), v>`` (double backprop, Pearlmutter
  1994): ``v <- Hv / ||Hv||``, eigenvalue estimate = Rayleigh quotient ``v^T H v``. Power iteration converges
  to the eigenvalue of largest magnitude, i.e. the spectral norm ``||H||_2`` that defines L-smoothness; for a
  positive semi-definite Hessian it is the largest eigenvalue. The convergence trace is kept.
* **per-sample gradient variance** ``sigma^2 = (1/n) sum_j ||grad l(theta; z_j) - grad F_S(theta)||^2``, i.e.
  ``tr(Sigma)`` of the per-sample gradient covariance with the population normalisation ``1/n`` (``ddof=1``
  gives ``1/(n-1)``). Per-sample gradients come from ``torch.func`` (``functional_call`` + ``vmap`` +
  ``grad_and_value``) in chunks combined by the parallel-variance update (Chan et al. 1979), with a per-sample
  autograd loop as fallback. A minibatch of size ``B`` drawn with replacement has gradient-noise covariance
  ``Sigma / B``.
* **gradient heterogeneity** ``delta_i^2 = ||grad F_i(theta) - grad F(theta)||^2`` with
  ``F = sum_i (n_i / n) F_i`` the sample-weighted average of the task losses; also the Gram matrix
  ``G_ij = <grad F_i, grad F_j>``, from which ``delta`` of any sub-pool follows without new gradients.
* **initial loss** ``F_{S_i}(theta_0)``: mean training loss of task ``i`` at theta_0 through its head.
* the **effective noise scale** (Zhang et al. 2025), ``T = eta / (B (1 - beta)) * tr(Sigma)`` with ``tr(Sigma)``
  measured here, is :mod:`mergelab.analysis.noise_scale`; the effective learning rate ``eta / ||W||^2`` of
  scale-invariant weights is :mod:`mergelab.analysis.effective_lr`.

**Mode.** Estimators run the model in **eval mode** (restored afterwards). In train mode BatchNorm normalises
with batch statistics, so a sample's loss depends on the other samples of its batch: per-sample gradients are
then not independent (and ``vmap`` over single samples would normalise each sample by itself). In eval mode BN
uses its running statistics, every sample's loss depends on that sample only, and ``grad F_S`` is exactly the
mean of the per-sample gradients. :func:`measure_tasks` re-estimates the BN running statistics on each task's
own training images first (``adapt_bn=True``), as fine-tuning does before fitting the probe head, so the
eval-mode network at theta_0 sees each task the way training starts on it. Parameters are never changed.

Sources: Lei & Ying 2020 (stability of SGD with smooth losses), Wang et al. 2020 (FedNova: heterogeneity,
effective weights), the framework paper arXiv 2601.21690, Zhang et al. 2025 (effective noise scale).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from mergelab.evaluation.bn import reset_bn_statistics

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets) -> scalar``: the mean loss of a batch."""

__all__ = [
    "GradientStats",
    "HeterogeneityResult",
    "LossFn",
    "PoolMeasurement",
    "PowerIterationResult",
    "TaskMeasurement",
    "gradient_heterogeneity",
    "gradient_statistics",
    "hessian_top_eigenvalue",
    "hvp_operator",
    "loss_and_gradient",
    "measure_tasks",
    "model_device",
    "modules_in_mode",
    "power_iteration",
    "sample_indices",
]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def modules_in_mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put every sub-module of ``model`` in train/eval mode for the block, then restore each one's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _select_params(model: nn.Module, param_names: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to differentiate, in ``named_parameters`` order."""
    named = list(model.named_parameters())
    if param_names is None:
        chosen = [(k, p) for k, p in named if p.requires_grad]
    else:
        wanted = set(param_names)
        known = {k for k, _ in named}
        missing = sorted(wanted - known)
        if missing:
            raise KeyError(f"parameters not in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        chosen = [(k, p) for k, p in named if k in wanted]
    if not chosen:
        raise ValueError("no parameters to differentiate")
    return chosen


def _flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate flattened tensors (``None`` -> zeros shaped like the matching parameter)."""
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


def _unflat(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        k = p.numel()
        out.append(vec[i : i + k].view_as(p))
        i += k
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sample_indices(n: int, max_samples: int | None, seed: int) -> torch.Tensor:
    """All indices, or ``max_samples`` of them drawn without replacement under ``seed``."""
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_samples].sort().values


# ---------------------------------------------------------------------------------------------------------
# smoothness: power iteration on Hessian-vector products
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerIterationResult:
    """Outcome of power iteration on a symmetric operator ``H``.

    ``eigenvalue`` is the Rayleigh quotient ``v^T H v`` of the final unit iterate ``v``: the dominant (largest
    magnitude) eigenvalue, signed; ``spectral_norm = |eigenvalue| = ||H||_2`` is the smoothness constant L.
    ``trace`` holds the Rayleigh quotient after every iteration; ``residual = ||Hv - lambda v|| / |lambda|``
    of the final iterate; ``converged`` says whether the relative change fell below ``tol``.
    """

    eigenvalue: float
    trace: tuple[float, ...]
    iterations: int
    converged: bool
    residual: float
    tol: float

    @property
    def spectral_norm(self) -> float:
        return abs(self.eigenvalue)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eigenvalue": self.eigenvalue,
            "spectral_norm": self.spectral_norm,
            "trace": list(self.trace),
            "iterations": self.iterations,
            "converged": self.converged,
            "residual": self.residual,
            "tol": self.tol,
        }


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    min_iters: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PowerIterationResult:
    """Dominant eigenvalue of the symmetric operator ``matvec`` on ``R^dim`` by power iteration.

    ``v_0`` is a unit Gaussian vector (``torch.Generator`` seeded with ``seed``); each iteration computes
    ``u = H v``, the Rayleigh quotient ``lambda = v^T u`` and ``v <- u / ||u||``. It stops after ``iters``
    iterations, or earlier (never before ``min_iters``) once ``|lambda_k - lambda_{k-1}| <= tol |lambda_k|``.
    The convergence rate is ``|lambda_2 / lambda_1|`` per iteration.
    """
    if dim < 1:
        raise ValueError("power_iteration needs dim >= 1")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = v / v.norm()
    trace: list[float] = []
    converged = False
    lam = 0.0
    u = matvec(v)
    for k in range(1, iters + 1):
        lam = float(torch.dot(v.double(), u.double()))
        trace.append(lam)
        norm = float(u.norm())
        if norm == 0.0 or not math.isfinite(norm):
            converged = norm == 0.0
            break
        if k >= min_iters and abs(trace[-1] - trace[-2]) <= tol * abs(lam):
            converged = True
            break
        if k == iters:
            break
        v = u / norm
        u = matvec(v)
    residual = float((u - lam * v).norm()) / abs(lam) if lam != 0.0 else float("nan")
    return PowerIterationResult(lam, tuple(trace), len(trace), converged, residual, tol)


def hvp_operator(
    losses: Sequence[tuple[torch.Tensor, float]], params: Sequence[torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for ``H`` the Hessian of ``sum_k w_k loss_k`` with respect to ``params`` (flattened).

    ``losses`` are ``(scalar loss with its graph, weight)`` pairs. The gradients ``g_k`` are built once with
    ``create_graph=True``; each product is ``d/dtheta <sum_k w_k g_k, v>`` (double backprop) with the graph
    retained, so an iteration costs one backward pass per batch and no forward pass.
    """
    params = list(params)
    total: torch.Tensor | None = None
    for loss, w in losses:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        flat = _flat(grads, params) * w
        total = flat if total is None else total + flat
    assert total is not None, "hvp_operator needs at least one loss"
    gflat = total

    def matvec(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(gflat, params, grad_outputs=v.to(gflat.dtype), retain_graph=True, allow_unused=True)
        return _flat(hv, params).detach()

    return matvec


def hessian_top_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 256,
    num_batches: int = 1,
    iters: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
    train_mode: bool = False,
) -> PowerIterationResult:
    """Smoothness estimate L: the dominant Hessian eigenvalue of the mean training loss on fixed batches.

    The objective is ``F_B(theta) = sum_k (|B_k| / sum |B|) loss(B_k)`` over ``num_batches`` fixed batches of
    ``batch_size`` samples drawn (without replacement, ``seed``) from ``(x, y)``; its Hessian with respect to
    ``param_names`` goes through :func:`power_iteration` (``iters``, relative tolerance ``tol``).
    ``train_mode=True`` evaluates the loss with batch statistics (the curvature SGD sees); the BN running
    buffers touched by that forward pass are restored afterwards. Default: eval mode (module docstring).
    """
    chosen = _select_params(model, param_names)
    params = [p for _, p in chosen]
    dev = model_device(model)
    idx = sample_indices(len(x), batch_size * num_batches, seed)
    saved = {k: b.detach().clone() for k, b in model.named_buffers()} if train_mode else {}
    dim = sum(p.numel() for p in params)
    # Hessian-vector products differentiate twice: attention must use the math kernel (the fused CPU kernels
    # have no double backward, e.g. vit_s's scaled_dot_product_attention)

    with modules_in_mode(model, train_mode), sdpa_kernel([SDPBackend.MATH]):
        batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        total = float(len(idx))
        losses = [(loss_fn(model(x[b].to(dev)), y[b].to(dev)), len(b) / total) for b in batches]
        matvec = hvp_operator(losses, params)
        result = power_iteration(matvec, dim, iters=iters, tol=tol, seed=seed, dtype=params[0].dtype, device=dev)
    if train_mode:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])
    if result.eigenvalue < 0:
        log.warning("dominant Hessian eigenvalue is negative (%.4g): L = |lambda| = %.4g", result.eigenvalue, -result.eigenvalue)
    if not result.converged:
        log.warning("power iteration did not converge in %d iterations (last trace %s)", iters, result.trace[-3:])
    return result


# ---------------------------------------------------------------------------------------------------------
# gradients, per-sample variance
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradientStats:
    """Loss, mean gradient and per-sample gradient variance of one data set at one parameter point.

    ``grad`` is ``grad F_S(theta)`` flattened over the chosen parameters (float64, ``named_parameters`` order);
    ``sigma2 = (1/(n - ddof)) sum_j ||g_j - grad||^2`` = ``tr(Sigma)``; ``grad_norm2 = ||grad||^2``.
    """

    n: int
    loss: float
    grad: torch.Tensor = field(repr=False)
    sigma2: float
    grad_norm2: float
    ddof: int
    method: str
    param_names: tuple[str, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "loss": self.loss, "sigma2": self.sigma2, "grad_norm2": self.grad_norm2, "ddof": self.ddof, "method": self.method}


def loss_and_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 512,
) -> tuple[float, torch.Tensor]:
    """``(F_S(theta), grad F_S(theta))``: the mean loss over all of ``(x, y)`` and its gradient (float64, flat).

    Computed in batches weighted by their sizes, in eval mode.
    """
    chosen = _select_params(model, param_names)
    params = [p for _, p in chosen]
    dev = model_device(model)
    n = len(x)
    if n == 0:
        raise ValueError("loss_and_gradient needs at least one sample")
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=dev)
    loss_sum = 0.0
    with modules_in_mode(model, False):
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
            loss = loss_fn(model(xb), yb)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            total += _flat(grads, params).double() * len(xb)
            loss_sum += float(loss.detach()) * len(xb)
    return loss_sum / n, total / n


def _per_sample_vmap(
    model: nn.Module, chosen: list[tuple[str, nn.Parameter]], loss_fn: LossFn
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(xb, yb) -> (per-sample flat grads [b, P], per-sample losses [b])`` with torch.func."""
    names = [k for k, _ in chosen]
    diff = {k: p.detach() for k, p in chosen}
    rest = {k: p.detach() for k, p in model.named_parameters() if k not in diff}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, rest, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    fn = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0))

    def run(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads, losses = fn(diff, xb, yb)
        return torch.cat([grads[k].reshape(len(xb), -1) for k in names], dim=1), losses

    return run


def _per_sample_loop(
    model: nn.Module, chosen: list[tuple[str, nn.Parameter]], loss_fn: LossFn
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same as :func:`_per_sample_vmap` with one autograd call per sample (any model)."""
    params = [p for _, p in chosen]

    def run(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, losses = [], []
        for j in range(len(xb)):
            loss = loss_fn(model(xb[j : j + 1]), yb[j : j + 1])
            rows.append(_flat(torch.autograd.grad(loss, params, allow_unused=True), params))
            losses.append(loss.detach())
        return torch.stack(rows), torch.stack(losses)

    return run


def gradient_statistics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    *,
    param_names: Sequence[str] | None = None,
    max_samples: int | None = None,
    chunk_size: int = 64,
    ddof: int = 0,
    method: str = "auto",
    seed: int = 0,
) -> GradientStats:
    """Mean loss, mean gradient and per-sample gradient variance ``sigma^2`` of ``(x, y)`` (eval mode).

    ``sigma^2 = (1/(n - ddof)) sum_j ||grad l(theta; z_j) - grad F_S(theta)||^2`` over the ``n`` samples used
    (all, or ``max_samples`` drawn without replacement under ``seed``). ``ddof=0`` (default) is the population
    normalisation, the ``E_j`` of THEORY.md; it equals ``tr(Sigma)`` of the per-sample gradient covariance.

    Chunks of ``chunk_size`` per-sample gradients are reduced to ``(count, mean, within-chunk sum of squares)``
    and merged by the parallel-variance update ``M2 = M2_a + M2_b + ||m_b - m_a||^2 n_a n_b / (n_a + n_b)``
    in float64, so no ``[n, P]`` matrix is ever held and there is no cancellation of
    ``E||g||^2 - ||E g||^2``. ``method``: ``"vmap"`` (torch.func), ``"loop"`` (one autograd call per sample),
    or ``"auto"`` (vmap, falling back to the loop if the model does not support it).
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    chosen = _select_params(model, param_names)
    dev = model_device(model)
    idx = sample_indices(len(x), max_samples, seed)
    n = len(idx)
    if n - ddof <= 0:
        raise ValueError(f"need more than ddof={ddof} samples, got {n}")
    used = method
    with modules_in_mode(model, False):
        runner = _per_sample_loop(model, chosen, loss_fn) if method == "loop" else _per_sample_vmap(model, chosen, loss_fn)
        count, mean, m2, loss_sum = 0, None, 0.0, 0.0
        for i in range(0, n, chunk_size):
            b = idx[i : i + chunk_size]
            xb, yb = x[b].to(dev), y[b].to(dev)
            try:
                g, losses = runner(xb, yb)
            except Exception as exc:  # noqa: BLE001 - torch.func raises many types for unsupported models
                if method != "auto" or used == "loop":
                    raise
                log.warning("per-sample gradients with torch.func failed (%s); falling back to a loop", exc)
                used = "loop"
                runner = _per_sample_loop(model, chosen, loss_fn)
                g, losses = runner(xb, yb)
            if used == "auto":
                used = "vmap"
            g = g.detach().double()
            nb = g.shape[0]
            mb = g.mean(0)
            m2b = float(((g - mb) ** 2).sum())
            if mean is None:
                mean, m2 = mb, m2b
            else:
                d = mb - mean
                m2 += m2b + float(d.dot(d)) * count * nb / (count + nb)
                mean = mean + d * (nb / (count + nb))
            count += nb
            loss_sum += float(losses.double().sum())
    assert mean is not None
    return GradientStats(
        n=n,
        loss=loss_sum / n,
        grad=mean,
        sigma2=m2 / (n - ddof),
        grad_norm2=float(mean.dot(mean)),
        ddof=ddof,
        method=used,
        param_names=tuple(k for k, _ in chosen),
    )


# ---------------------------------------------------------------------------------------------------------
# heterogeneity
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeterogeneityResult:
    """``delta_i^2 = ||grad F_i - grad F||^2`` with ``grad F = sum_i p_i grad F_i``, ``p_i = n_i / n``.

    ``gram[i, j] = <grad F_i, grad F_j>``; ``mean_delta2 = sum_i p_i delta_i^2`` (the pool heterogeneity, the
    ``zeta^2``/``kappa^2`` of FedNova's assumption); ``mean_grad_norm2 = ||grad F||^2``.
    """

    delta2: tuple[float, ...]
    weights: tuple[float, ...]
    gram: np.ndarray = field(repr=False)
    mean_delta2: float
    mean_grad_norm2: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "delta2": list(self.delta2),
            "weights": list(self.weights),
            "gram": self.gram.tolist(),
            "mean_delta2": self.mean_delta2,
            "mean_grad_norm2": self.mean_grad_norm2,
        }


def gradient_heterogeneity(grads: Sequence[torch.Tensor], n: Sequence[float] | None = None) -> HeterogeneityResult:
    """Heterogeneity of task gradients ``grads[i] = grad F_i(theta)`` (flat, same parameters) weighted by ``n``.

    ``n`` are the task sample counts (default: equal weights). Computed directly in float64 as
    ``||g_i - sum_j p_j g_j||^2`` (the Gram route of
    :func:`mergelab.analysis.heterogeneity.heterogeneity_from_gram` is for sub-pools).
    """
    if not grads:
        raise ValueError("gradient_heterogeneity needs at least one gradient")
    mat = torch.stack([g.detach().reshape(-1).double().cpu() for g in grads])
    counts = np.ones(len(grads)) if n is None else np.asarray(n, dtype=np.float64)
    if counts.shape != (len(grads),) or np.any(counts <= 0):
        raise ValueError("n must hold one positive count per gradient")
    p = torch.from_numpy(counts / counts.sum())
    mean = p @ mat
    diff = mat - mean
    delta2 = (diff * diff).sum(1)
    gram = (mat @ mat.T).numpy()
    return HeterogeneityResult(
        delta2=tuple(float(d) for d in delta2),
        weights=tuple(float(w) for w in p),
        gram=gram,
        mean_delta2=float(p @ delta2),
        mean_grad_norm2=float(mean.dot(mean)),
    )


# ---------------------------------------------------------------------------------------------------------
# everything for a pool of tasks sharing a backbone
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskMeasurement:
    """Measurements of one task at theta_0 through its head (gradients over the backbone parameters).

    ``n`` is the task's training-set size (the ``n_i`` of the bound); ``n_used`` the samples measured.
    ``init_loss = F_{S_i}(theta_0)``; ``smoothness`` the power-iteration result for this task's loss.
    """

    name: str
    n: int
    n_used: int
    init_loss: float
    sigma2: float
    grad_norm2: float
    smoothness: PowerIterationResult | None
    grad: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "n_used": self.n_used,
            "init_loss": self.init_loss,
            "sigma2": self.sigma2,
            "grad_norm2": self.grad_norm2,
            "smoothness": None if self.smoothness is None else self.smoothness.to_dict(),
        }


@dataclass(frozen=True)
class PoolMeasurement:
    """Per-task measurements plus pool heterogeneity; ``smoothness = max_i L_i`` (every F_i is L-smooth)."""

    tasks: tuple[TaskMeasurement, ...]
    heterogeneity: HeterogeneityResult
    smoothness: float
    param_names: tuple[str, ...]
    settings: dict[str, Any]

    @property
    def delta2(self) -> tuple[float, ...]:
        return self.heterogeneity.delta2

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "heterogeneity": self.heterogeneity.to_dict(),
            "smoothness": self.smoothness,
            "num_param_tensors": len(self.param_names),
            "num_params": int(self.tasks[0].grad.numel()) if self.tasks else 0,
            "settings": dict(self.settings),
        }


class _TaskModel(nn.Module):
    """``head(backbone(x))`` with parameter names ``backbone.*`` / ``head.*``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def measure_tasks(
    backbone: nn.Module,
    heads: Sequence[nn.Module],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str] | None = None,
    *,
    n: Sequence[int] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    adapt_bn: bool = True,
    max_samples: int | None = 512,
    chunk_size: int = 64,
    hessian: bool = True,
    hessian_batch_size: int = 256,
    hessian_iters: int = 30,
    hessian_tol: float = 1e-3,
    seed: int = 0,
) -> PoolMeasurement:
    """Measure sigma_i^2, F_{S_i}(theta), grad F_i, L_i for each task and the heterogeneity delta_i^2.

    Args:
        backbone: the shared backbone at the point of interest (theta_0 for the bound). Not modified: each
            task works on a deep copy.
        heads: one head per task (e.g. the linear probe fine-tuning starts from, or the expert's head).
        data: ``(x_train, y_train)`` per task.
        n: the tasks' training-set sizes ``n_i`` (default ``len(x_i)``); they weight ``F = sum (n_i/n) F_i``.
        adapt_bn: re-estimate BN running statistics on each task's training images before measuring
            (:func:`mergelab.evaluation.bn.reset_bn_statistics`, as fine-tuning does at theta_0).
        max_samples: samples per task for the loss, mean gradient and sigma^2 (``None``: all).
        hessian: also estimate L_i by power iteration on one batch of ``hessian_batch_size``.

    Gradients are taken over the **backbone parameters only** (names ``backbone.*``); the heads are held
    fixed. Eval mode throughout (see the module docstring).
    """
    if len(heads) != len(data):
        raise ValueError(f"{len(heads)} heads for {len(data)} data sets")
    names = list(names) if names is not None else [f"task{i}" for i in range(len(data))]
    counts = list(n) if n is not None else [len(x) for x, _ in data]
    tasks: list[TaskMeasurement] = []
    pnames: tuple[str, ...] = ()
    for i, ((x, y), head) in enumerate(zip(data, heads)):
        bb = copy.deepcopy(backbone)
        if adapt_bn:
            reset_bn_statistics(bb, x, seed=seed)
        model = _TaskModel(bb, copy.deepcopy(head))
        backbone_names = [k for k, p in model.named_parameters() if k.startswith("backbone.") and p.requires_grad]
        stats = gradient_statistics(
            model, x, y, loss_fn, param_names=backbone_names, max_samples=max_samples, chunk_size=chunk_size, seed=seed
        )
        smooth = None
        if hessian:
            smooth = hessian_top_eigenvalue(
                model, x, y, loss_fn, param_names=backbone_names, batch_size=hessian_batch_size,
                iters=hessian_iters, tol=hessian_tol, seed=seed,
            )
        pnames = stats.param_names
        tasks.append(TaskMeasurement(names[i], int(counts[i]), stats.n, stats.loss, stats.sigma2, stats.grad_norm2, smooth, stats.grad))
        log.info("task %s: F0=%.4g sigma2=%.4g L=%s", names[i], stats.loss, stats.sigma2, None if smooth is None else f"{smooth.spectral_norm:.4g}")
    het = gradient_heterogeneity([t.grad for t in tasks], counts)
    lmax = max((t.smoothness.spectral_norm for t in tasks if t.smoothness is not None), default=float("nan"))
    settings = {
        "adapt_bn": adapt_bn,
        "max_samples": max_samples,
        "hessian_batch_size": hessian_batch_size,
        "hessian_iters": hessian_iters,
        "hessian_tol": hessian_tol,
        "seed": seed,
        "mode": "eval",
        "params": "backbone",
        "sigma2_normalisation": "1/n (population)",
    }
    return PoolMeasurement(tuple(tasks), het, lmax, pnames, settings)
