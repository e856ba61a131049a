"""FW-Merging (Chen, Hu, Luk, Hospedales & Fan, ICCV 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization"): merging as constrained optimisation over the convex hull of a pool of checkpoints.

The problem
-----------
``min_theta l(theta, D)`` over ``theta in conv{theta_1, ..., theta_n}`` (the experts' backbones, the
*vertices* ``s``). ``l`` is measured on a small data set D through each task's own expert head:

* ``objective: ce`` (default, the paper's): ``l = (1/T) sum_t (1/|D_t|) sum_{(x,y) in D_t} CE(h_t(f(x; theta)), y)``,
  mean over the T tasks of ``data.tasks`` of the mean cross-entropy on ``data.samples_per_task`` labelled
  examples (default 100, the paper's) of split ``data.split`` (default ``train``);
* ``objective: entropy``: the same with the Shannon entropy ``H(softmax(.))`` of the predictions instead of
  the cross-entropy, on unlabelled examples (default split ``test``, AdaMerging's test-time convention).

One iteration at ``theta_t`` with gradient ``g_t = grad l(theta_t)``:

1. **Linear minimisation oracle** over the pool: ``s_t = argmin_s <g_t, s>`` (equivalently
   ``argmin_s <g_t, s - theta_t>``). ``granularity: task`` picks one vertex for the whole model;
   ``granularity: layer`` is block-coordinate: every tensor (block) picks its own vertex,
   ``s_t[b] = argmin_i <g_t[b], theta_i[b]>`` — the LMO of the product of the per-tensor hulls.
2. **FW gap** ``G_t = <-g_t, s_t - theta_t>`` (layer-wise: summed over the blocks). It is >= 0 whenever
   ``theta_t`` lies in the hull and bounds the primal gap for convex l; the run stops as soon as
   ``0 <= G_t <= gap_tolerance``. A negative gap can only occur outside the hull (a pretrained or
   task-arithmetic start): it certifies nothing there — e.g. a task-arithmetic sum of 21 BatchNorm experts
   whose loss is in the thousands has a negative gap, yet the line search toward s_t cuts the loss by orders
   of magnitude — so the iteration goes on and the step search decides.
3. **Update.**

   * *Hard* (``fw_hard``): ``theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t`` with ``gamma_t`` from a line
     search of ``l`` on ``[0, step_size]`` (``step: line_search``: a 5-point grid, then golden-section
     refinement around the best grid point, ``line_search_steps`` evaluations; gamma = 0 is a grid point, so
     the objective never increases) or the classical schedule ``gamma_t = step_size * 2 / (t + 2)``
     (``step: schedule``, t = 0, 1, ...; with ``step_size = 1`` the first step moves fully onto ``s_0``).
   * *Soft* (``fw_soft``): the ``k`` vertices with the best scores ``s_1..s_k`` (per tensor when layer-wise),
     then ``lambda* = argmin_lambda l(theta_t + sum_j lambda_j (s_j - theta_t))`` over a simplex by projected
     gradient descent with the exact Euclidean projection of :mod:`mergelab.ops.simplex` (one lambda vector
     for the whole model, or one per tensor when layer-wise), and
     ``theta_{t+1} = theta_t + sum_j lambda*_j (s_j - theta_t)``. ``simplex: solid`` (default) takes lambda in
     ``{lambda >= 0, sum_j lambda_j <= 1}``, so ``theta_{t+1} = (1 - sum lambda) theta_t + sum lambda_j s_j`` is a
     convex combination of the current model and the selected vertices: ``lambda = 0`` (no move) and every
     hard FW step ``gamma e_j`` are feasible, the iteration never increases l and keeps FW's O(1/T) rate.
     ``simplex: probability`` takes ``sum lambda = 1`` exactly; ``theta_t`` then drops out
     (``theta_{t+1} = sum_j lambda_j s_j``). PGD: ``lambda <- Proj(lambda - pgd_lr * grad_lambda)`` with
     ``d l / d lambda_j = <grad l(theta(lambda)), s_j - theta_t>``; a step that does not decrease l is
     rejected and the step size halved, so l never increases; ``pgd_steps`` gradient evaluations at most.

The iterates stay in ``conv{theta_init, theta_1, ..., theta_n}``. Besides the gap test, a run stops when an
update leaves the model unchanged (gamma = 0, or lambda = 0 with the solid simplex: the search found no
decrease), since every further iteration would repeat it exactly (``stop_reason`` ``no_progress``).

Initial solution (``init``): ``pretrained`` (theta_0), ``task_arithmetic`` (``theta_0 + init_lambda sum_i
w_i tau_i``, streamed one expert at a time; negative BatchNorm ``running_var`` entries, which a sum of many
task vectors can produce, are set to 0) or ``adamerging`` (:mod:`mergelab.methods.data_informed.adamerging`
with its defaults; it holds all N task vectors while it runs, so that start is not constant-memory).

Scores (``score``): ``inner_product`` (the paper's, the LMO above) or ``cosine`` (the public code's
``hmarkc/FW-Merging`` / FusionBench ``fw_merging``: the sum over tensors of ``cos(g_t[b], s[b])``, per tensor
when layer-wise). The gap is always the inner-product FW gap; ``selected_gap`` in the trace is the gap of
the direction actually chosen (they differ only with ``score: cosine``).

Defaults and sources
--------------------
fw_hard: 3 iterations from ``task_arithmetic`` with ``init_lambda = 0.3`` (paper, vision: 3 iterations from a
TA or AdaMerging start; 0.3 is TA's usual coefficient and the public code's scaling factor), line search.
fw_soft: 15 iterations from ``pretrained`` (paper), ``k`` = number of tasks in ``data.tasks`` (the public
code merges one selected checkpoint per task per iteration), ``simplex: solid``, ``pgd_steps = 20`` and
``pgd_lr = 0.1`` (mergelab's choices — the paper gives no PGD settings: from lambda = 0 the first step moves
each coefficient by 0.1 x that vertex's linearised gain ``<-g_t, s_j - theta_t>``, and rejected steps halve).
Both: ``granularity: task`` (the paper states the algorithm per model; the public code's default),
``objective: ce`` with 100 samples per task (paper), ``score: inner_product`` and the gap test with
``gap_tolerance = 0`` (paper; the public code has neither the gap test nor the simplex projection — its soft
variant runs AdaMerging on the selected checkpoints with unconstrained coefficients).

BatchNorm and which tensors move
--------------------------------
l is differentiated with respect to the backbone's floating **parameters** (conv/linear weights, biases, BN
and LayerNorm affine parameters); the backbone runs in eval mode, so BatchNorm uses the merged running
statistics, exactly as the merged model is evaluated. **Buffers** (BN ``running_mean``/``running_var``) carry no
gradient: every vertex carries its own buffers and the merge combines them with the same convex coefficients
as the weights — task-wise with the single gamma / lambda; layer-wise a buffer follows the vertex choice and
coefficients of its own module's ``weight`` (else of the module's first parameter; buffers of parameter-free
modules form one group that follows the whole-model ranking and, in soft mode, keeps its initial
coefficients). Non-floating tensors are copied from the base.

Memory: constant in the pool size
---------------------------------
Checkpoints stay on disk. Each iteration the oracle streams through the pool with
:meth:`MergeContext.expert_state` (one expert read, scored and released at a time), keeping only the scores
(an n x blocks table of floats); then only the selected vertices are read again. Held at any time: the
current model ``theta_t``, its gradient (dropped once the scores are taken), one work copy (the line-search
or PGD candidate), the selected vertices (hard: 1; soft: k, stored as differences ``s_j - theta_t``;
layer-wise vertices are assembled tensor by tensor from the experts that were selected for some tensor) and
one streamed expert, plus the backbone module, the heads and the data: at most 4 backbone-sized sets of
tensors for hard and k + 3 for soft (the gradient of a PGD candidate included), whatever n is (AdaMerging
holds N + 2). ``bench/fw_memory.py`` measures it. The cost is time: each iteration reads the whole pool
once for the oracle.

Spec
----
```yaml
method: fw_soft                     # or fw_hard
base: ~/.cache/mergelab/zoo/resnet_s/pretrained
models: [experts/mnist/..., experts/digits/..., ...]     # the pool: expert folders
parameters: {granularity: layer, iterations: 15, k: 4}
data: {tasks: [mnist, digits], samples_per_task: 100}   # the objective's tasks (default: the experts' own)
```

Python API
----------
:func:`frank_wolfe` ``(context, params) -> (state, FWTrace)``; the zoo-independent core
:func:`run_frank_wolfe` ``(objective, pool, theta0, config, groups)`` works on plain tensors with any
:class:`Objective` (e.g. :class:`FunctionObjective`) and :class:`VertexPool` (e.g. :class:`TensorPool`);
:func:`linear_minimization_oracle`, :func:`tensor_groups`, :func:`line_search`. The trace (per iteration:
objective, gap, selected vertices, step or coefficients, objective after the update, evaluations, seconds) is
logged at INFO level and returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call

from mergelab.errors import NonFiniteError, SpecError, TensorMismatchError
from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod
from mergelab.methods.data_informed.context import MergeContext
from mergelab.ops.simplex import project_simplex, project_solid_simplex

log = logging.getLogger(__name__)

Point = dict[str, torch.Tensor]
Granularity = Literal["task", "layer"]
Score = Literal["inner_product", "cosine"]
StepRule = Literal["line_search", "schedule"]
SimplexKind = Literal["solid", "probability"]
ObjectiveKind = Literal["ce", "entropy"]
InitKind = Literal["pretrained", "task_arithmetic", "adamerging"]

#: the single group of task-wise FW (one vertex / coefficient vector for the whole model)
MODEL_GROUP = "<model>"
#: layer-wise: buffers of modules without parameters
UNASSIGNED_GROUP = "<buffers>"


# ------------------------------------------------------------------------------------------- objectives


class Objective(Protocol):
    """``l(theta)`` on points (``name -> tensor``). ``value_and_grad`` returns the gradient for the
    differentiable tensors only (a subset of the point's names); it must not modify or keep ``theta``."""

    def value(self, theta: Mapping[str, torch.Tensor]) -> float: ...

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]: ...


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"Frank-Wolfe: the objective is {value} at {what}")
    return value


class FunctionObjective:
    """``l(theta) = fn(theta)`` for a differentiable callable on points; gradient by autograd.

    ``differentiable`` names the tensors that get gradients (default: every floating tensor of the point).
    """

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                 differentiable: Collection[str] | None = None) -> None:
        self.fn = fn
        self.differentiable = None if differentiable is None else list(differentiable)

    def value(self, theta: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return _finite(float(self.fn(theta)), "a point")

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]:
        names = self.differentiable or [n for n, t in theta.items() if t.is_floating_point()]
        leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = self.fn({**theta, **leaves})
            grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
        return (_finite(float(out.detach()), "a point"),
                {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)})


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of ``softmax(logits)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class ModelObjective:
    """The FW-Merging objective on a backbone: mean over tasks of the mean per-example loss through each task's
    head (``kind``: ``ce`` cross-entropy with labels, ``entropy`` prediction entropy without).

    The backbone runs in eval mode through :func:`torch.func.functional_call` with the point's tensors
    (parameters and buffers); gradients are for its floating parameters. Examples are processed in chunks of
    ``batch_size`` (eval-mode BatchNorm makes the chunking exact).
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 data: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], kind: ObjectiveKind = "ce",
                 batch_size: int = 64) -> None:
        if kind not in ("ce", "entropy"):
            raise ValueError(f"objective must be 'ce' or 'entropy', got {kind!r}")
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
        self.heads = dict(heads)
        self.data = dict(data)
        self.kind = kind
        self.batch_size = int(batch_size)

    def _chunks(self):
        tasks = len(self.data)
        for task, (x, y) in self.data.items():
            n = len(x)
            for start in range(0, n, self.batch_size):
                yb = None if y is None else y[start : start + self.batch_size]
                yield task, x[start : start + self.batch_size], yb, 1.0 / (n * tasks)

    def _loss(self, state: Mapping[str, torch.Tensor], task: str, x: torch.Tensor,
              y: torch.Tensor | None) -> torch.Tensor:
        features = functional_call(self.backbone, dict(state), (x,))
        head = self.heads[task]
        logits = F.linear(features, head.weight.to(features.dtype), head.bias.to(features.dtype))
        if self.kind == "ce":
            return F.cross_entropy(logits, y, reduction="sum")
        return softmax_entropy(logits).sum()

    def value(self, theta: Mapping[str, torch.Tensor]) -> float:
        total = 0.0
        with torch.no_grad():
            for task, x, y, w in self._chunks():
                total += float(self._loss(theta, task, x, y)) * w
        return _finite(total, "the merged model")

    def value_and_grad(self, theta: Mapping[str, torch.Tensor]) -> tuple[float, Point]:
        leaves = {n: theta[n].detach().requires_grad_(True) for n in self.parameter_names}
        state = {**theta, **leaves}
        grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
        total = 0.0
        with torch.enable_grad():
            for task, x, y, w in self._chunks():
                loss = self._loss(state, task, x, y) * w
                for acc, g in zip(grads.values(), torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
                total += float(loss.detach())
        return _finite(total, "the merged model"), grads


# ------------------------------------------------------------------------------------------ vertex pools


class VertexPool(Protocol):
    """The checkpoints (vertices). ``load(i)`` returns vertex i's tensors as fresh tensors the caller owns
    (and may modify in place), on the working device; nothing is cached."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Point: ...

    def label(self, index: int) -> str: ...


class TensorPool:
    """An in-memory pool (tests, small problems): ``load`` returns copies of the given vertices."""

    def __init__(self, vertices: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str] | None = None) -> None:
        if not vertices:
            raise ValueError("the pool is empty")
        self.vertices = [dict(v) for v in vertices]
        self.labels = list(labels) if labels is not None else [f"v{i}" for i in range(len(vertices))]
        self.loads = 0

    def __len__(self) -> int:
        return len(self.vertices)

    def load(self, index: int) -> Point:
        self.loads += 1
        return {k: v.detach().clone() for k, v in self.vertices[index].items()}

    def label(self, index: int) -> str:
        return self.labels[index]


class ContextPool:
    """The experts of a :class:`MergeContext`, read from disk on every ``load`` (one at a time).

    Checks each expert against ``reference`` (names, shapes; finiteness on its first read) and returns its
    floating tensors in float32 on the context's device.
    """

    def __init__(self, context: MergeContext, reference: Mapping[str, torch.Tensor]) -> None:
        self.context = context
        self.shapes = {n: tuple(t.shape) for n, t in reference.items()}
        self.floating = [n for n, t in reference.items() if t.is_floating_point()]
        self._checked: set[int] = set()
        tasks = [e.task for e in context.experts]
        self.labels = [t if tasks.count(t) == 1 else f"{t}#{i}" for i, t in enumerate(tasks)]

    def __len__(self) -> int:
        return len(self.context.experts)

    def label(self, index: int) -> str:
        return self.labels[index]

    def load(self, index: int) -> Point:
        state = self.context.expert_state(index)
        source = str(self.context.experts[index].backbone_path)
        missing = sorted(set(self.shapes) - set(state))
        extra = sorted(set(state) - set(self.shapes))
        if missing or extra:
            parts = ([f"missing {len(missing)} tensor(s), e.g. {missing[:3]}"] if missing else []) + (
                [f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}"] if extra else [])
            raise TensorMismatchError(
                f"{source}: does not match the base {self.context.base_path}: " + "; ".join(parts))
        out: Point = {}
        device = self.context.device
        for name in self.floating:
            t = state.pop(name)
            if tuple(t.shape) != self.shapes[name]:
                raise TensorMismatchError(
                    f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the base has {self.shapes[name]}")
            if not t.is_floating_point():
                raise TensorMismatchError(f"{source}: tensor '{name}' is {t.dtype}, the base's is floating")
            t = t.to(device=device, dtype=torch.float32)
            if index not in self._checked and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{source}: tensor '{name}' holds NaN or Inf values")
            out[name] = t
        self._checked.add(index)
        del state
        return out


# ---------------------------------------------------------------------------------------------- groups


def tensor_groups(names: Sequence[str], granularity: Granularity,
                  parameter_names: Collection[str] | None = None) -> dict[str, list[str]]:
    """Blocks of the oracle: ``group -> tensor names`` (a partition of ``names``).

    ``task``: one group holding everything. ``layer``: one group per differentiable tensor
    (``parameter_names``; default: all of ``names``); every other tensor (a buffer) joins the group of its own
    module's ``weight`` (or of the module's first parameter); buffers of parameter-free modules form the
    group :data:`UNASSIGNED_GROUP`.
    """
    if granularity == "task":
        return {MODEL_GROUP: list(names)}
    if granularity != "layer":
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    params = [n for n in names if parameter_names is None or n in parameter_names]
    groups: dict[str, list[str]] = {n: [n] for n in params}
    by_module: dict[str, list[str]] = {}
    for p in params:
        by_module.setdefault(p.rsplit(".", 1)[0] if "." in p else "", []).append(p)
    leftover = []
    for n in names:
        if n in groups:
            continue
        module = n.rsplit(".", 1)[0] if "." in n else ""
        siblings = sorted(by_module.get(module, []), key=lambda p: p != f"{module}.weight" and p != "weight")
        if siblings:
            groups[siblings[0]].append(n)
        else:
            leftover.append(n)
    if leftover:
        groups[UNASSIGNED_GROUP] = leftover
    return groups


# --------------------------------------------------------------------------------------------------- LMO


@dataclass
class LMOResult:
    """What the oracle keeps of one pass over the pool: a table of scores, and the selection.

    ``inner[i, G] = <grad_G, s_i,G - theta_G>`` over the differentiable tensors of group G (float64);
    ``cosine[i, G] = sum_{b in G} cos(grad_b, s_i,b)`` (only with ``score == "cosine"``, else ``None``);
    ``selection[G]`` the vertex indices of group G, best score first (k of them).
    """

    groups: list[str]
    inner: torch.Tensor
    cosine: torch.Tensor | None
    selection: torch.Tensor
    score: Score

    @property
    def gap(self) -> float:
        """The FW gap ``max_s <-grad, s - theta>`` (over the product of the groups' hulls: sum of group maxima)."""
        return float((-self.inner).amax(0).sum())

    @property
    def selected_gap(self) -> float:
        """``<-grad, s_sel - theta>`` for the top-1 selection (equals :attr:`gap` with inner-product scores)."""
        cols = torch.arange(len(self.groups))
        return float((-self.inner[self.selection[:, 0], cols]).sum())

    def selected(self) -> dict[str, list[int]]:
        return {g: self.selection[i].tolist() for i, g in enumerate(self.groups)}


def linear_minimization_oracle(grad: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor], pool: VertexPool,
                               groups: Mapping[str, Sequence[str]], *, score: Score = "inner_product",
                               k: int = 1) -> LMOResult:
    """Stream once through ``pool`` and select, per group, the ``k`` vertices with the lowest scores.

    ``inner_product``: ``<grad_G, s_G - theta_G>`` (the FW LMO: argmin of the linearised objective);
    ``cosine``: ``sum_{b in G} cos(grad_b, s_b)``. One vertex is loaded at a time and released before the next.
    Groups without a differentiable tensor follow the ranking of the summed scores of all groups.
    """
    n = len(pool)
    if n == 0:
        raise ValueError("the pool is empty")
    if score not in ("inner_product", "cosine"):
        raise ValueError(f"score must be 'inner_product' or 'cosine', got {score!r}")
    k = max(1, min(int(k), n))
    names = list(groups)
    inner = torch.zeros(n, len(names), dtype=torch.float64)
    cosine = torch.zeros(n, len(names), dtype=torch.float64) if score == "cosine" else None
    gnorm = {b: float(g.norm()) for b, g in grad.items()}
    has_grad = [any(b in grad for b in groups[g]) for g in names]
    for i in range(n):
        s = pool.load(i)
        for j, group in enumerate(names):
            for b in groups[group]:
                g = grad.get(b)
                if g is None:
                    continue
                sb = s[b]
                inner[i, j] += float(torch.dot(g.reshape(-1), (sb - theta[b]).reshape(-1)))
                if cosine is not None:
                    denom = gnorm[b] * float(sb.norm())
                    if denom > 0:
                        cosine[i, j] += float(torch.dot(g.reshape(-1), sb.reshape(-1))) / denom
        del s
    table = inner if cosine is None else cosine
    overall = torch.sort(table.sum(1), stable=True).indices[:k]
    selection = torch.stack([torch.sort(table[:, j], stable=True).indices[:k] if has_grad[j] else overall
                             for j in range(len(names))])
    return LMOResult(names, inner, cosine, selection, score)


def gather_vertices(pool: VertexPool, selection: torch.Tensor, groups: Mapping[str, Sequence[str]],
                    theta: Mapping[str, torch.Tensor], *, subtract: bool) -> list[Point]:
    """Assemble the ``m = selection.shape[1]`` selected (composite) vertices, streaming each needed expert once.

    Slot j holds, for every group G, the tensors of vertex ``selection[G, j]`` (minus ``theta`` if
    ``subtract``: the directions ``s_j - theta``). Memory: the m assembled points plus one loaded expert.
    """
    names = list(groups)
    slots: list[Point] = [{} for _ in range(selection.shape[1])]
    for i in sorted(set(selection.flatten().tolist())):
        s = pool.load(i)
        for j, group in enumerate(names):
            for slot in (selection[j] == i).nonzero().flatten().tolist():
                for b in groups[group]:
                    t = s.pop(b)
                    slots[slot][b] = t.sub_(theta[b]) if subtract else t
        del s
    return slots


# ------------------------------------------------------------------------------------------ step sizes


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def line_search(phi: Callable[[float], float], f0: float, upper: float = 1.0, *, grid: int = 5,
                steps: int = 6) -> tuple[float, float, int]:
    """Minimise ``phi`` on ``[0, upper]``: a ``grid``-point grid (``phi(0) = f0`` is given), then ``steps``
    golden-section evaluations in the bracket around the best grid point. Returns ``(gamma, phi(gamma),
    evaluations)``; the best point seen, so ``phi(gamma) <= f0``."""
    pts = [upper * i / (grid - 1) for i in range(grid)]
    vals = [f0] + [phi(g) for g in pts[1:]]
    evals = grid - 1
    b = min(range(grid), key=lambda i: (vals[i], i))
    best = (pts[b], vals[b])
    lo, hi = pts[max(b - 1, 0)], pts[min(b + 1, grid - 1)]
    if steps <= 0:
        return best[0], best[1], evals
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc = phi(c)
    evals += 1
    fd = phi(d) if steps > 1 else math.inf
    evals += steps > 1
    for gamma, value in ((c, fc), (d, fd)):
        if value < best[1]:
            best = (gamma, value)
    for _ in range(steps - 2):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = phi(c)
            gamma, value = c, fc
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = phi(d)
            gamma, value = d, fd
        evals += 1
        if value < best[1]:
            best = (gamma, value)
    return best[0], best[1], evals


def schedule_step(t: int, step_size: float = 1.0) -> float:
    """The classical FW step ``gamma_t = step_size * 2 / (t + 2)`` (t = 0, 1, ...)."""
    return step_size * 2.0 / (t + 2.0)


# --------------------------------------------------------------------------------------------- the core


@dataclass
class FWConfig:
    """Settings of :func:`run_frank_wolfe` (see the module docstring for each)."""

    variant: Literal["hard", "soft"] = "hard"
    iterations: int = 3
    step: StepRule = "line_search"
    step_size: float = 1.0
    line_search_steps: int = 6
    k: int = 1
    pgd_steps: int = 20
    pgd_lr: float = 0.1
    simplex: SimplexKind = "solid"
    score: Score = "inner_product"
    gap_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in ("hard", "soft"):
            raise ValueError(f"variant must be 'hard' or 'soft', got {self.variant!r}")
        if self.step not in ("line_search", "schedule"):
            raise ValueError(f"step must be 'line_search' or 'schedule', got {self.step!r}")
        if self.simplex not in ("solid", "probability"):
            raise ValueError(f"simplex must be 'solid' or 'probability', got {self.simplex!r}")
        if not 0.0 < self.step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        if self.iterations < 0 or self.k < 1 or self.pgd_steps < 0 or not self.pgd_lr > 0:
            raise ValueError("iterations >= 0, k >= 1, pgd_steps >= 0 and pgd_lr > 0 are required")


@dataclass
class FWIteration:
    """One iteration: at ``theta_t`` the objective, the FW gap, the selection (per group, best first) and
    the update (hard: ``step`` gamma; soft: ``coefficients`` lambda per group, aligned with ``selected``)."""

    t: int
    objective: float
    gap: float
    selected_gap: float
    selected: dict[str, list[int]]
    step: float | None = None
    coefficients: dict[str, list[float]] | None = None
    objective_after: float | None = None
    evaluations: int = 0
    seconds: float = 0.0
    stopped: bool = False


@dataclass
class FWTrace:
    """The record of a run: settings, the vertices' labels, one :class:`FWIteration` per iteration."""

    variant: str
    granularity: str
    score: str
    vertices: list[str]
    groups: list[str]
    iterations: list[FWIteration] = field(default_factory=list)
    final_objective: float | None = None
    stop_reason: str = "iterations"

    @property
    def initial_objective(self) -> float | None:
        return self.iterations[0].objective if self.iterations else self.final_objective

    @property
    def gaps(self) -> list[float]:
        return [it.gap for it in self.iterations]

    def selection_counts(self, t: int, top: int = 1) -> dict[str, int]:
        """How many groups chose each vertex among their ``top`` best at iteration ``t`` (label -> count)."""
        counts: dict[str, int] = {}
        for sel in self.iterations[t].selected.values():
            for i in sel[:top]:
                counts[self.vertices[i]] = counts.get(self.vertices[i], 0) + 1
        return counts

    def selected_vertices(self, top: int | None = None) -> set[str]:
        """Labels of every vertex selected in some iteration (its ``top`` best per group; all if ``None``)."""
        return {self.vertices[i] for it in self.iterations if not it.stopped
                for sel in it.selected.values() for i in sel[:top]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "granularity": self.granularity, "score": self.score,
            "vertices": list(self.vertices), "initial_objective": self.initial_objective,
            "final_objective": self.final_objective, "stop_reason": self.stop_reason,
            "iterations": [asdict(it) for it in self.iterations],
        }


def _check_groups(groups: Mapping[str, Sequence[str]], theta: Mapping[str, torch.Tensor]) -> None:
    seen = [b for g in groups.values() for b in g]
    floating = {n for n, t in theta.items() if t.is_floating_point()}
    if len(seen) != len(set(seen)):
        raise ValueError("groups overlap: a tensor belongs to two groups")
    if set(seen) != floating:
        raise ValueError("groups must partition the floating tensors of theta; these differ: "
                         f"{sorted(set(seen) ^ floating)[:5]}")


def _combine(theta: Mapping[str, torch.Tensor], directions: Sequence[Point], lam: torch.Tensor,
             groups: Mapping[str, Sequence[str]], out: Point) -> Point:
    """``out[b] = theta[b] + sum_j lam[G(b), j] * directions[j][b]``."""
    for gi, group in enumerate(groups):
        row = lam[gi].tolist()
        for b in groups[group]:
            buf = out[b]
            buf.copy_(theta[b])
            for j, d in enumerate(directions):
                if row[j] != 0.0:
                    buf.add_(d[b], alpha=row[j])
    return out


def _coefficient_gradient(grad: Mapping[str, torch.Tensor], directions: Sequence[Point],
                          groups: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """``d l / d lam[G, j] = sum_{b in G} <grad_b, directions[j][b]>``."""
    out = torch.zeros(len(groups), len(directions), dtype=torch.float64)
    for gi, group in enumerate(groups):
        for b in groups[group]:
            g = grad.get(b)
            if g is None:
                continue
            flat = g.reshape(-1)
            for j, d in enumerate(directions):
                out[gi, j] += float(torch.dot(flat, d[b].reshape(-1)))
    return out


def simplex_coefficients(objective: Objective, theta: Mapping[str, torch.Tensor], directions: Sequence[Point],
                         groups: Mapping[str, Sequence[str]], *, steps: int, lr: float, simplex: SimplexKind,
                         start: tuple[torch.Tensor, float, torch.Tensor] | None = None, min_change: float = 1e-4
                         ) -> tuple[torch.Tensor, float, int]:
    """``argmin_lam l(theta + sum_j lam[G, j] directions[j])`` with every row of ``lam`` in the simplex, by
    projected gradient descent (rejected non-decreasing steps halve the step size; it ends early when a step
    would change no coefficient by ``min_change`` or more). ``start`` = (lam0, l(lam0), gradient w.r.t. lam at
    lam0) when known; default: lam0 = 0 (solid) or uniform (probability), evaluated.
    Returns ``(lam, l(lam), objective evaluations)``."""
    project = project_solid_simplex if simplex == "solid" else project_simplex
    work = {b: torch.empty_like(theta[b]) for group in groups for b in groups[group]}
    evals = 0

    def evaluate(lam: torch.Tensor) -> tuple[float, torch.Tensor]:
        nonlocal evals
        evals += 1
        value, grad = objective.value_and_grad({**theta, **_combine(theta, directions, lam, groups, work)})
        return value, _coefficient_gradient(grad, directions, groups)

    if start is None:
        m = len(directions)
        lam = torch.zeros(len(groups), m, dtype=torch.float64) if simplex == "solid" else \
            torch.full((len(groups), m), 1.0 / m, dtype=torch.float64)
        value, glam = evaluate(lam)
    else:
        lam, value, glam = start
    step = lr
    for _ in range(steps):
        cand = project(lam - step * glam)
        if float((cand - lam).abs().max()) < min_change:  # a fixed point, or steps too small to matter
            break
        v, g = evaluate(cand)
        if v < value:
            lam, value, glam = cand, v, g
        else:
            step *= 0.5
    return lam, value, evals


def run_frank_wolfe(objective: Objective, pool: VertexPool, theta0: Mapping[str, torch.Tensor], config: FWConfig,
                    groups: Mapping[str, Sequence[str]] | None = None, *, progress: bool = False,
                    granularity: str | None = None) -> tuple[Point, FWTrace]:
    """Frank-Wolfe over ``conv(pool)`` from ``theta0`` (see the module docstring); ``(theta, trace)``.

    ``groups`` partitions the floating tensors of ``theta0`` into oracle blocks (default: one group, i.e.
    task-wise; see :func:`tensor_groups`). ``theta0`` is not modified; non-floating tensors are carried over.
    """
    from tqdm import tqdm

    theta: Point = {n: t.detach().clone() for n, t in theta0.items()}
    floating = [n for n, t in theta.items() if t.is_floating_point()]
    if groups is None:
        groups = {MODEL_GROUP: floating}
    _check_groups(groups, theta)
    labels = [pool.label(i) for i in range(len(pool))]
    gran = granularity or ("task" if len(groups) == 1 else "layer")
    trace = FWTrace(config.variant, gran, config.score, labels, list(groups))
    k = 1 if config.variant == "hard" else min(config.k, len(pool))
    bar = tqdm(range(config.iterations), desc=f"fw_{config.variant} ({gran})", unit="it", disable=not progress)
    last_value: float | None = None
    for t in bar:
        started = time.perf_counter()
        value, grad = objective.value_and_grad(theta)
        lmo = linear_minimization_oracle(grad, theta, pool, groups, score=config.score, k=k)
        it = FWIteration(t, value, lmo.gap, lmo.selected_gap, lmo.selected(), evaluations=1)
        if 0.0 <= it.gap <= config.gap_tolerance:
            it.stopped = True
            it.seconds = time.perf_counter() - started
            trace.iterations.append(it)
            trace.stop_reason = "gap"
            last_value = value
            log.info("fw_%s iteration %d: objective %.6g, FW gap %.3g <= tolerance %.3g: stop",
                     config.variant, t, value, it.gap, config.gap_tolerance)
            break
        del grad
        if config.variant == "hard":
            (s,) = gather_vertices(pool, lmo.selection, groups, theta, subtract=False)
            if config.step == "schedule":
                gamma, after = schedule_step(t, config.step_size), None
            else:
                work = {b: torch.empty_like(theta[b]) for b in floating}

                def phi(g: float) -> float:
                    for b in floating:
                        torch.lerp(theta[b], s[b], g, out=work[b])
                    return objective.value({**theta, **work})

                gamma, after, evals = line_search(phi, value, config.step_size, steps=config.line_search_steps)
                it.evaluations += evals
                del work
            for b in floating:
                theta[b].lerp_(s[b], gamma)
            del s
            it.step, it.objective_after = gamma, after
            moved = gamma > 0
        else:
            directions = gather_vertices(pool, lmo.selection, groups, theta, subtract=True)
            start = None
            if config.simplex == "solid":  # lam = 0 is theta_t itself: value and gradient are already known
                cols = lmo.selection
                glam0 = torch.stack([lmo.inner[cols[j], j] for j in range(len(groups))])
                start = (torch.zeros_like(glam0), value, glam0)
            lam, after, evals = simplex_coefficients(objective, theta, directions, groups, steps=config.pgd_steps,
                                                     lr=config.pgd_lr, simplex=config.simplex, start=start)
            it.evaluations += evals
            for gi, group in enumerate(groups):  # theta_{t+1} = theta_t + sum_j lam_j (s_j - theta_t), in place
                for j, coef in enumerate(lam[gi].tolist()):
                    if coef != 0.0:
                        for b in groups[group]:
                            theta[b].add_(directions[j][b], alpha=coef)
            del directions
            it.coefficients = {g: [round(v, 6) for v in lam[i].tolist()] for i, g in enumerate(groups)}
            it.objective_after = after
            moved = config.simplex == "probability" or bool((lam != 0).any())
        it.seconds = time.perf_counter() - started
        trace.iterations.append(it)
        last_value = it.objective_after
        _log_iteration(trace, it)
        bar.set_postfix(objective=f"{value:.4f}", gap=f"{it.gap:.3g}")
        if not moved:  # theta unchanged: every further iteration would repeat this one exactly
            trace.stop_reason = "no_progress"
            log.info("fw_%s: the update left the model unchanged (no decrease found): stop", config.variant)
            break
    trace.final_objective = last_value if last_value is not None else objective.value(theta)
    return theta, trace


def _log_iteration(trace: FWTrace, it: FWIteration) -> None:
    if trace.granularity == "task":
        sel = ", ".join(trace.vertices[i] for i in it.selected[next(iter(it.selected))])
    else:
        counts = trace.selection_counts(it.t)
        sel = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    update = f"gamma {it.step:.4g}" if it.step is not None else (
        f"lambda {it.coefficients[MODEL_GROUP]}" if it.coefficients and MODEL_GROUP in it.coefficients else
        "lambda per tensor")
    after = f" -> {it.objective_after:.6g}" if it.objective_after is not None else ""
    log.info("fw_%s iteration %d: objective %.6g%s, FW gap %.4g, selected %s, %s (%d evaluations, %.2f s)",
             trace.variant, it.t, it.objective, after, it.gap, sel, update, it.evaluations, it.seconds)


# ------------------------------------------------------------------------------------------- parameters


class _FWParams(MethodParams):
    granularity: Granularity = Field("task", description="task: one vertex for the whole model; layer: per tensor")
    init_lambda: float = Field(0.3, description="task-arithmetic coefficient of init: task_arithmetic")
    objective: ObjectiveKind = Field("ce", description="ce: labelled cross-entropy; entropy: unlabelled entropy")
    score: Score = Field("inner_product", description="oracle score: inner_product (paper) or cosine (public code)")
    gap_tolerance: float = Field(0.0, description="stop when the FW gap is <= this")

    @field_validator("init_lambda", "gap_tolerance")
    @classmethod
    def _finite_value(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


class FWHardParams(_FWParams):
    """Parameters of ``fw_hard`` (module docstring: defaults and sources)."""

    iterations: int = Field(3, ge=0, description="Frank-Wolfe iterations (paper, vision: 3)")
    init: InitKind = Field("task_arithmetic", description="initial solution")
    step: StepRule = Field("line_search", description="line_search on [0, step_size] or schedule step_size*2/(t+2)")
    step_size: float = Field(1.0, description="scale of the schedule / upper end of the line search, in (0, 1]")
    line_search_steps: int = Field(6, ge=0, description="golden-section evaluations after the 5-point grid")

    @field_validator("step_size")
    @classmethod
    def _step_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {v}")
        return v


class FWSoftParams(_FWParams):
    """Parameters of ``fw_soft`` (module docstring: defaults and sources)."""

    iterations: int = Field(15, ge=0, description="Frank-Wolfe iterations (paper: 15)")
    init: InitKind = Field("pretrained", description="initial solution")
    k: int | None = Field(None, ge=1, description="vertices merged per iteration (default: the number of tasks)")
    pgd_steps: int = Field(20, ge=0, description="projected-gradient evaluations for the coefficients")
    pgd_lr: float = Field(0.1, description="initial projected-gradient step size")
    simplex: SimplexKind = Field("solid", description="solid: sum lambda <= 1 (theta_t kept); probability: = 1")

    @field_validator("pgd_lr")
    @classmethod
    def _lr_positive(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"pgd_lr must be finite and > 0, got {v}")
        return v


# --------------------------------------------------------------------------------------- zoo entry point


def _initial_state(context: MergeContext, params: _FWParams, base: Mapping[str, torch.Tensor],
                   pool: ContextPool) -> Point:
    device = context.device
    floating = [n for n, t in base.items() if t.is_floating_point()]
    if params.init == "pretrained":
        return {n: base[n].to(device=device, dtype=torch.float32).clone() for n in floating}
    if params.init == "task_arithmetic":
        theta0 = {n: base[n].to(device=device, dtype=torch.float32) for n in floating}
        acc = {n: torch.zeros_like(t) for n, t in theta0.items()}
        for i, expert in enumerate(context.experts):
            s = pool.load(i)
            for n in floating:
                acc[n].add_(s.pop(n).sub_(theta0[n]), alpha=float(expert.weight))
            del s
        theta = {n: acc[n].mul_(params.init_lambda).add_(theta0[n]) for n in floating}
        _clamp_variances(theta, "the task-arithmetic start")
        return theta
    try:
        from mergelab.methods.data_informed.adamerging import adamerging
    except ModuleNotFoundError as exc:
        if exc.name != "mergelab.methods.data_informed.adamerging":
            raise
        raise SpecError("parameters: init 'adamerging' needs mergelab.methods.data_informed.adamerging, which is "
                        "not available in this installation; use init: task_arithmetic or pretrained") from None
    log.info("FW-Merging: initial solution by AdaMerging (holds all %d task vectors while it runs)",
             len(context.experts))
    state, _ = adamerging(context)
    return {n: state[n].to(device=device, dtype=torch.float32) for n in floating}


def _clamp_variances(theta: Point, what: str) -> None:
    """BatchNorm ``running_var`` must stay >= 0; a sum of task vectors (coefficients summing above 1) can push
    it below, which makes the model output NaN. Negative entries are set to 0 (logged)."""
    clamped = 0
    for name, t in theta.items():
        if name.endswith("running_var"):
            neg = int((t < 0).sum())
            if neg:
                t.clamp_(min=0.0)
                clamped += neg
    if clamped:
        log.warning("FW-Merging: %d negative BatchNorm running_var entries in %s were set to 0", clamped, what)


def frank_wolfe(context: MergeContext, params: FWHardParams | FWSoftParams | None = None
                ) -> tuple[dict[str, torch.Tensor], FWTrace]:
    """Run FW-Merging on ``context``'s pool (``FWHardParams``: fw_hard, ``FWSoftParams``: fw_soft; default hard).

    Returns the merged backbone state (the base's names; floating tensors float32, on the CPU) and the trace.
    """
    from mergelab.models import load_backbone_state

    params = params or FWHardParams()
    if not isinstance(params, (FWHardParams, FWSoftParams)):
        raise TypeError("params must be FWHardParams or FWSoftParams")
    variant = "hard" if isinstance(params, FWHardParams) else "soft"
    backbone = context.build_backbone().eval()
    base = context.base_state()
    load_backbone_state(backbone, base, source=str(context.base_path))  # names/shapes against the architecture
    fixed = {n: t for n, t in base.items() if not t.is_floating_point()}
    pool = ContextPool(context, base)
    theta0 = _initial_state(context, params, base, pool)
    del base
    split = context.split("train" if params.objective == "ce" else "test")
    data = {}
    for task in context.tasks:
        x, y = context.samples(task, split)
        data[task] = (x.float(), y if params.objective == "ce" else None)
    heads = {t: context.head(t) for t in context.tasks}
    objective = ModelObjective(backbone, heads, data, params.objective, context.data.batch_size)
    groups = tensor_groups(list(theta0), params.granularity, set(objective.parameter_names))
    if variant == "hard":
        config = FWConfig("hard", params.iterations, params.step, params.step_size, params.line_search_steps,
                          score=params.score, gap_tolerance=params.gap_tolerance)
    else:
        config = FWConfig("soft", params.iterations, k=params.k or len(context.tasks), pgd_steps=params.pgd_steps,
                          pgd_lr=params.pgd_lr, simplex=params.simplex, score=params.score,
                          gap_tolerance=params.gap_tolerance)
    log.info("FW-Merging (%s, %s-wise, %s) over %d experts from %s on %d %s examples of %s", variant,
             params.granularity, params.objective, len(pool), params.init, sum(len(x) for x, _ in data.values()),
             split, ", ".join(context.tasks))
    theta, trace = run_frank_wolfe(objective, pool, theta0, config, groups, progress=context.progress,
                                   granularity=params.granularity)
    del theta0
    state = {n: theta[n].detach().to("cpu").contiguous() for n in theta} | fixed
    log.info("FW-Merging: objective %.6g -> %.6g in %d iteration(s) (%s)", trace.initial_objective,
             trace.final_objective, len(trace.iterations), trace.stop_reason)
    return state, trace


def _record(context: MergeContext, trace: FWTrace) -> None:
    """Put the trace into the merge record when the framework offers ``context.outputs`` (else it is logged)."""
    outputs = getattr(context, "outputs", None)
    if isinstance(outputs, dict):
        outputs["frank_wolfe"] = trace.to_dict()


def _run(context: MergeContext, params: FWHardParams | FWSoftParams) -> dict[str, torch.Tensor]:
    state, trace = frank_wolfe(context, params)
    _record(context, trace)
    return state


METHODS = [
    DataInformedMethod(
        name="fw_hard",
        summary="FW-Merging (hard): Frank-Wolfe over the hull of the pool, one vertex per iteration by the "
                "gradient oracle, line-search or 2/(t+2) step; memory constant in the pool size",
        params=FWHardParams,
        run=_run,
    ),
    DataInformedMethod(
        name="fw_soft",
        summary="FW-Merging (soft): top-k vertices per iteration, coefficients on the simplex by projected "
                "gradient descent; memory constant in the pool size",
        params=FWSoftParams,
        run=_run,
    ),
]

__all__ = ["ContextPool", "FWConfig", "FWHardParams", "FWIteration", "FWSoftParams", "FWTrace", "FunctionObjective",
           "LMOResult", "METHODS", "ModelObjective", "Objective", "TensorPool", "VertexPool", "frank_wolfe",
           "gather_vertices", "line_search", "linear_minimization_oracle", "run_frank_wolfe", "schedule_step",
           "simplex_coefficients", "softmax_entropy", "tensor_groups"]
