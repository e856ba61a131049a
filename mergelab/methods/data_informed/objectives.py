"""Objectives on points (``name -> tensor``) for data-informed merges that optimise over model parameters.

* :class:`Objective` ``l(theta)`` with its gradient; :class:`MultiTaskObjective` the mean of per-task losses
  ``l = (1/T) sum_t l_t`` that exposes each ``l_t`` and ``grad l_t``;
* :class:`FunctionObjective` / :class:`TaskFunctionObjective`: any differentiable callable(s), gradients by
  autograd (tests, small problems);
* :class:`ModelObjective`: a backbone with per-task heads on a little data, ``l_t`` the mean cross-entropy
  (``ce``) or prediction entropy :func:`softmax_entropy` (``entropy``, unlabelled) of task t through its
  head, with BatchNorm statistics either the merged point's running statistics (differentiable, see
  :func:`batchnorm_layers`) or the batch's.

Used by FW-Merging (:mod:`~mergelab.methods.data_informed.frank_wolfe`); AdaMerging uses
:func:`softmax_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergelab.errors import NonFiniteError

#: A point of the search space: tensor name -> tensor.
Point = dict[str, torch.Tensor]
ObjectiveKind = Literal["ce", "entropy"]
BnMode = Literal["merged", "batch"]


class Objective(Protocol):
    """``l(theta)`` on points (``name -> tensor``). ``value_and_grad`` returns the gradient for the
    differentiable tensors only (a subset of the point's names); it must not modify or keep ``theta``."""

    def value(self, theta: Mapping[str, torch.Tensor]) -> float: ...

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]: ...


class MultiTaskObjective(Objective, Protocol):
    """An :class:`Objective` that is the mean of per-task losses, ``l = (1/T) sum_t l_t``, and exposes them:
    ``task_values_and_grads(theta) -> (l, {t: l_t}, {t: grad l_t})`` (so ``grad l = (1/T) sum_t grad l_t``).
    Needed by ``oracle: per_task``; ``tasks`` names the T tasks in a fixed order."""

    tasks: list[str]

    def task_values_and_grads(self, theta: Mapping[str, torch.Tensor]
                              ) -> tuple[float, dict[str, float], dict[str, Point]]: ...


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"Frank-Wolfe: the objective is {value} at {what}")
    return value


def _autograd(fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], theta: Mapping[str, torch.Tensor],
              names: Sequence[str]) -> tuple[float, Point]:
    leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        out = fn({**theta, **leaves})
        grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
    return (_finite(float(out.detach()), "a point"),
            {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)})


class FunctionObjective:
    """``l(theta) = fn(theta)`` for a differentiable callable on points; gradient by autograd.

    ``differentiable`` names the tensors that get gradients (default: every floating tensor of the point).
    """

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                 differentiable: Collection[str] | None = None) -> None:
        self.fn = fn
        self.differentiable = None if differentiable is None else list(differentiable)

    def _names(self, theta: Mapping[str, torch.Tensor]) -> list[str]:
        return self.differentiable or [n for n, t in theta.items() if t.is_floating_point()]

    def value(self, theta: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return _finite(float(self.fn(theta)), "a point")

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]:
        return _autograd(self.fn, theta, self._names(theta))


class TaskFunctionObjective(FunctionObjective):
    """``l(theta) = (1/T) sum_t fns[t](theta)``: a :class:`MultiTaskObjective` from one differentiable callable
    per task (gradients by autograd; ``differentiable`` as for :class:`FunctionObjective`)."""

    def __init__(self, fns: Mapping[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]],
                 differentiable: Collection[str] | None = None) -> None:
        if not fns:
            raise ValueError("the objective needs at least one task")
        self.fns = dict(fns)
        self.tasks = list(self.fns)
        super().__init__(lambda th: sum(f(th) for f in self.fns.values()) / len(self.fns), differentiable)

    def task_values_and_grads(self, theta: Mapping[str, torch.Tensor]
                              ) -> tuple[float, dict[str, float], dict[str, Point]]:
        names = self._names(theta)
        values, grads = {}, {}
        for task, fn in self.fns.items():
            values[task], grads[task] = _autograd(fn, theta, names)
        return sum(values.values()) / len(values), values, grads


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of ``softmax(logits)``: ``-sum_c p_c log p_c``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class _StatisticsDifferentiableBN:
    """Mixin for BatchNorm classes: in eval mode, ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``
    written out, so that autograd reaches the running statistics (PyTorch's eval-mode ``batch_norm`` refuses
    gradients for them). Train mode, and layers without running statistics, use the class's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


_DIFFERENTIABLE_BN: dict[type, type] = {}


def _differentiable_bn_class(cls: type) -> type:
    if cls not in _DIFFERENTIABLE_BN:
        name = f"StatisticsDifferentiable{cls.__name__}"
        _DIFFERENTIABLE_BN[cls] = type(name, (_StatisticsDifferentiableBN, cls), {})
    return _DIFFERENTIABLE_BN[cls]


def batchnorm_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` of the backbone's BatchNorm layers."""
    return {n: m for n, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class ModelObjective:
    """The FW-Merging objective on a backbone: ``l = (1/T) sum_t l_t``, ``l_t`` the mean per-example loss of task t
    through its head (``kind``: ``ce`` cross-entropy with labels, ``entropy`` prediction entropy without).

    The backbone runs through :func:`torch.func.functional_call` with the point's tensors, in eval mode except
    for BatchNorm (``bn``):

    * ``merged``: BN in eval mode with the point's running statistics, as the merged model is evaluated. With
      ``statistics_gradient`` (default) the statistics are differentiable too (the BN layers of ``backbone`` are
      switched, in place, to an equivalent eval-mode formula that autograd can differentiate in them): they
      move with the convex coefficients like the weights, so the oracle and the coefficient gradients must
      see them (module docstring). ``statistics_gradient=False`` differentiates the parameters only (the
      earlier behaviour, which let fw_hard stall on its start).
      Examples are processed in chunks of ``batch_size`` (eval-mode BN makes the chunking exact).
    * ``batch``: BN in train mode, normalising with the statistics of the batch; each task's examples form
      **one** batch whatever ``batch_size`` is (train-mode BN is not separable across chunks, so chunks would
      change the function), so ``l_t`` is a deterministic function of the parameters and the running
      statistics do not enter it (they get no gradient; the layers' own buffers absorb the train-mode updates,
      the point's are never written). Activation memory grows with the number of examples per task.

    ``differentiable``: the names that get gradients. ``task_values_and_grads`` gives each task's loss and
    gradient (T gradients, each the size of the differentiable tensors).
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 data: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], kind: ObjectiveKind = "ce",
                 batch_size: int = 64, *, bn: BnMode = "merged", statistics_gradient: bool = True) -> None:
        if kind not in ("ce", "entropy"):
            raise ValueError(f"objective must be 'ce' or 'entropy', got {kind!r}")
        if bn not in ("merged", "batch"):
            raise ValueError(f"bn must be 'merged' or 'batch', got {bn!r}")
        if not data:
            raise ValueError("the objective needs data for at least one task")
        missing = [t for t in data if t not in heads]
        if missing:
            raise ValueError(f"no head for task(s) {missing}")
        if kind == "ce" and any(y is None for _, y in data.values()):
            raise ValueError("objective 'ce' needs labels for every task")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.parameter_names = [n for n, _ in backbone.named_parameters()]
        layers = batchnorm_layers(backbone)
        self.statistics_names = [f"{name}.{b}" if name else b for name, m in layers.items()
                                 for b in ("running_mean", "running_var") if getattr(m, b, None) is not None]
        self._statistics = set(self.statistics_names)
        self.bn = bn
        if bn == "batch":
            for m in layers.values():
                m.train()
            self.differentiable = list(self.parameter_names)
        else:
            if statistics_gradient:
                for m in layers.values():
                    m.__class__ = _differentiable_bn_class(type(m))
            self.differentiable = self.parameter_names + (self.statistics_names if statistics_gradient else [])
        self.heads = dict(heads)
        self.data = dict(data)
        self.tasks = list(self.data)
        self.kind = kind
        self.batch_size = int(batch_size)

    def _chunks(self, task: str):
        x, y = self.data[task]
        n = len(x)
        size = n if self.bn == "batch" else self.batch_size
        for start in range(0, n, size):
            yield x[start : start + size], None if y is None else y[start : start + size], 1.0 / n

    def _loss(self, state: Mapping[str, torch.Tensor], task: str, x: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        if self.bn == "batch":  # the layers' own buffers take the train-mode updates, never the point's
            state = {n: t for n, t in state.items() if n not in self._statistics}
        features = functional_call(self.backbone, dict(state), (x,))
        head = self.heads[task]
        logits = F.linear(features, head.weight.to(features.dtype), head.bias.to(features.dtype))
        if self.kind == "ce":
            return F.cross_entropy(logits, y, reduction="sum")
        return softmax_entropy(logits).sum()

    def task_value(self, theta: Mapping[str, torch.Tensor], task: str) -> float:
        with torch.no_grad():
            return sum(float(self._loss(theta, task, x, y)) * w for x, y, w in self._chunks(task))

    def value(self, theta: Mapping[str, torch.Tensor]) -> float:
        total = sum(self.task_value(theta, task) for task in self.tasks) / len(self.tasks)
        return _finite(total, "the merged model")

    def _accumulate(self, theta: Mapping[str, torch.Tensor], task: str, scale: float, grads: Point) -> float:
        leaves = {n: theta[n].detach().requires_grad_(True) for n in self.differentiable}
        state = {**theta, **leaves}
        total = 0.0
        with torch.enable_grad():
            for x, y, w in self._chunks(task):
                loss = self._loss(state, task, x, y) * w
                for acc, g in zip(grads.values(), torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        acc.add_(g, alpha=scale)
                total += float(loss.detach())
        return total

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]:
        grads = {n: torch.zeros_like(theta[n]) for n in self.differentiable}
        total = sum(self._accumulate(theta, task, 1.0 / len(self.tasks), grads) for task in self.tasks)
        return _finite(total / len(self.tasks), "the merged model"), grads

    def task_values_and_grads(self, theta: Mapping[str, torch.Tensor]
                              ) -> tuple[float, dict[str, float], dict[str, Point]]:
        values, grads = {}, {}
        for task in self.tasks:
            grads[task] = {n: torch.zeros_like(theta[n]) for n in self.differentiable}
            values[task] = _finite(self._accumulate(theta, task, 1.0, grads[task]), f"the merged model ({task})")
        return sum(values.values()) / len(values), values, grads
