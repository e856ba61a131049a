"""Loss landscapes between models: linear interpolation, task-arithmetic path, 2-D planes, barriers.

All tools are generic over any ``nn.Module`` (the *merged* module, e.g. a backbone) evaluated on one or
more tasks, each with its own data, an optional fixed head and a loss. Parameters move; heads do not.

Paths (THEORY.md section 2; Zhang et al. 2025, "How does the optimizer implicitly bias the model merging
loss landscape?"; Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis"):

* linear interpolation ``theta(a) = (1 - a) theta_A + a theta_B`` on a grid of ``a`` (default 11 points
  ``0, 0.1, ..., 1``) -- :func:`linear_interpolation`;
* the task-arithmetic coefficient path ``theta(a) = theta_0 + a * sum_i tau_i`` with
  ``tau_i = theta_i - theta_0`` (Ilharco et al. 2023) -- :func:`task_arithmetic_path`;
* a 2-D plane through three models (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast
  ensembling of DNNs"): Gram-Schmidt basis ``u_hat = u / ||u||`` with ``u = theta_2 - theta_1`` and
  ``v_hat = v / ||v||`` with ``v = w - <w, u_hat> u_hat``, ``w = theta_3 - theta_1``; the point at
  coordinates ``(x, y)`` is ``theta_1 + x u_hat + y v_hat`` and the three models sit at ``(0, 0)``,
  ``(||u||, 0)`` and ``(<w, u_hat>, ||v||)`` -- :func:`loss_plane`.

Summary statistics of a path (per task, from the grid values; ``a = 0`` and ``a = 1`` must be on the grid):

* **loss barrier** ``B_loss = max_{a in [0, 1]} [ L(a) - ((1 - a) L(0) + a L(1)) ]`` -- the height of the
  loss above the straight line between the endpoints' losses. Because the endpoints are on the grid it is
  ``>= 0`` (exactly 0 when the curve never rises above the chord, e.g. for a convex loss);
* **accuracy barrier** ``B_acc = max_{a in [0, 1]} [ ((1 - a) A(0) + a A(1)) - A(a) ]`` -- the accuracy drop
  below the chord (positive = worse than the endpoints), the analogue of Frankle et al.'s error barrier;
* **merge gain** ``Delta = f(0.5) - (f(0) + f(1)) / 2`` for ``f`` = accuracy (positive is good) and the
  same formula for the loss (then negative is good), THEORY.md section 2.

BatchNorm and integer buffers
-----------------------------
Every floating-point entry of the state dict -- parameters *and* BatchNorm ``running_mean`` /
``running_var`` -- is combined with the same coefficients (``bn="interpolate"``, the default, which is
what a plain weight-space merge of checkpoints does). Integer buffers (``num_batches_tracked``) are never
combined: they are copied from the first model (``theta_A``, ``theta_0`` or ``theta_1``).

Interpolated running statistics are generally *not* the statistics of the interpolated network's own
activations: averaging weights of (aligned) ResNets shrinks the activation variance ("variance collapse",
Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair"), which inflates
the measured barrier. ``bn="reset"`` re-estimates the statistics at every point of the path with
:func:`mergelab.evaluation.bn.reset_bn_statistics` on *training* inputs (``bn_data``, or each task's own
``EvalTask.bn_data`` when no shared set is given) before evaluating. Report which mode was used (it is
stored in every result): barriers of ResNets under the two modes differ a lot. Under extrapolation (TA
coefficients with ``a * N > 1`` or plane points outside the triangle) interpolated ``running_var`` can
become negative; a warning is logged and ``bn="reset"`` is the remedy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.atomic_files import open_atomic
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.report.figure_text import literal

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]
ModelLike = nn.Module | Mapping[str, torch.Tensor]
#: ``(x, y)`` tensors, or any iterable of ``(x, y)`` batches (e.g. a ``DataLoader``).
DataLike = tuple[torch.Tensor, torch.Tensor] | Iterable[Any]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
BNMode = Literal["interpolate", "reset"]

_INT_SUFFIX = "num_batches_tracked"


# --------------------------------------------------------------------------------------------- tasks
def default_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Per-sample correctness ``argmax_k outputs[:, k] == target`` (bool), or ``None`` for non-class targets.

    Classification is recognised by integer targets whose shape is ``outputs.shape[:-1]``; for anything else
    (regression) the metric is undefined and results report ``nan`` accuracy.
    """
    if targets.is_floating_point() or targets.is_complex() or outputs.dim() < 1:
        return None
    if tuple(targets.shape) != tuple(outputs.shape[:-1]):
        return None
    return outputs.argmax(-1) == targets


@dataclass
class EvalTask:
    """One task on which a path is evaluated: ``loss_fn(head(model(x)), y)`` averaged over ``data``.

    Attributes:
        name: key of this task in the results.
        data: ``(x, y)`` tensors (split into ``batch_size`` chunks) or an iterable of ``(x, y)`` batches.
        head: fixed module applied after the path's model (e.g. the task's expert head); ``None`` evaluates
            the model's own output.
        loss_fn: mean-reduced loss ``(outputs, targets) -> scalar`` (default cross-entropy); batch means are
            combined weighted by batch size, which is exact for mean-reduced losses.
        metric: per-sample score ``(outputs, targets) -> [B]`` averaged into the "accuracy" value (default
            :func:`default_accuracy`); returning ``None`` reports ``nan``.
        bn_data: training inputs (tensor or iterable of batches / ``(x, y)`` pairs) used to re-estimate
            BatchNorm statistics for this task when ``bn="reset"`` and no shared ``bn_data`` is given.
        batch_size: chunk size when ``data`` is a pair of tensors.
    """

    name: str
    data: DataLike
    head: nn.Module | None = None
    loss_fn: LossFn = F.cross_entropy
    metric: MetricFn = default_accuracy
    bn_data: Any = None
    batch_size: int = 512

    @classmethod
    def from_task_data(cls, task: Any, head: nn.Module | None = None, split: str = "test", **kwargs: Any) -> EvalTask:
        """An :class:`EvalTask` from a :class:`mergelab.tasks.TaskData` (``split`` data, train inputs for BN)."""
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        kwargs.setdefault("bn_data", task.x_train)
        return cls(name=task.name, data=(x, y), head=head, **kwargs)


def _as_tasks(tasks: EvalTask | Sequence[EvalTask] | DataLike) -> list[EvalTask]:
    """Normalise the ``tasks`` argument: one task, a list of tasks, or bare data (one task named "task")."""
    if isinstance(tasks, EvalTask):
        out = [tasks]
    elif isinstance(tasks, (list, tuple)) and not tasks:
        raise SpecError("no tasks to evaluate")
    elif isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, EvalTask) for t in tasks):
        out = list(tasks)
    else:
        out = [EvalTask(name="task", data=tasks)]  # type: ignore[arg-type]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise SpecError(f"task names must be unique, got {names}")
    return out


def _batches(data: DataLike, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise SpecError(f"data: {len(x)} inputs but {len(y)} targets")
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        for batch in data:
            xb, yb = batch[0], batch[1]
            yield xb, yb


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_module(
    model: nn.Module,
    data: DataLike,
    loss_fn: LossFn = F.cross_entropy,
    head: nn.Module | None = None,
    metric: MetricFn = default_accuracy,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """``(mean loss, mean metric)`` of ``head(model(x))`` over ``data``, in eval mode without gradients.

    The mean loss is ``sum_b n_b * loss_fn(batch b) / sum_b n_b`` (float64 accumulation); the metric is the
    mean of the per-sample scores (``nan`` when ``metric`` returns ``None`` or the data are empty). Modules
    are restored to their previous train/eval mode.
    """
    device = torch.device(device) if device is not None else _module_device(model)
    modules = [model] + ([head] if head is not None else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    loss_sum, metric_sum, n, metric_ok = 0.0, 0.0, 0, True
    try:
        for xb, yb in _batches(data, batch_size):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            if head is not None:
                out = head(out)
            nb = int(yb.shape[0])
            loss_sum += float(loss_fn(out, yb).double()) * nb
            scores = metric(out, yb) if metric_ok else None
            if scores is None:
                metric_ok = False
            else:
                metric_sum += float(scores.double().sum())
            n += nb
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    if n == 0:
        return float("nan"), float("nan")
    return loss_sum / n, (metric_sum / n if metric_ok else float("nan"))


# ---------------------------------------------------------------------------------- state algebra
def _state_of(model: ModelLike) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    return dict(model)


def _matched_state(template: State, given: State, label: str) -> dict[str, torch.Tensor]:
    """``given`` checked against ``template``'s names/shapes; missing integer counters are taken from it."""
    missing = [k for k in template if k not in given and not k.endswith(_INT_SUFFIX)]
    extra = [k for k in given if k not in template]
    if missing or extra:
        raise TensorMismatchError(
            f"{label}: state does not match the model: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {extra[:3]} ({len(extra)})"
        )
    out = {}
    for k, ref in template.items():
        if k not in given:
            out[k] = ref
            continue
        t = given[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise TensorMismatchError(f"{label}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        out[k] = t
    return out


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def combine_states(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Affine/linear combination ``sum_i w_i theta_i`` of state dicts, tensor by tensor.

    Floating tensors are accumulated in float64 and cast back to their dtype (so weights ``(1, 0, ...)``
    reproduce the first state exactly); integer/bool tensors (e.g. ``num_batches_tracked``) are copied from
    the first state. All states must have the first state's keys and shapes.
    """
    if len(states) != len(weights) or not states:
        raise SpecError(f"combine_states: {len(states)} states but {len(weights)} weights")
    first = states[0]
    out: dict[str, torch.Tensor] = {}
    for k, t0 in first.items():
        if not _is_float(t0):
            out[k] = t0.clone()
            continue
        acc = torch.zeros(t0.shape, dtype=torch.complex128 if t0.is_complex() else torch.float64, device=t0.device)
        for s, w in zip(states, weights):
            if w != 0.0:
                acc.add_(s[k].to(device=t0.device, dtype=acc.dtype), alpha=float(w))
        out[k] = acc.to(t0.dtype)
    return out


def interpolate_states(state_a: State, state_b: State, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) theta_A + alpha theta_B`` on floating tensors; integer buffers from ``theta_A``."""
    return combine_states([state_a, state_b], [1.0 - alpha, alpha])


def task_arithmetic_state(base: State, experts: Sequence[State], coefficient: float) -> dict[str, torch.Tensor]:
    """``theta_0 + a * sum_i (theta_i - theta_0)`` in float64, task vectors summed first; ints from the base."""
    out: dict[str, torch.Tensor] = {}
    for k, t0 in base.items():
        if not _is_float(t0):
            out[k] = t0.clone()
            continue
        b64 = t0.to(torch.complex128 if t0.is_complex() else torch.float64)
        tau = torch.zeros_like(b64)
        for e in experts:
            tau.add_(e[k].to(device=t0.device, dtype=b64.dtype) - b64)
        out[k] = (b64 + coefficient * tau).to(t0.dtype)
    return out


def _warn_negative_variance(state: Mapping[str, torch.Tensor], where: str) -> bool:
    bad = [k for k, v in state.items() if k.endswith("running_var") and _is_float(v) and bool((v < 0).any())]
    if bad:
        logger.warning(
            "%s: interpolated BatchNorm running_var is negative in %d layer(s) (e.g. %s); "
            "use bn='reset' to re-estimate the statistics",
            where,
            len(bad),
            bad[0],
        )
    return bool(bad)


# ------------------------------------------------------------------------------------ evaluation core
def _input_tensor(data: Any, max_samples: int) -> torch.Tensor:
    """Inputs from a tensor, an ``(x, y)`` pair or an iterable of batches, at most ``max_samples`` rows."""
    if isinstance(data, torch.Tensor):
        return data[:max_samples]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:max_samples]
    parts, n = [], 0
    for batch in data:
        xb = batch if isinstance(batch, torch.Tensor) else batch[0]
        parts.append(xb)
        n += len(xb)
        if n >= max_samples:
            break
    if not parts:
        raise SpecError("bn_data is empty")
    return torch.cat(parts)[:max_samples]


@dataclass
class _Evaluator:
    """A private working copy of the template module, loaded with each path point in turn."""

    template: nn.Module
    tasks: list[EvalTask]
    bn: BNMode
    bn_data: Any
    bn_batches: int
    bn_batch_size: int
    device: torch.device | None
    work: nn.Module = field(init=False)
    ref_state: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        if self.bn not in ("interpolate", "reset"):
            raise SpecError(f"bn must be 'interpolate' or 'reset', got {self.bn!r}")
        self.work = deepcopy(self.template)
        if self.device is not None:
            self.work.to(self.device)
        self.ref_state = _state_of(self.template)
        self._heads = {
            t.name: (deepcopy(t.head).to(self.device) if (t.head is not None and self.device is not None) else t.head)
            for t in self.tasks
        }
        self._warned = False
        self._shared_bn = None
        if self.bn == "reset":
            limit = self.bn_batches * self.bn_batch_size
            if self.bn_data is not None:
                self._shared_bn = _input_tensor(self.bn_data, limit)
            else:
                missing = [t.name for t in self.tasks if t.bn_data is None]
                if missing:
                    raise SpecError(
                        f"bn='reset' needs training inputs: pass bn_data or set EvalTask.bn_data for {missing}"
                    )
                self._task_bn = {t.name: _input_tensor(t.bn_data, limit) for t in self.tasks}

    def state(self, model: ModelLike, label: str) -> dict[str, torch.Tensor]:
        return _matched_state(self.ref_state, _state_of(model), label)

    def _reset(self, x: torch.Tensor) -> None:
        reset_bn_statistics(self.work, x, batch_size=self.bn_batch_size, num_batches=self.bn_batches)

    def __call__(self, state: Mapping[str, torch.Tensor], where: str) -> dict[str, tuple[float, float]]:
        if self.bn == "interpolate" and not self._warned:
            self._warned = _warn_negative_variance(state, where)
        self.work.load_state_dict(dict(state))
        if self._shared_bn is not None:
            self._reset(self._shared_bn)
        out = {}
        for task in self.tasks:
            if self.bn == "reset" and self._shared_bn is None:
                self._reset(self._task_bn[task.name])
            head = self._heads[task.name]
            out[task.name] = evaluate_module(
                self.work, task.data, task.loss_fn, head, task.metric, task.batch_size, self.device
            )
        return out


# -------------------------------------------------------------------------------- curve statistics
def _grid_index(alphas: Sequence[float], target: float) -> int:
    for i, a in enumerate(alphas):
        if math.isclose(a, target, rel_tol=0.0, abs_tol=1e-9):
            return i
    raise SpecError(f"the grid {list(alphas)} does not contain a = {target}, needed for this statistic")


def barrier_height(alphas: Sequence[float], values: Sequence[float], higher_is_better: bool = False) -> float:
    """``max_{a in [0,1]} [f(a) - ((1-a) f(0) + a f(1))]`` (loss) or the chord minus ``f`` (accuracy).

    ``a = 0`` and ``a = 1`` must be grid points; grid points outside ``[0, 1]`` are ignored. Since the
    endpoints themselves contribute 0, the result is ``>= 0`` for finite values.
    """
    i0, i1 = _grid_index(alphas, 0.0), _grid_index(alphas, 1.0)
    f0, f1 = float(values[i0]), float(values[i1])
    sign = -1.0 if higher_is_better else 1.0
    gaps = [
        sign * (float(f) - ((1.0 - a) * f0 + a * f1)) for a, f in zip(alphas, values) if -1e-9 <= a <= 1 + 1e-9
    ]
    if any(math.isnan(g) for g in gaps):
        return float("nan")
    return max(gaps) + 0.0  # + 0.0 turns -0.0 into 0.0


def midpoint_gain(alphas: Sequence[float], values: Sequence[float]) -> float:
    """Merge gain ``Delta = f(0.5) - (f(0) + f(1)) / 2`` (THEORY.md section 2) from grid values."""
    f0 = float(values[_grid_index(alphas, 0.0)])
    f1 = float(values[_grid_index(alphas, 1.0)])
    return float(values[_grid_index(alphas, 0.5)]) - 0.5 * (f0 + f1)


@dataclass
class Curve:
    """Loss and accuracy of one task along a one-parameter path (``alphas`` = interpolation/TA coefficients)."""

    task: str
    alphas: list[float]
    loss: list[float]
    accuracy: list[float]

    @property
    def loss_barrier(self) -> float:
        """``max_a [L(a) - ((1-a) L(0) + a L(1))]`` (see :func:`barrier_height`)."""
        return barrier_height(self.alphas, self.loss)

    @property
    def accuracy_barrier(self) -> float:
        """``max_a [((1-a) A(0) + a A(1)) - A(a)]``: accuracy lost below the endpoints' chord."""
        return barrier_height(self.alphas, self.accuracy, higher_is_better=True)

    @property
    def loss_gain(self) -> float:
        """``L(0.5) - (L(0) + L(1)) / 2`` (negative = the midpoint merge has lower loss)."""
        return midpoint_gain(self.alphas, self.loss)

    @property
    def accuracy_gain(self) -> float:
        """``A(0.5) - (A(0) + A(1)) / 2`` (positive = the midpoint merge is more accurate)."""
        return midpoint_gain(self.alphas, self.accuracy)

    def best(self, metric: str = "accuracy") -> tuple[float, float]:
        """``(alpha, value)`` of the best grid point: highest accuracy, or lowest loss for ``"loss"``."""
        vals = np.asarray(self.accuracy if metric == "accuracy" else self.loss, dtype=float)
        if np.all(np.isnan(vals)):
            return float("nan"), float("nan")
        i = int(np.nanargmax(vals) if metric == "accuracy" else np.nanargmin(vals))
        return self.alphas[i], float(vals[i])

    def summary(self, kind: str = "linear") -> dict[str, float | None]:
        """Barriers and gains for a linear path (``None`` where the grid lacks 0, 0.5 or 1); best point for TA."""
        out: dict[str, float | None] = {}
        if kind == "linear":
            for name in ("loss_barrier", "accuracy_barrier", "loss_gain", "accuracy_gain"):
                try:
                    out[name] = getattr(self, name)
                except SpecError:
                    out[name] = None
        a, v = self.best("accuracy")
        out["best_alpha_accuracy"], out["best_accuracy"] = a, v
        a, v = self.best("loss")
        out["best_alpha_loss"], out["best_loss"] = a, v
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class PathResult:
    """Per-task :class:`Curve` s along a path.

    Attributes:
        kind: ``"linear"`` (``(1-a) theta_A + a theta_B``) or ``"task_arithmetic"`` (``theta_0 + a sum tau``).
        alphas: the grid. curves: task name -> curve. bn: BatchNorm mode used (see the module docstring).
    """

    kind: str
    alphas: list[float]
    curves: dict[str, Curve]
    bn: str

    def mean_curve(self) -> Curve:
        """The task-average curve (mean loss and mean accuracy over tasks at each grid point)."""
        c = list(self.curves.values())
        loss = np.mean([x.loss for x in c], axis=0).tolist()
        acc = np.mean([x.accuracy for x in c], axis=0).tolist()
        return Curve(task="mean", alphas=list(self.alphas), loss=loss, accuracy=acc)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per task (and ``"mean"`` when several tasks): barriers/gains (linear) and best grid points."""
        out = {name: c.summary(self.kind) for name, c in self.curves.items()}
        if len(self.curves) > 1:
            out["mean"] = self.mean_curve().summary(self.kind)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (JSON-serialisable) with the curves and :meth:`summary`."""
        return {
            "kind": self.kind,
            "alphas": list(self.alphas),
            "bn": self.bn,
            "curves": {k: c.to_dict() for k, c in self.curves.items()},
            "summary": self.summary(),
        }


def _grid(values: Sequence[float] | np.ndarray | None, default: np.ndarray) -> list[float]:
    arr = default if values is None else np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise SpecError("empty grid of coefficients")
    return [float(a) for a in arr]


def _run_path(
    evaluator: _Evaluator, alphas: list[float], make_state: Callable[[float], dict[str, torch.Tensor]], kind: str
) -> PathResult:
    losses: dict[str, list[float]] = {t.name: [] for t in evaluator.tasks}
    accs: dict[str, list[float]] = {t.name: [] for t in evaluator.tasks}
    for a in alphas:
        res = evaluator(make_state(a), f"{kind} a={a:g}")
        for name, (loss, acc) in res.items():
            losses[name].append(loss)
            accs[name].append(acc)
        logger.debug("%s a=%g: %s", kind, a, res)
    curves = {n: Curve(task=n, alphas=list(alphas), loss=losses[n], accuracy=accs[n]) for n in losses}
    return PathResult(kind=kind, alphas=list(alphas), curves=curves, bn=evaluator.bn)


def linear_interpolation(
    model_a: nn.Module,
    model_b: ModelLike,
    tasks: EvalTask | Sequence[EvalTask] | DataLike,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    bn: BNMode = "interpolate",
    bn_data: Any = None,
    bn_batches: int = 20,
    bn_batch_size: int = 128,
    device: torch.device | str | None = None,
) -> PathResult:
    """Loss/accuracy along ``theta(a) = (1 - a) theta_A + a theta_B`` for every task.

    Args:
        model_a: endpoint A; also the template module (architecture) that is evaluated. Not modified.
        model_b: endpoint B, a module or state dict of the same architecture.
        tasks: :class:`EvalTask` (s), or bare data ``(x, y)`` / a loader for one classification task.
        alphas: grid of ``a`` (default ``linspace(0, 1, 11)``); include 0, 0.5 and 1 for barriers and gains.
        bn: ``"interpolate"`` (default) or ``"reset"`` BatchNorm statistics (module docstring).
        bn_data: shared training inputs for ``bn="reset"`` (else each task's ``bn_data``).
        bn_batches, bn_batch_size: size of the re-estimation pass.
        device: where to evaluate (default: ``model_a``'s device); CUDA is used only if asked for.

    Returns:
        :class:`PathResult` of kind ``"linear"``; ``result.curves[task].loss_barrier`` etc.
    """
    ev = _Evaluator(model_a, _as_tasks(tasks), bn, bn_data, bn_batches, bn_batch_size, _dev(device))
    sa, sb = ev.ref_state, ev.state(model_b, "model_b")
    grid = _grid(alphas, np.linspace(0.0, 1.0, 11))
    return _run_path(ev, grid, lambda a: interpolate_states(sa, sb, a), "linear")


def merge_gain(
    model_a: nn.Module, model_b: ModelLike, tasks: EvalTask | Sequence[EvalTask] | DataLike, **kwargs: Any
) -> dict[str, dict[str, float]]:
    """Per task ``{"accuracy_gain", "loss_gain"}`` of the midpoint merge, ``f(0.5) - (f(0) + f(1)) / 2``.

    Evaluates only ``a in {0, 0.5, 1}``; keyword arguments go to :func:`linear_interpolation`.
    """
    res = linear_interpolation(model_a, model_b, tasks, [0.0, 0.5, 1.0], **kwargs)
    return {n: {"accuracy_gain": c.accuracy_gain, "loss_gain": c.loss_gain} for n, c in res.curves.items()}


def task_arithmetic_path(
    base: nn.Module,
    experts: Sequence[ModelLike],
    tasks: EvalTask | Sequence[EvalTask] | DataLike,
    coefficients: Sequence[float] | np.ndarray | None = None,
    *,
    bn: BNMode = "interpolate",
    bn_data: Any = None,
    bn_batches: int = 20,
    bn_batch_size: int = 128,
    device: torch.device | str | None = None,
) -> PathResult:
    """Loss/accuracy along ``theta(a) = theta_0 + a * sum_i tau_i``, ``tau_i = theta_i - theta_0``, per task.

    ``a = 0`` is the base model exactly. Default grid ``linspace(0, 1, 11)``; with N experts, ``a = 1/N`` is
    the simple average. Arguments as in :func:`linear_interpolation` (``base`` is the template module).
    """
    if not experts:
        raise SpecError("task_arithmetic_path needs at least one expert")
    ev = _Evaluator(base, _as_tasks(tasks), bn, bn_data, bn_batches, bn_batch_size, _dev(device))
    s0 = ev.ref_state
    se = [ev.state(e, f"experts[{i}]") for i, e in enumerate(experts)]
    grid = _grid(coefficients, np.linspace(0.0, 1.0, 11))
    return _run_path(ev, grid, lambda a: task_arithmetic_state(s0, se, a), "task_arithmetic")


# --------------------------------------------------------------------------------------- 2-D plane
def _geometry_keys(template: nn.Module) -> list[str]:
    return [name for name, _ in template.named_parameters()]


@dataclass
class PlaneBasis:
    """Orthonormal (Gram-Schmidt) basis of the plane through ``theta_1, theta_2, theta_3``.

    ``norm_u = ||theta_2 - theta_1||``, ``proj = <theta_3 - theta_1, u_hat>``, ``norm_v = ||v||`` with
    ``v = theta_3 - theta_1 - proj * u_hat``. Norms and inner products are over ``keys`` (the trainable
    parameters by default), in float64.
    """

    norm_u: float
    norm_v: float
    proj: float
    keys: list[str]

    @property
    def coordinates(self) -> list[tuple[float, float]]:
        """Plane coordinates of the three models: ``(0, 0)``, ``(||u||, 0)``, ``(proj, ||v||)``."""
        return [(0.0, 0.0), (self.norm_u, 0.0), (self.proj, self.norm_v)]

    def weights(self, x: float, y: float) -> tuple[float, float, float]:
        """Affine weights ``(c_1, c_2, c_3)``, sum 1, with ``theta_1 + x u_hat + y v_hat = sum_k c_k theta_k``.

        ``c_3 = y / ||v||``, ``c_2 = (x - y * proj / ||v||) / ||u||``, ``c_1 = 1 - c_2 - c_3``. Non-parameter
        floating tensors (BatchNorm statistics) are combined with the same weights.
        """
        c3 = y / self.norm_v
        c2 = (x - c3 * self.proj) / self.norm_u
        return 1.0 - c2 - c3, c2, c3

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (without the key list)."""
        return {"norm_u": self.norm_u, "norm_v": self.norm_v, "proj": self.proj, "coordinates": self.coordinates}


def plane_basis(s1: State, s2: State, s3: State, keys: Sequence[str], tol: float | None = None) -> PlaneBasis:
    """Gram-Schmidt basis of the plane through three states (see :class:`PlaneBasis`).

    Raises :class:`SpecError` when two models coincide or the three are collinear: ``||u||`` or ``||v||``
    below ``tol`` times the larger of ``||u||``, ``||w||`` (default ``tol``: 1000 x the machine epsilon of
    the states' least precise dtype, i.e. ~1e-4 for float32 -- rounding alone leaves ``||v|| ~ 1e-8 ||u||``
    for a float32 midpoint).
    """
    if tol is None:
        tol = 1000.0 * max((torch.finfo(s1[k].dtype).eps for k in keys if s1[k].is_floating_point()), default=1e-16)
    uu = ww = uw = 0.0
    for k in keys:
        t1 = s1[k].double()
        u = s2[k].double() - t1
        w = s3[k].double() - t1
        uu += float((u * u).sum())
        ww += float((w * w).sum())
        uw += float((u * w).sum())
    norm_u = math.sqrt(uu)
    if norm_u <= tol * max(1.0, math.sqrt(ww)):
        raise SpecError("plane: theta_2 coincides with theta_1 (||theta_2 - theta_1|| = 0)")
    proj = uw / norm_u
    vv = 0.0  # second pass: ||w - proj u_hat||^2 computed explicitly (stable near collinearity)
    for k in keys:
        t1 = s1[k].double()
        v = (s3[k].double() - t1) - (proj / norm_u) * (s2[k].double() - t1)
        vv += float((v * v).sum())
    norm_v = math.sqrt(vv)
    if norm_v <= tol * max(norm_u, math.sqrt(ww)):
        raise SpecError("plane: the three models are collinear (theta_3 lies on the line through theta_1, theta_2)")
    return PlaneBasis(norm_u=norm_u, norm_v=norm_v, proj=proj, keys=list(keys))


@dataclass
class PlaneResult:
    """Loss/accuracy on a grid of plane coordinates.

    ``loss[task][j][i]`` / ``accuracy[task][j][i]`` is the value at ``(xs[i], ys[j])`` (rows = y, ready for
    ``contourf(xs, ys, Z)``); ``model_coordinates`` are the three models' ``(x, y)``.
    """

    xs: list[float]
    ys: list[float]
    loss: dict[str, list[list[float]]]
    accuracy: dict[str, list[list[float]]]
    model_coordinates: list[tuple[float, float]]
    model_names: list[str]
    basis: PlaneBasis
    bn: str

    def grid(self, task: str | None = None, metric: str = "loss") -> np.ndarray:
        """``[len(ys), len(xs)]`` array of ``metric`` for ``task`` (``None``: task mean)."""
        table = self.loss if metric == "loss" else self.accuracy
        if task is None:
            return np.mean([np.asarray(v, dtype=float) for v in table.values()], axis=0)
        return np.asarray(table[task], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (JSON-serialisable)."""
        return {
            "xs": list(self.xs),
            "ys": list(self.ys),
            "loss": self.loss,
            "accuracy": self.accuracy,
            "model_coordinates": [list(c) for c in self.model_coordinates],
            "model_names": list(self.model_names),
            "basis": self.basis.to_dict(),
            "bn": self.bn,
        }


def loss_plane(
    model_1: nn.Module,
    model_2: ModelLike,
    model_3: ModelLike,
    tasks: EvalTask | Sequence[EvalTask] | DataLike,
    xs: Sequence[float] | np.ndarray | None = None,
    ys: Sequence[float] | np.ndarray | None = None,
    *,
    resolution: int = 11,
    margin: float = 0.25,
    names: Sequence[str] = ("theta_1", "theta_2", "theta_3"),
    bn: BNMode = "interpolate",
    bn_data: Any = None,
    bn_batches: int = 20,
    bn_batch_size: int = 128,
    device: torch.device | str | None = None,
) -> PlaneResult:
    """Loss/accuracy on the 2-D plane through three models (Garipov et al. 2018), per task.

    The point ``(x, y)`` is ``theta_1 + x u_hat + y v_hat`` (module docstring), realised as the affine
    combination :meth:`PlaneBasis.weights` of the three states, so every floating tensor -- BatchNorm
    statistics included -- lies on the same plane; the geometry (norms, projections) uses the trainable
    parameters only. Default grid: ``resolution`` points per axis over the models' bounding box enlarged by
    ``margin`` times its extent on each side. Other arguments as in :func:`linear_interpolation`.
    Cost: ``len(xs) * len(ys)`` evaluations of every task.
    """
    ev = _Evaluator(model_1, _as_tasks(tasks), bn, bn_data, bn_batches, bn_batch_size, _dev(device))
    s1, s2, s3 = ev.ref_state, ev.state(model_2, "model_2"), ev.state(model_3, "model_3")
    basis = plane_basis(s1, s2, s3, _geometry_keys(model_1))
    coords = basis.coordinates
    if xs is None or ys is None:
        cx, cy = [c[0] for c in coords], [c[1] for c in coords]
        lo_x, hi_x, lo_y, hi_y = min(cx), max(cx), min(cy), max(cy)
        px, py = margin * (hi_x - lo_x), margin * (hi_y - lo_y)
        if xs is None:
            xs = np.linspace(lo_x - px, hi_x + px, resolution)
        if ys is None:
            ys = np.linspace(lo_y - py, hi_y + py, resolution)
    gx, gy = _grid(xs, np.zeros(0)), _grid(ys, np.zeros(0))
    loss = {t.name: [[math.nan] * len(gx) for _ in gy] for t in ev.tasks}
    acc = {t.name: [[math.nan] * len(gx) for _ in gy] for t in ev.tasks}
    for j, y in enumerate(gy):
        for i, x in enumerate(gx):
            state = combine_states([s1, s2, s3], basis.weights(x, y))
            for name, (lv, av) in ev(state, f"plane ({x:g}, {y:g})").items():
                loss[name][j][i] = lv
                acc[name][j][i] = av
    return PlaneResult(
        xs=gx, ys=gy, loss=loss, accuracy=acc, model_coordinates=coords, model_names=list(names), basis=basis, bn=bn
    )


def _dev(device: torch.device | str | None) -> torch.device | None:
    return torch.device(device) if device is not None else None


# ------------------------------------------------------------------------------------------ plots
def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    # deferred: matplotlib (a heavy load) only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Save atomically (:func:`~mergelab.atomic_files.open_atomic`) in the format the suffix names (PNG
    without one), as ``fig.savefig(path)`` would."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with open_atomic(path, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=120)


def plot_interpolation(
    result: PathResult,
    metric: str = "loss",
    tasks: Sequence[str] | None = None,
    ax: Axes | None = None,
    path: str | os.PathLike[str] | None = None,
    show_chord: bool = True,
) -> Figure:
    """Line plot of ``metric`` ("loss" or "accuracy") along a :class:`PathResult`, one line per task.

    For linear paths the endpoints' chord ``(1-a) f(0) + a f(1)`` is drawn dashed (the barrier is the largest
    gap). Uses the Agg canvas (no display needed, pyplot is not imported); saves to ``path`` if given.
    """
    if metric not in ("loss", "accuracy"):
        raise SpecError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    fig, ax = _new_axes(ax, (5.0, 3.5))
    names = list(tasks) if tasks is not None else list(result.curves)
    for name in names:
        c = result.curves[name]
        vals = c.loss if metric == "loss" else c.accuracy
        (line,) = ax.plot(c.alphas, vals, marker="o", ms=3, label=literal(name))
        if show_chord and result.kind == "linear":
            try:
                f0, f1 = vals[_grid_index(c.alphas, 0.0)], vals[_grid_index(c.alphas, 1.0)]
                ax.plot([0.0, 1.0], [f0, f1], ls="--", lw=0.8, color=line.get_color())
            except SpecError:
                pass
    ax.set_xlabel("a" if result.kind == "linear" else "task-arithmetic coefficient a")
    ax.set_ylabel(metric)
    ax.set_title(f"{'(1-a) A + a B' if result.kind == 'linear' else 'theta_0 + a sum tau'}  [BN: {result.bn}]")
    if len(names) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        _save_figure(fig, path)
    return fig


def plot_plane(
    result: PlaneResult,
    task: str | None = None,
    metric: str = "loss",
    ax: Axes | None = None,
    path: str | os.PathLike[str] | None = None,
    levels: int = 20,
) -> Figure:
    """Filled contour plot of ``metric`` on a :class:`PlaneResult` with the three models marked.

    ``task=None`` plots the task mean. Agg canvas; saves to ``path`` if given.
    """
    if metric not in ("loss", "accuracy"):
        raise SpecError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    fig, ax = _new_axes(ax, (5.0, 4.2))
    z = result.grid(task, metric)
    cs = ax.contourf(result.xs, result.ys, z, levels=levels, cmap="viridis" if metric == "loss" else "magma")
    fig.colorbar(cs, ax=ax, label=metric)
    for (x, y), name in zip(result.model_coordinates, result.model_names):
        ax.plot([x], [y], marker="o", color="white", mec="black")
        ax.annotate(literal(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small", color="white")
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (along theta_2 - theta_1)")
    ax.set_ylabel("y (orthogonal)")
    ax.set_title(literal(f"{metric} ({task or 'task mean'})  [BN: {result.bn}]"))
    fig.tight_layout()
    if path is not None:
        _save_figure(fig, path)
    return fig


__all__ = [
    "Curve",
    "EvalTask",
    "PathResult",
    "PlaneBasis",
    "PlaneResult",
    "barrier_height",
    "combine_states",
    "default_accuracy",
    "evaluate_module",
    "interpolate_states",
    "linear_interpolation",
    "loss_plane",
    "merge_gain",
    "midpoint_gain",
    "plane_basis",
    "plot_interpolation",
    "plot_plane",
    "task_arithmetic_path",
    "task_arithmetic_state",
]
