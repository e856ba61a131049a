"""FW-Merging (Chen, Hu, Luk, Hospedales & Fan, ICCV 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization"): merging as constrained optimisation over the convex hull of a pool of checkpoints.

The problem
-----------
``min_theta l(theta, D)`` over ``theta in conv{theta_1, ..., theta_n}`` (the experts' backbones, the
*vertices* ``s``). ``l`` is measured on a small data set D through each task's own expert head, as the mean
of per-task losses ``l = (1/T) sum_t l_t`` over the T tasks of ``data.tasks``:

* ``objective: ce`` (default, the paper's): ``l_t = (1/|D_t|) sum_{(x,y) in D_t} CE(h_t(f(x; theta)), y)``,
  the mean cross-entropy on ``data.samples_per_task`` labelled examples (default 100, the paper's) of split
  ``data.split`` (default ``train``);
* ``objective: entropy``: the same with the Shannon entropy ``H(softmax(.))`` of the predictions instead of
  the cross-entropy, on unlabelled examples (default split ``test``, AdaMerging's test-time convention).

One iteration at ``theta_t`` with gradient ``g = grad l(theta_t)`` (and, per task, ``g_t = grad l_t(theta_t)``,
so ``g = (1/T) sum_t g_t``):

1. **Linear minimisation oracle** over the pool, per *block*. ``granularity: task``: one block, the whole
   model; ``granularity: layer``: block-coordinate, every tensor b is a block (the LMO of the product of the
   per-tensor hulls; buffers join their module's block, see below). The score of vertex i in block B is
   ``<g_B, s_i,B - theta_B>`` (``score: inner_product``, the paper's LMO).

   * ``oracle: joint``: the classical FW LMO of the mean loss, ``s[B] = argmin_i <g_B, s_i,B - theta_B>``
     (soft: the k best).
   * ``oracle: per_task`` (the paper's multi-task oracle): each task t proposes its own best vertex
     ``p_t[B] = argmin_i <g_t,B, s_i,B - theta_B>`` — if that score is negative, i.e. the vertex decreases
     task t's linearised loss; a task no vertex helps in B proposes none. The selection in B is the set of
     distinct proposals, cut to the k with the best joint score when there are more than k, and filled up to
     k with the best remaining vertices by joint score when there are fewer (two tasks proposing the same
     expert, or a task proposing none): a filled slot is the best remaining direction for the mean loss, and
     the simplex step can still give it coefficient 0. (The public code ``hmarkc/fusion_bench``
     ``fw_merging/fw_soft.py`` instead lets a task whose best vertex is taken pick its runner-up, in the order
     of the tasks.) Why: the joint gradient is dominated by the task with the largest loss — on the resnet_s
     zoo, digits' cross-entropy at theta_0 is 8.4 nats against 0.17, 0.72 and 3.5 for mnist, mnist_rot90
     and shapes (100 training examples each, ``bn: merged``) — so the joint top-k can be all experts that
     help that task, crowding out the other tasks' experts; per task, every task gets the expert that helps
     it.
   * fw_hard takes one vertex per iteration. ``oracle: joint`` (its default): the FW step of the mean loss,
     as in the paper's FW-hard and the public ``fw_hard.py`` (one gradient accumulated over all tasks).
     ``oracle: per_task`` there means the rule above with k = 1: among the tasks' proposals the one with the
     best joint score (so the vertex is always one some task asked for).

   The selection is stored best joint score first.
2. **FW gap** ``G_t = <-g, s_t - theta_t>`` for the joint LMO vertex (layer-wise: summed over the blocks),
   whatever the oracle. It is >= 0 whenever ``theta_t`` lies in the hull and bounds the primal gap for convex
   l; the run stops as soon as ``0 <= G_t <= gap_tolerance``. A negative gap can only occur outside the hull
   (a pretrained or task-arithmetic start): it certifies nothing there — e.g. a task-arithmetic sum of 21
   BatchNorm experts whose loss is in the thousands has a negative gap, yet the line search toward s_t cuts
   the loss by orders of magnitude — so the iteration goes on and the step search decides.
3. **Update.**

   * *Hard* (``fw_hard``): ``theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t`` with ``gamma_t`` from a line
     search of ``l`` on ``[0, step_size]`` (``step: line_search``: a 5-point grid, then golden-section
     refinement around the best grid point, ``line_search_steps`` evaluations; gamma = 0 is a grid point, so
     the objective never increases) or the classical schedule ``gamma_t = step_size * 2 / (t + 2)``
     (``step: schedule``, t = 0, 1, ...; with ``step_size = 1`` the first step moves fully onto ``s_0``).
     One gamma for the whole model (layer-wise, ``s_t`` is the composite of the blocks' vertices).
   * *Soft* (``fw_soft``): the k selected vertices ``s_1..s_k`` (per block when layer-wise: slot j of block B
     holds B's j-th vertex), then ``lambda* = argmin_lambda l(theta_t + sum_j lambda_j (s_j - theta_t))`` over
     a simplex by projected gradient descent with the exact Euclidean projection of :mod:`mergelab.ops.simplex`,
     and ``theta_{t+1} = theta_t + sum_j lambda*_j (s_j - theta_t)``. The granularity of lambda is its own
     parameter, independent of the oracle's: ``coefficients: task``, one lambda vector for the whole model;
     ``coefficients: layer``, one per tensor (buffers share their module's), i.e. for tensor b
     ``theta_{t+1}[b] = theta_t[b] + sum_j lambda_{b,j} (s_j[b] - theta_t[b])``; each tensor is then a convex
     combination of its own values, and the iterate lies in the product of the per-tensor hulls. Any oracle
     granularity combines with any coefficient granularity.
     ``simplex: solid`` (default) takes each lambda vector in ``{lambda >= 0, sum_j lambda_j <= 1}``, so
     ``theta_{t+1} = (1 - sum lambda) theta_t + sum lambda_j s_j`` is a convex combination of the current model
     and the selected vertices: ``lambda = 0`` (no move) is feasible and the iteration never increases l (with
     the joint oracle every hard FW step ``gamma e_1`` is feasible too, which keeps FW's O(1/T) rate; the
     per-task selection need not contain the joint LMO vertex, so that guarantee is not claimed for it).
     ``simplex: probability`` takes ``sum lambda = 1`` exactly; ``theta_t`` then drops out
     (``theta_{t+1} = sum_j lambda_j s_j``). PGD: ``lambda <- Proj(lambda - pgd_lr * grad_lambda)`` with
     ``d l / d lambda_{C,j} = sum_{b in C} <grad_b l(theta(lambda)), s_j[b] - theta_t[b]>`` (C a coefficient
     block); a step that does not decrease l is rejected and the step size halved, so l never increases;
     ``pgd_steps`` gradient evaluations at most. At ``lambda = 0`` the gradient comes from the oracle's
     per-tensor table, without an evaluation.

The iterates stay in ``conv{theta_init, theta_1, ..., theta_n}`` (per tensor with layer-wise oracle or
coefficients). Besides the gap test, a run stops when an update leaves the model unchanged (gamma = 0, or
lambda = 0 with the solid simplex: the search found no decrease), since every further iteration would repeat
it exactly (``stop_reason`` ``no_progress``).

Initial solution (``init``): ``pretrained`` (theta_0), ``task_arithmetic`` (``theta_0 + init_lambda sum_i
w_i tau_i``, streamed one expert at a time; negative BatchNorm ``running_var`` entries, which a sum of many
task vectors can produce, are set to 0) or ``adamerging`` (:mod:`mergelab.methods.data_informed.adamerging`
with its defaults; it holds all N task vectors while it runs, so that start is not constant-memory).

Scores (``score``): ``inner_product`` (the paper's, the LMO above) or ``cosine`` (the public code's
``hmarkc/FW-Merging`` / FusionBench ``fw_merging``: the sum over tensors of ``cos(g[b], s[b])``, per tensor
when layer-wise; per task with ``g_t``, the proposal rule then asks for a negative cosine). The gap is always
the inner-product FW gap; ``selected_gap`` in the trace is the gap of the top-1 selected direction (it
differs from the gap with ``score: cosine`` or the per-task oracle).

Defaults and sources
--------------------
fw_hard: 3 iterations from ``task_arithmetic`` with ``init_lambda = 0.3`` (paper, vision: 3 iterations from a
TA or AdaMerging start; 0.3 is TA's usual coefficient and the public code's scaling factor), line search,
``granularity: layer`` (the paper's FW-hard is layer-wise; task-wise stays an option), ``oracle: joint``
(above).
fw_soft: 15 iterations from ``pretrained`` (paper), ``k`` = number of tasks in ``data.tasks`` (the public
code merges one selected checkpoint per task per iteration), ``oracle: per_task`` (the paper's multi-task
oracle), ``granularity: task`` with ``coefficients: layer`` (the paper's main results: task-wise selection,
layer-wise coefficients — the public code runs layer-wise AdaMerging on the selected checkpoints),
``simplex: solid``, ``pgd_steps = 20`` and ``pgd_lr = 0.1`` (mergelab's choices — the paper gives no PGD
settings: from lambda = 0 the first step moves each coefficient by 0.1 x its linearised gain
``<-g, s_j - theta_t>`` over its block, and rejected steps halve).
Both: ``objective: ce`` with 100 samples per task (paper), ``score: inner_product`` and the gap test with
``gap_tolerance = 0`` (paper; the public code has neither the gap test nor the simplex projection — its soft
variant runs AdaMerging on the selected checkpoints with unconstrained coefficients), ``bn: merged``.
Earlier mergelab versions ran both with ``granularity: task`` and the joint oracle, fw_soft with
``coefficients: task``, and differentiated the parameters only (see below); all but the last are options.

BatchNorm and which tensors move
--------------------------------
Every vertex carries its BN running statistics (``running_mean``/``running_var``), and the merge combines them
with the same convex coefficients as the weights — task-wise with the single gamma / lambda; layer-wise a
buffer follows the vertex choice and coefficients of its own module's ``weight`` (else of the module's first
parameter; buffers of parameter-free modules form one group that follows the whole-model selection and, in
soft mode, keeps its initial coefficients). Non-floating tensors are copied from the base. ``bn`` says how the
objective treats BatchNorm (the same option, with the same semantics, as AdaMerging's):

* ``bn: merged`` (default): the backbone runs in eval mode, BN normalising with the merged running
  statistics, exactly as the merged model is evaluated without re-estimation. l is then a function of the
  weights *and* the statistics, and since the update moves both, the oracle and the PGD coefficient gradient
  differentiate l in both (PyTorch's eval-mode ``batch_norm`` has no gradient for the statistics; the
  objective runs BN through the same formula written out, ``(x - mean) / sqrt(var + eps) * weight + bias``).
  Differentiating the weights only — mergelab's earlier behaviour, ``ModelObjective(statistics_gradient=
  False)`` — linearises a different move from the one the update makes: on the resnet_s zoo (4 experts, TA
  0.3 start, l = 1.631) the weights-only oracle scored shapes best (-0.87: moving shapes' weights alone does
  cut l, to 1.585 at gamma 0.1), but moving its weights *and* its statistics raises l for every gamma > 0
  (1.641 at 0.01, 1.746 at 0.1), so the line search returned gamma = 0 and fw_hard stopped at iteration 0
  (``no_progress``) on exactly its task-arithmetic start. With the statistics in the gradient the oracle
  picks digits (whose statistics are what the digits task needs) and l falls to 0.97 in 3 iterations.
* ``bn: batch``: BN runs in train mode, each task's examples normalised with their own batch statistics
  (test-time adaptation's convention, e.g. TENT, Wang et al. 2021, and AdaMerging's ``bn: batch``), so l
  depends on the weights only and the statistics get no gradient. Train-mode BN is not separable across
  chunks, so each task's ``samples_per_task`` examples go through as **one** batch (``data.batch_size`` is
  not used by the objective; activation memory grows with ``samples_per_task``). At the end the result's
  running statistics are re-estimated on the union of the objective's examples of all tasks (cumulative
  average over all of them, AdaMerging's helper), so the merged model can be evaluated in eval mode.

Memory: constant in the pool size
---------------------------------
Checkpoints stay on disk. Each iteration the oracle streams through the pool with
:meth:`MergeContext.expert_state` (one expert read, scored and released at a time), keeping only the scores
(n x tensors tables of floats, one per task with the per-task oracle); then only the selected vertices are
read again. Held at any time: the current model ``theta_t``, its gradient — with ``oracle: per_task`` the T
per-task gradients ``g_t``, T backbone-sized tensors (the joint gradient is their mean, never materialised);
all dropped once the scores are taken —, one work copy (the line-search or PGD candidate), the selected
vertices (hard: 1; soft: k, stored as differences ``s_j - theta_t``; layer-wise vertices are assembled tensor
by tensor from the experts that were selected for some tensor) and one streamed expert, plus the backbone
module, the heads and the data: at most ``max(G + 2, 4)`` backbone-sized sets of tensors for hard and
``max(G + 2, k + 3)`` for soft (the gradient of a PGD candidate included), with G = 1 (joint oracle) or T
(per-task oracle), whatever n is (AdaMerging holds N + 2). ``bench/fw_memory.py`` measures it. The cost is
time: each iteration reads the whole pool once for the oracle (the per-task gradients cost no extra pass over
the data: the same examples, accumulated per task).

Spec
----
```yaml
method: fw_soft                     # or fw_hard
base: ~/.cache/mergelab/zoo/resnet_s/pretrained
models: [experts/mnist/..., experts/digits/..., ...]     # the pool: expert folders
parameters: {oracle: per_task, granularity: task, coefficients: layer, iterations: 15, bn: batch}
data: {tasks: [mnist, digits], samples_per_task: 100}   # the objective's tasks (default: the experts' own)
```

Python API
----------
:func:`frank_wolfe` ``(context, params) -> (state, FWTrace)``; the zoo-independent core
:func:`run_frank_wolfe` ``(objective, pool, theta0, config, groups, coefficient_groups=...)`` works on plain
tensors with any :class:`~mergelab.methods.data_informed.objectives.Objective` (e.g.
:class:`~mergelab.methods.data_informed.objectives.FunctionObjective`; ``TaskFunctionObjective`` and
``ModelObjective`` are ``MultiTaskObjective`` s, which ``FWConfig(oracle="per_task")`` needs; all in
:mod:`~mergelab.methods.data_informed.objectives`) and
:class:`~mergelab.methods.data_informed.vertex_pools.VertexPool` (e.g. ``TensorPool``, in
:mod:`~mergelab.methods.data_informed.vertex_pools`); :func:`~mergelab.methods.data_informed.frank_wolfe_oracle.linear_minimization_oracle` and
:func:`~mergelab.methods.data_informed.frank_wolfe_oracle.tensor_groups` (:mod:`~mergelab.methods.data_informed.frank_wolfe_oracle`),
:func:`~mergelab.methods.data_informed.line_search.line_search` (:mod:`~mergelab.methods.data_informed.line_search`). ``FWConfig.oracle`` defaults to ``joint`` (a plain objective has no tasks); the method
defaults above are set by :class:`FWHardParams` / :class:`FWSoftParams`. The trace (per iteration:
objective, per-task objectives and proposals, gap, selected vertices, step or coefficients, objective after
the update, evaluations, seconds) is logged at INFO level and returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm import tqdm

from mergelab.errors import SpecError
from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.frank_wolfe_oracle import (
    MODEL_GROUP,
    Granularity,
    Oracle,
    Score,
    gather_vertices,
    linear_minimization_oracle,
    tensor_groups,
)
from mergelab.methods.data_informed.line_search import line_search
from mergelab.methods.data_informed.objectives import (
    BnMode,
    ModelObjective,
    Objective,
    ObjectiveKind,
    Point,
)
from mergelab.methods.data_informed.vertex_pools import ContextPool, VertexPool
from mergelab.models import load_backbone_state
from mergelab.ops.simplex import project_simplex, project_solid_simplex

log = logging.getLogger(__name__)

StepRule = Literal["line_search", "schedule"]
SimplexKind = Literal["solid", "probability"]
InitKind = Literal["pretrained", "task_arithmetic", "adamerging"]

# ------------------------------------------------------------------------------------------ step sizes


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
    oracle: Oracle = "joint"

    def __post_init__(self) -> None:
        if self.variant not in ("hard", "soft"):
            raise ValueError(f"variant must be 'hard' or 'soft', got {self.variant!r}")
        if self.oracle not in ("joint", "per_task"):
            raise ValueError(f"oracle must be 'joint' or 'per_task', got {self.oracle!r}")
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
    """One iteration: at ``theta_t`` the objective, the FW gap, the selection (per oracle group, best joint
    score first) and the update (hard: ``step`` gamma; soft: ``coefficients`` lambda per coefficient group,
    aligned with the selection's slots). Per-task oracle: ``task_objectives`` (``l_t`` at ``theta_t``) and
    ``proposals`` (per oracle group, the vertex each task proposed, in the order of :attr:`FWTrace.tasks`)."""

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
    task_objectives: dict[str, float] | None = None
    proposals: dict[str, list[int]] | None = None


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
    oracle: str = "joint"
    #: granularity of the soft coefficients (``task`` / ``layer``; ``None`` for hard: one step gamma)
    coefficients: str | None = None
    coefficient_groups: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

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
            "variant": self.variant, "granularity": self.granularity, "oracle": self.oracle,
            "coefficients": self.coefficients, "score": self.score, "tasks": list(self.tasks),
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
                    granularity: str | None = None,
                    coefficient_groups: Mapping[str, Sequence[str]] | None = None,
                    coefficients: str | None = None) -> tuple[Point, FWTrace]:
    """Frank-Wolfe over ``conv(pool)`` from ``theta0`` (see the module docstring); ``(theta, trace)``.

    ``groups`` partitions the floating tensors of ``theta0`` into oracle blocks (default: one group, i.e.
    task-wise; see :func:`tensor_groups`); ``coefficient_groups`` (soft only) partitions them into blocks that
    share one coefficient vector (default: ``groups``). ``granularity`` / ``coefficients`` label them in the
    trace. ``config.oracle == "per_task"`` needs a :class:`MultiTaskObjective`. ``theta0`` is not modified;
    non-floating tensors are carried over.
    """
    theta: Point = {n: t.detach().clone() for n, t in theta0.items()}
    floating = [n for n, t in theta.items() if t.is_floating_point()]
    if groups is None:
        groups = {MODEL_GROUP: floating}
    _check_groups(groups, theta)
    if coefficient_groups is None:
        coefficient_groups = groups
    else:
        _check_groups(coefficient_groups, theta)
    per_task = config.oracle == "per_task"
    if per_task and not callable(getattr(objective, "task_values_and_grads", None)):
        raise ValueError("oracle 'per_task' needs an objective with per-task gradients (task_values_and_grads), "
                         "e.g. TaskFunctionObjective or ModelObjective")
    labels = [pool.label(i) for i in range(len(pool))]
    gran = granularity or ("task" if len(groups) == 1 else "layer")
    coef = None if config.variant == "hard" else (
        coefficients or ("task" if len(coefficient_groups) == 1 else "layer"))
    trace = FWTrace(config.variant, gran, config.score, labels, list(groups), oracle=config.oracle, coefficients=coef,
                    coefficient_groups=list(coefficient_groups) if coef else [],
                    tasks=list(getattr(objective, "tasks", []) or []))
    k = 1 if config.variant == "hard" else min(config.k, len(pool))
    bar = tqdm(range(config.iterations), desc=f"fw_{config.variant} ({gran})", unit="it", disable=not progress)
    last_value: float | None = None
    for t in bar:
        started = time.perf_counter()
        task_values = None
        if per_task:
            value, task_values, task_grads = objective.task_values_and_grads(theta)  # type: ignore[attr-defined]
            trace.tasks = list(task_values)
            lmo = linear_minimization_oracle(None, theta, pool, groups, score=config.score, k=k, oracle="per_task",
                                             task_grads=task_grads)
            del task_grads
        else:
            value, grad = objective.value_and_grad(theta)
            lmo = linear_minimization_oracle(grad, theta, pool, groups, score=config.score, k=k)
            del grad
        it = FWIteration(t, value, lmo.gap, lmo.selected_gap, lmo.selected(), evaluations=1,
                         task_objectives=task_values, proposals=lmo.proposed())
        if 0.0 <= it.gap <= config.gap_tolerance:
            it.stopped = True
            it.seconds = time.perf_counter() - started
            trace.iterations.append(it)
            trace.stop_reason = "gap"
            last_value = value
            log.info("fw_%s iteration %d: objective %.6g, FW gap %.3g <= tolerance %.3g: stop",
                     config.variant, t, value, it.gap, config.gap_tolerance)
            break
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
                glam0 = lmo.coefficient_gradient(coefficient_groups, groups)
                start = (torch.zeros_like(glam0), value, glam0)
            lam, after, evals = simplex_coefficients(objective, theta, directions, coefficient_groups,
                                                     steps=config.pgd_steps, lr=config.pgd_lr,
                                                     simplex=config.simplex, start=start)
            it.evaluations += evals
            for gi, group in enumerate(coefficient_groups):  # theta_{t+1} = theta_t + sum_j lam_j (s_j - theta_t)
                for j, c in enumerate(lam[gi].tolist()):
                    if c != 0.0:
                        for b in coefficient_groups[group]:
                            theta[b].add_(directions[j][b], alpha=c)
            del directions
            it.coefficients = {g: [round(v, 6) for v in lam[i].tolist()] for i, g in enumerate(coefficient_groups)}
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
    if it.step is not None:
        update = f"gamma {it.step:.4g}"
    elif it.coefficients and len(it.coefficients) == 1:
        update = f"lambda {next(iter(it.coefficients.values()))}"
    else:
        sums = [sum(v) for v in (it.coefficients or {}).values()]
        update = (f"lambda per tensor (sum in [{min(sums):.3g}, {max(sums):.3g}], mean {sum(sums) / len(sums):.3g})"
                  if sums else "lambda per tensor")
    after = f" -> {it.objective_after:.6g}" if it.objective_after is not None else ""
    tasks = ""
    if it.task_objectives:
        tasks = " [" + ", ".join(f"{t} {v:.4g}" for t, v in it.task_objectives.items()) + "]"
        if it.proposals and trace.granularity == "task":
            prop = next(iter(it.proposals.values()))
            tasks += ", proposed " + ", ".join(f"{t}->{trace.vertices[i]}" for t, i in zip(trace.tasks, prop))
    log.info("fw_%s iteration %d: objective %.6g%s%s, FW gap %.4g, selected %s, %s (%d evaluations, %.2f s)",
             trace.variant, it.t, it.objective, after, tasks, it.gap, sel, update, it.evaluations, it.seconds)


# ------------------------------------------------------------------------------------------- parameters


class _FWParams(MethodParams):
    init_lambda: float = Field(0.3, description="task-arithmetic coefficient of init: task_arithmetic")
    objective: ObjectiveKind = Field("ce", description="ce: labelled cross-entropy; entropy: unlabelled entropy")
    score: Score = Field("inner_product", description="oracle score: inner_product (paper) or cosine (public code)")
    gap_tolerance: float = Field(0.0, description="stop when the FW gap is <= this")
    bn: BnMode = Field("merged", description="merged: BN running statistics follow the coefficients (and get "
                                             "gradients); batch: BN uses each task batch's statistics while "
                                             "optimising, re-estimated on the objective's examples at the end")

    @field_validator("init_lambda", "gap_tolerance")
    @classmethod
    def _finite_value(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


class FWHardParams(_FWParams):
    """Parameters of ``fw_hard`` (module docstring: defaults and sources)."""

    granularity: Granularity = Field("layer", description="oracle: task, one vertex for the whole model; layer: "
                                                          "one per tensor (paper)")
    oracle: Oracle = Field("joint", description="joint: the mean loss's gradient picks the vertex (paper, public "
                                                "code); per_task: the best joint score among the tasks' proposals")
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

    granularity: Granularity = Field("task", description="oracle: task, k vertices for the whole model (paper); "
                                                         "layer: k per tensor")
    coefficients: Granularity = Field("layer", description="task: one lambda vector for the whole model; layer: "
                                                           "one per tensor (paper)")
    oracle: Oracle = Field("per_task", description="per_task: each task's gradient proposes its vertex (paper); "
                                                   "joint: top-k by the mean loss's gradient")
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
    # deferred: adamerging is an optional method module (registry() skips it when absent); only this option needs it
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
    objective = ModelObjective(backbone, heads, data, params.objective, context.data.batch_size, bn=params.bn)
    parameter_names = set(objective.parameter_names)
    groups = tensor_groups(list(theta0), params.granularity, parameter_names)
    coefficient_groups = None
    if variant == "hard":
        config = FWConfig("hard", params.iterations, params.step, params.step_size, params.line_search_steps,
                          score=params.score, gap_tolerance=params.gap_tolerance, oracle=params.oracle)
    else:
        config = FWConfig("soft", params.iterations, k=params.k or len(context.tasks), pgd_steps=params.pgd_steps,
                          pgd_lr=params.pgd_lr, simplex=params.simplex, score=params.score,
                          gap_tolerance=params.gap_tolerance, oracle=params.oracle)
        coefficient_groups = tensor_groups(list(theta0), params.coefficients, parameter_names)
    log.info("FW-Merging (%s, %s-wise %s oracle%s, %s, bn %s) over %d experts from %s on %d %s examples of %s",
             variant, params.granularity, params.oracle,
             f", {params.coefficients}-wise coefficients" if variant == "soft" else "", params.objective, params.bn,
             len(pool), params.init, sum(len(x) for x, _ in data.values()), split, ", ".join(context.tasks))
    theta, trace = run_frank_wolfe(objective, pool, theta0, config, groups, progress=context.progress,
                                   granularity=params.granularity, coefficient_groups=coefficient_groups,
                                   coefficients=params.coefficients if variant == "soft" else None)
    del theta0
    state = {n: theta[n].detach().to("cpu").contiguous() for n in theta} | fixed
    log.info("FW-Merging: objective %.6g -> %.6g in %d iteration(s) (%s)", trace.initial_objective,
             trace.final_objective, len(trace.iterations), trace.stop_reason)
    if params.bn == "batch" and objective.statistics_names:
        state = _reestimate_statistics(backbone, state, torch.cat([x for x, _ in data.values()]), context)
    return state, trace


def _reestimate_statistics(backbone: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
                           context: MergeContext) -> dict[str, torch.Tensor]:
    """``bn: batch``: the result's BN running statistics re-estimated on ``x`` (the objective's examples of every
    task), by AdaMerging's helper (the same semantics as AdaMerging's ``bn: batch``)."""
    # deferred: adamerging is an optional method module (registry() skips it when absent); only this option needs it
    try:
        from mergelab.methods.data_informed.adamerging import _reestimate_bn
    except ModuleNotFoundError as exc:
        if exc.name != "mergelab.methods.data_informed.adamerging":
            raise
        raise SpecError("parameters: bn 'batch' re-estimates BatchNorm statistics with the helper of "
                        "mergelab.methods.data_informed.adamerging, which is not available in this installation; "
                        "use bn: merged") from None
    log.info("FW-Merging: BatchNorm running statistics re-estimated on the %d examples of the objective", len(x))
    return _reestimate_bn(backbone, state, x, context.data.batch_size, context.data.seed)


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

__all__ = ["FWConfig", "FWHardParams", "FWIteration", "FWSoftParams", "FWTrace", "METHODS", "frank_wolfe",
           "run_frank_wolfe", "schedule_step", "simplex_coefficients"]
