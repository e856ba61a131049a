"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning").

Notation: base theta_0, experts theta_i (i = 1..N) with merge weights w_i, task vectors
tau_i = theta_i - theta_0. AdaMerging learns the task-arithmetic coefficients instead of fixing them:

* task-wise:  ``theta = theta_0 + sum_i lambda_i tau_i``                 (N coefficients)
* layer-wise: ``theta^l = theta_0^l + sum_i lambda_i^l tau_i^l``          (N x L coefficients, one per expert
  per parameter tensor l of the backbone)

The coefficients minimise the Shannon entropy of the merged model's predictions on **unlabelled test
batches** of each task, each task read through its own expert's head, summed over tasks::

    min_lambda  sum_t  mean_{x in B_t}  H(softmax(h_t(f(x; theta(lambda)))))      H(p) = -sum_c p_c log p_c

(paper eq. 5-6). The labels are never used. Defaults (paper, sec. 5, and the official code
``EnnengYang/AdaMerging`` ``src/main_{task,layer}_wise_adamerging.py``): all coefficients start at
``init = 0.3`` (the ``prior``), Adam with lr ``1e-3`` and betas ``(0.9, 0.999)``, 500 steps, coefficients
kept in ``[0, 1]`` (the code clamps them in the forward pass; here ``clamp: true`` projects them onto
``[0, 1]`` after every step, the same merged model for coefficients inside the box, without the dead
gradient of a raw value stuck outside it). Layer-wise is the paper's best variant and the default.

Mapping to mergelab:

* ``init`` is scaled by each model's spec weight: ``lambda_i(0) = init * w_i`` (all weights are 1 by
  default), so zero steps reproduce ``task_arithmetic`` with ``lambda = init`` (up to float rounding, and
  except where task arithmetic makes a BN running variance negative: clamped at 0 here, see below).
* ``init = 0.3`` was tuned for 8 CLIP ViT tasks (no BatchNorm). With BN backbones and many experts,
  ``sum_i lambda_i`` well past 1 extrapolates the running statistics badly (8 zoo ResNets at 0.3: task
  arithmetic gives NaN features, AdaMerging starts from a collapsed model and stays there); ``init: 1/N``
  starts from the weight average instead.
* Each step draws one batch of ``data.batch_size`` examples per task from ``data.samples_per_task``
  examples of ``data.split`` (default ``test``; seeded by ``data.seed``). The official code uses two batches
  of 16 per task per step over the whole test set; ``data: {batch_size: 32, samples_per_task: <large>}``
  comes closest.
* The backbone runs in eval mode (BatchNorm uses its running statistics, as at evaluation) and functionally
  (:func:`torch.func.functional_call`), its parameters built as a differentiable function of lambda, so the
  gradient reaches lambda through the whole network.
* **BatchNorm buffers** (``bn: merged``, the default) (``running_mean``, ``running_var``) are merged with
  the same coefficients as the weights but carry no gradient (PyTorch's eval-mode ``batch_norm`` is not differentiable in them; the
  gradient is the partial one through the parameters): task-wise with lambda_i, layer-wise with the
  coefficient of their own BN layer's ``weight``. Only floating **parameters** define (and receive
  gradients for) coefficients. Merged running variances are clamped at
  0 (entropy minimisation tends to grow ``sum_i lambda_i`` past 1, where the task-arithmetic extrapolation
  of a variance can go negative). Non-floating tensors are copied from the base.
  ``bn: batch`` instead normalises with each task batch's own statistics while optimising (BN in train
  mode, as test-time entropy minimisation does, e.g. TENT, Wang et al. 2021) and re-estimates the result's
  running statistics on the union of the unlabelled examples at the end: with running statistics fixed,
  the entropy can be driven down by inflating activations (and logits) instead of by better features.
  On the resnet_s zoo (8 MNIST-family experts, init 1/8) ``merged`` took layer-wise AdaMerging from 0.53 to
  0.21 mean accuracy while the entropy fell 6.4 -> 1.2; ``batch`` gave 0.68 (0.66 at zero steps): prefer
  ``bn: batch`` for BatchNorm backbones. The default stays ``merged``, the published setting (CLIP ViTs
  have no BatchNorm, so there the two coincide).

**Memory grows linearly with the pool**: the N task vectors are held in memory (on ``context.device``) for
the whole optimisation, since every step rebuilds the merged model from all of them — N + 2 backbones in
all. (Frank-Wolfe merging is the constant-memory alternative.)

Python API: :func:`adamerging` returns ``(state, coefficients)``; the registered method ``adamerging``
(parameter ``granularity: task | layer``) returns the state and logs the coefficients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from mergelab.errors import NonFiniteError, TensorMismatchError
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod, parse_params
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.objectives import softmax_entropy
from mergelab.models import load_backbone_state

log = logging.getLogger(__name__)

Granularity = Literal["task", "layer"]
BnMode = Literal["merged", "batch"]


class AdaMergingParams(MethodParams):
    granularity: Granularity = Field(
        "layer", description="task: one coefficient per expert; layer: one per expert per parameter tensor")
    init: float = Field(0.3, description="initial coefficient (times each model's weight)")
    steps: int = Field(500, ge=0, description="Adam steps")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    clamp: bool = Field(True, description="project the coefficients onto [0, 1] after every step")
    bn: BnMode = Field("merged", description="merged: BN running statistics follow lambda; batch: BN uses batch "
                                              "statistics while optimising, re-estimated at the end")

    @field_validator("init", "lr")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


# ------------------------------------------------------------------------------------ task-vector pool


@dataclass
class TaskVectorPool:
    """The base and the stacked task vectors of a pool, on one device.

    ``base`` holds every tensor of the base backbone (floating ones in the compute dtype); ``taus[name]``
    has shape ``[N, *shape]`` with ``taus[name][i] = theta_i[name] - theta_0[name]`` for every floating
    tensor. ``labels`` names the experts (their tasks).
    """

    base: dict[str, torch.Tensor]
    taus: dict[str, torch.Tensor]
    labels: list[str]

    @property
    def num_experts(self) -> int:
        return len(self.labels)


def load_task_vectors(context: MergeContext, backbone: nn.Module | None = None,
                      dtype: torch.dtype = torch.float32) -> TaskVectorPool:
    """Read the base and every expert once and stack their task vectors (N backbones in memory).

    Checks the base against the architecture's backbone and every expert against the base (names,
    shapes, finiteness), naming the file and tensor on error.
    """
    device = context.device
    base_raw = context.base_state()
    if backbone is not None:
        load_backbone_state(backbone, base_raw, source=str(context.base_path))  # names/shapes vs the arch
    base: dict[str, torch.Tensor] = {}
    taus: dict[str, torch.Tensor] = {}
    n = len(context.experts)
    for name, t in base_raw.items():
        if t.is_floating_point():
            base[name] = t.to(device=device, dtype=dtype)
            taus[name] = torch.empty((n, *t.shape), dtype=dtype, device=device)
        else:
            base[name] = t.to(device)
    for i, expert in enumerate(context.experts):
        state = context.expert_state(i)
        source = str(expert.backbone_path)
        missing, extra = sorted(set(base_raw) - set(state)), sorted(set(state) - set(base_raw))
        if missing or extra:
            raise TensorMismatchError(
                f"{source}: does not match the base {context.base_path}: "
                + "; ".join(p for p in (f"missing {missing[:3]}" if missing else "",
                                        f"unexpected {extra[:3]}" if extra else "") if p)
            )
        for name, tau in taus.items():
            t = state[name]
            if tuple(t.shape) != tuple(base_raw[name].shape):
                raise TensorMismatchError(
                    f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the base has {tuple(base_raw[name].shape)}"
                )
            tau[i] = t.to(device=device, dtype=dtype)
            tau[i] -= base[name]
            if not torch.isfinite(tau[i].sum()):
                raise NonFiniteError(f"{source}: tensor '{name}' holds NaN or Inf values")
        del state
    return TaskVectorPool(base, taus, [e.task for e in context.experts])


# ---------------------------------------------------------------------------- merged model of lambda


class CoefficientMerge:
    """``theta(lambda)``: the merged backbone state as a differentiable function of the coefficients.

    ``lambda`` has shape ``[N, K]``: K = 1 (task-wise) or K = the number of floating parameters of the
    backbone (layer-wise, column k for parameter ``columns[k]``). For tensor ``name`` with column ``c``::

        theta[name] = theta_0[name] + sum_i lambda[i, c] * tau_i[name]

    Parameters get gradients; floating buffers (BN running statistics) use the column of their layer's
    ``weight`` (or the first parameter of the same module; else the expert's mean coefficient), detached
    (eval-mode ``batch_norm`` is not differentiable in its running statistics). A BN running variance
    (``*running_var``, non-negative in the base and in every expert) is clamped at 0 after merging: with
    ``sum_i lambda_i > 1`` the extrapolation ``(1 - sum_i lambda_i) var_0 + sum_i lambda_i var_i`` can turn
    negative, and BN would produce NaN.
    """

    def __init__(self, pool: TaskVectorPool, parameter_names: Sequence[str], granularity: Granularity) -> None:
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        params = [n for n in parameter_names if n in pool.taus]
        unknown = sorted(set(parameter_names) - set(pool.taus))
        if unknown:
            raise TensorMismatchError(f"backbone parameters {unknown[:3]} are not floating tensors of the base")
        self.pool = pool
        self.granularity = granularity
        self.parameter_names = set(params)
        # BN running variances (non-negative in the base and every expert) stay non-negative
        self.nonnegative = {
            name for name, tau in pool.taus.items()
            if name.endswith("running_var") and name not in self.parameter_names
            and bool((pool.base[name] >= 0).all()) and bool(((pool.base[name] + tau) >= 0).all())
        }
        self.columns: list[str] = ["all"] if granularity == "task" else list(params)
        index = {n: k for k, n in enumerate(params)}
        self._column: dict[str, int | None] = {}
        for name in pool.taus:
            if granularity == "task":
                self._column[name] = 0
            elif name in index:
                self._column[name] = index[name]
            else:
                prefix = name.rsplit(".", 1)[0] + "."
                siblings = [p for p in params if p.startswith(prefix) and "." not in p[len(prefix):]]
                siblings.sort(key=lambda p: p != prefix + "weight")
                self._column[name] = index[siblings[0]] if siblings else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pool.num_experts, len(self.columns)

    def column_of(self, name: str) -> int | None:
        """The coefficient column tensor ``name`` uses (``None``: the expert's mean coefficient)."""
        return self._column[name]

    def initial(self, init: float, weights: Sequence[float]) -> torch.Tensor:
        """``lambda(0)[i, :] = init * w_i``."""
        device = next(iter(self.pool.base.values())).device
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=device)
        if len(w) != self.pool.num_experts:
            raise ValueError(f"{len(w)} weights for {self.pool.num_experts} experts")
        return (init * w)[:, None].expand(self.shape).clone()

    def state(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged state for coefficients ``lam`` ``[N, K]`` (differentiable in ``lam`` for parameters)."""
        if tuple(lam.shape) != self.shape:
            raise ValueError(f"coefficients of shape {tuple(lam.shape)}, expected {self.shape}")
        out: dict[str, torch.Tensor] = {}
        for name, base in self.pool.base.items():
            tau = self.pool.taus.get(name)
            if tau is None:
                out[name] = base
                continue
            col = self._column[name]
            c = lam[:, col] if col is not None else lam.mean(1)
            if name not in self.parameter_names:
                c = c.detach()
            merged = base + torch.tensordot(c.to(tau.dtype), tau, dims=1)
            out[name] = merged.clamp_min(0.0) if name in self.nonnegative else merged
        return out


def entropy_objective(backbone: nn.Module, heads: Mapping[str, nn.Linear], state: Mapping[str, torch.Tensor],
                      batches: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t mean_{x in batches[t]} H(softmax(heads[t](backbone(x; state))))``, differentiable in ``state``.

    The backbone runs with its current mode (AdaMerging keeps it in eval mode) through
    :func:`torch.func.functional_call`; heads are applied in the state's dtype.
    """
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    total: torch.Tensor | None = None
    for task, x in batches.items():
        head = heads[task]
        features = functional_call(backbone, dict(state), (x.to(dtype),))
        logits = F.linear(features, head.weight.to(features.dtype), head.bias.to(features.dtype))
        h = softmax_entropy(logits).mean()
        total = h if total is None else total + h
    if total is None:
        raise ValueError("no task batches for the entropy objective")
    return total


class TaskBatches:
    """Seeded minibatches of each task's unlabelled examples: a fresh permutation per pass (epoch).

    With ``batch_size >= n`` every batch is the task's whole set (the objective is then deterministic).
    """

    def __init__(self, xs: Mapping[str, torch.Tensor], batch_size: int, seed: int) -> None:
        self.xs = dict(xs)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._perm: dict[str, torch.Tensor] = {}
        self._pos: dict[str, int] = {}

    def next(self) -> dict[str, torch.Tensor]:
        out = {}
        for task, x in self.xs.items():
            n = len(x)
            if n <= self.batch_size:
                out[task] = x
                continue
            pos = self._pos.get(task, n)
            if pos + self.batch_size > n:
                self._perm[task], pos = torch.randperm(n, generator=self.gen).to(x.device), 0
            out[task] = x[self._perm[task][pos : pos + self.batch_size]]
            self._pos[task] = pos + self.batch_size
        return out


# ------------------------------------------------------------------------------------------ the method


@dataclass
class AdaMergingCoefficients:
    """Learned coefficients: ``values[i, k]`` for expert ``experts[i]`` (its task) and column ``tensors[k]``.

    Task-wise: one column named ``"all"``. ``objective[s]`` is the summed entropy on step s's batches,
    before that step's update; ``initial`` the starting coefficients.
    """

    granularity: Granularity
    experts: list[str]
    tensors: list[str]
    values: torch.Tensor
    initial: torch.Tensor
    objective: list[float] = field(default_factory=list)

    def per_expert(self) -> dict[str, float]:
        """Mean coefficient of each expert (the coefficient itself when task-wise), keyed by task."""
        return {f"{t}#{i}" if self.experts.count(t) > 1 else t: float(v)
                for i, (t, v) in enumerate(zip(self.experts, self.values.mean(1)))}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the full matrix included)."""
        return {
            "granularity": self.granularity,
            "experts": list(self.experts),
            "tensors": list(self.tensors),
            "values": self.values.tolist(),
            "objective": {"first": self.objective[0] if self.objective else None,
                          "last": self.objective[-1] if self.objective else None,
                          "steps": len(self.objective)},
        }


def adamerging(context: MergeContext, params: AdaMergingParams | Mapping[str, Any] | None = None
               ) -> tuple[dict[str, torch.Tensor], AdaMergingCoefficients]:
    """Run AdaMerging on ``context``'s pool (see the module docstring): ``(merged state, coefficients)``.

    The state has the base's tensor names, float32 for floating tensors, on the CPU.
    """
    if params is None:
        params = AdaMergingParams()
    elif not isinstance(params, AdaMergingParams):
        params = parse_params(METHODS[0], dict(params))  # a SpecError naming the bad parameter
    backbone = context.build_backbone().eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if params.bn == "batch":
        for m in bns:
            m.train()  # batch statistics; the running buffers it updates are rebuilt every step
    pool = load_task_vectors(context, backbone)
    merge = CoefficientMerge(pool, [n for n, _ in backbone.named_parameters()], params.granularity)
    lam = merge.initial(params.init, [e.weight for e in context.experts])
    if params.clamp:
        lam.clamp_(0.0, 1.0)
    initial = lam.detach().cpu().clone()
    lam.requires_grad_(True)
    split = context.split("test")
    xs = {t: context.samples(t, split)[0] for t in context.tasks}  # unlabelled: the labels are dropped
    heads = {t: context.head(t) for t in context.tasks}
    batches = TaskBatches(xs, context.data.batch_size, context.data.seed)
    optimizer = torch.optim.Adam([lam], lr=params.lr, betas=(0.9, 0.999))
    log.info("AdaMerging (%s-wise, %d x %d coefficients) on %s %s data of %s, %d steps",
             params.granularity, *merge.shape, sum(len(x) for x in xs.values()), split, ", ".join(context.tasks),
             params.steps)
    objective: list[float] = []
    bar = tqdm(range(params.steps), desc=f"adamerging ({params.granularity})", unit="step",
               disable=not context.progress)
    for step in bar:
        loss = entropy_objective(backbone, heads, merge.state(lam), batches.next())
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"AdaMerging: the entropy objective became {value} at step {step} (coefficients in "
                f"[{lam.min().item():.3g}, {lam.max().item():.3g}]); try a smaller lr or fewer steps"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if params.clamp:
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)
        objective.append(value)
        bar.set_postfix(entropy=f"{value:.4f}")
    with torch.no_grad():
        state = {k: v.detach().to("cpu").contiguous() for k, v in merge.state(lam).items()}
    if params.bn == "batch" and bns:
        state = _reestimate_bn(backbone, state, torch.cat(list(xs.values())), context.data.batch_size,
                               context.data.seed)
    coefficients = AdaMergingCoefficients(params.granularity, pool.labels, merge.columns,
                                          lam.detach().cpu().clone(), initial, objective)
    _log_coefficients(coefficients)
    return state, coefficients


def _reestimate_bn(backbone: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, batch_size: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """``state`` with its BN running statistics re-estimated on ``x`` (all of it, cumulative average)."""
    load_backbone_state(backbone, state, source="AdaMerging result")
    reset_bn_statistics(backbone, x, batch_size=batch_size, num_batches=-(-len(x) // batch_size), seed=seed)
    own = backbone.state_dict()
    return {k: own[k].detach().to("cpu").clone() if k.endswith(("running_mean", "running_var")) else v
            for k, v in state.items()}


def _log_coefficients(c: AdaMergingCoefficients) -> None:
    if c.objective:
        log.info("AdaMerging entropy objective: %.4f -> %.4f over %d steps", c.objective[0], c.objective[-1],
                 len(c.objective))
    if c.granularity == "task":
        log.info("AdaMerging task-wise coefficients: %s",
                 ", ".join(f"{t} {v:.4f}" for t, v in c.per_expert().items()))
    else:
        rows = [f"{t} mean {row.mean():.4f} [{row.min():.4f}, {row.max():.4f}]"
                for t, row in zip(c.per_expert(), c.values)]
        log.info("AdaMerging layer-wise coefficients per expert: %s", "; ".join(rows))
        for t, row in zip(c.per_expert(), c.values):
            log.debug("AdaMerging %s: %s", t, ", ".join(f"{n}={v:.4f}" for n, v in zip(c.tensors, row.tolist())))


def record_output(context: MergeContext, key: str, value: Any) -> None:
    """Put a JSON-able result of a method into the merge record, when the context offers ``outputs``.

    (``MergeContext.outputs`` is a proposed framework extension; without it the value is only logged.)
    """
    outputs = getattr(context, "outputs", None)
    if isinstance(outputs, dict):
        outputs[key] = value


def _run(context: MergeContext, params: AdaMergingParams) -> dict[str, torch.Tensor]:
    state, coefficients = adamerging(context, params)
    record_output(context, "adamerging", coefficients.to_dict())
    return state


METHODS = [
    DataInformedMethod(
        name="adamerging",
        summary="AdaMerging: task-/layer-wise task-arithmetic coefficients learned by entropy minimisation "
                "on unlabelled test batches",
        params=AdaMergingParams,
        run=_run,
        min_models=1,
    )
]

__all__ = ["AdaMergingCoefficients", "AdaMergingParams", "CoefficientMerge", "METHODS", "TaskBatches",
           "TaskVectorPool", "adamerging", "entropy_objective", "load_task_vectors", "record_output"]
