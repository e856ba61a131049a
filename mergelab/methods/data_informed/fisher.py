"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging").

Each expert's backbone parameters are weighted, coordinate by coordinate, by that expert's diagonal Fisher
information on its own task (computed through its own head)::

    F_i   = E_x E_{y ~ p_i(y|x)} [ (d/d theta log p_i(y|x))^2 ]            (diagonal, per parameter)
    theta = sum_i w_i (F_i + eps) theta_i  /  sum_i w_i (F_i + eps)          (elementwise)

with ``w_i`` the spec's model weights. A coordinate an expert is sensitive to (large Fisher) is pulled
toward that expert's value; where every Fisher is (near) zero the result is the weighted average.

Fisher variants (``fisher``):

* ``exact`` (default): the expectation over ``y`` is computed exactly, summing over the classes weighted by
  the model's probabilities, ``F_i(x) = sum_c p_c(x) (grad log p_c(x))^2``. This is the paper's Fisher (of
  the model's predictive distribution) and what its reference implementation computes for classifiers
  (``expectation_wrt_logits=True`` in github.com/mmatena/model_merging). Costs one backward pass per class
  and sample. (FusionBench instead squares the gradient of ``sum_{n,c} sqrt(p_nc) log p_nc`` over a whole
  batch, which adds cross terms between samples and classes; this module squares per sample and class.)
* ``sampled``: a Monte-Carlo estimate of the same quantity, one ``y ~ p_i(y|x)`` per input (one backward
  pass per sample; seeded by ``data.seed`` and the expert's index).
* ``empirical``: the "empirical Fisher", the true label in place of ``y`` (Kunstner et al. 2019 explain why
  it is a different object; offered because it is common).

Defaults and their sources:

* samples per task: 256 when the spec's ``data`` section does not set ``samples_per_task`` (FusionBench's
  ``num_fisher_examples``; the paper's reference script ``compute_fisher.py`` defaults to 4,096), drawn
  from the ``train`` split unless ``data.split`` says otherwise. The merge record lists the count used.
* ``epsilon = 1e-6``: added to every Fisher so no denominator is zero (FusionBench's
  ``minimal_fisher_weight``, also added to every Fisher; the reference implementation instead floors the
  first ("target") model's Fisher at ``fisher_floor = 1e-6``; the RegMean authors' Fisher baseline adds
  ``1e-10``). It is an absolute value in Fisher units: a coordinate whose Fishers are all far below it is
  effectively averaged. Measured on resnet_s zoo experts (mnist-family and digits, 64 train samples): the
  exact Fisher's median entry is 2e-5 to 1e-4 with 1-9% of entries below 1e-6; the empirical Fisher of these
  well-fitted experts is far smaller (median 3e-8 to 2e-6, 43-98% of entries below 1e-6), so lower
  ``epsilon`` with ``fisher: empirical``. ``epsilon = 0`` is allowed; coordinates
  where every ``w_i F_i`` is zero then take the weighted average.
* ``normalize = false``: the paper's formula. ``true`` divides each expert's Fisher by its L2 norm over the
  whole backbone before ``epsilon`` is added, so that experts whose Fishers differ in overall scale (e.g. a
  very confident expert, whose exact Fisher is small) count equally (the reference implementation's and
  FusionBench's ``normalize_fishers`` / ``normalize_fisher_weight``, both on by default there).

Which tensors: every floating parameter of the backbone (``named_parameters``) is Fisher-weighted. Buffers
(BatchNorm ``running_mean`` / ``running_var``) have no Fisher and are averaged with the weights ``w_i``, like
weight averaging does; re-estimate them afterwards with :func:`mergelab.evaluation.reset_bn_statistics` if
wanted. The Fisher is computed with the expert in eval mode (BatchNorm uses its running statistics), i.e.
the predictive distribution of the deployed expert. Heads are not merged.

Per-sample squared gradients are computed by a loop over samples (batch of one, plain autograd): on CPU this
beat ``torch.func.vmap`` for the convolutional backbones by a wide margin and is as fast for the ViT.

Memory: experts are streamed one at a time (read from disk when needed). Besides the current expert (its
tensors, module and Fisher) the merge holds two model-sized accumulators, ``sum_i w_i (F_i + eps) theta_i``
and ``sum_i w_i (F_i + eps)`` (a third, the weighted sum of parameters, only when ``epsilon = 0``), plus the
weighted sum of the buffers: constant in the pool size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from mergelab.errors import SpecError
from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod
from mergelab.methods.data_informed.context import MergeContext
from mergelab.models import HEAD_FILE, load_head
from mergelab.models.state import load_backbone_state

log = logging.getLogger(__name__)

FisherKind = Literal["exact", "sampled", "empirical"]

#: Samples per task when the spec's data section does not set ``samples_per_task`` (FusionBench default).
DEFAULT_SAMPLES = 256


class FisherParams(MethodParams):
    fisher: FisherKind = Field("exact", description="exact | sampled | empirical (see the module docstring)")
    epsilon: float = Field(1e-6, description="added to every diagonal Fisher before weighting")
    normalize: bool = Field(False, description="divide each expert's Fisher by its whole-backbone L2 norm")

    @field_validator("epsilon")
    @classmethod
    def _epsilon_range(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"epsilon must be finite and >= 0, got {v}")
        return v


# ------------------------------------------------------------------------------------------ the Fisher


def diagonal_fisher(
    backbone: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    kind: FisherKind = "exact",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``head(backbone(.))`` w.r.t. the backbone's parameters, averaged over ``x``.

    Returns ``{name: F}`` for every floating backbone parameter that requires grad, with
    ``F = mean_n E_y[(grad_theta log p(y|x_n))^2]`` where ``y`` is summed over the classes with the model's
    probabilities (``exact``), drawn once from them (``sampled``, using ``generator``) or the label ``y_n``
    (``empirical``). Both modules are evaluated in eval mode (restored afterwards); the head is not
    differentiated. Parameters that do not influence the output get a zero Fisher.
    """
    if kind not in ("exact", "sampled", "empirical"):
        raise ValueError(f"unknown Fisher kind {kind!r}; use exact, sampled or empirical")
    if kind == "empirical" and y is None:
        raise ValueError("the empirical Fisher needs the labels y")
    if len(x) == 0:
        raise ValueError("no samples to compute the Fisher on")
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad and p.is_floating_point()]
    if not named:
        raise ValueError("the backbone has no trainable floating parameters")
    tensors = [p for _, p in named]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    modes = (backbone.training, head.training)
    backbone.eval()
    head.eval()
    try:
        for i in range(len(x)):
            with torch.enable_grad():
                logp = torch.log_softmax(head(backbone(x[i : i + 1])).float(), dim=-1)[0]
            probs = logp.detach().exp()
            if kind == "exact":
                classes = [(c, probs[c].item()) for c in range(len(probs))]
                classes = [(c, pc) for c, pc in classes if pc > 0.0]  # p_c = 0 contributes exactly 0
            elif kind == "sampled":
                c = int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
                classes = [(c, 1.0)]
            else:
                classes = [(int(y[i].item()), 1.0)]
            for k, (c, pc) in enumerate(classes):
                grads = torch.autograd.grad(logp[c], tensors, retain_graph=k < len(classes) - 1, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.float().square(), alpha=pc)
    finally:
        backbone.train(modes[0])
        head.train(modes[1])
    return {n: s.div_(len(x)) for (n, _), s in zip(named, sums)}


def fisher_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a diagonal Fisher over all its tensors."""
    return math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))


def normalized_fisher(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``F / ||F||_2`` (whole-backbone norm); an all-zero Fisher is returned unchanged."""
    norm = fisher_norm(fisher)
    return {n: (f / norm if norm > 0 else f.clone()) for n, f in fisher.items()}


# ------------------------------------------------------------------------------------------- merging


class FisherAccumulator:
    """Streaming Fisher-weighted average: ``add`` one expert at a time, then ``result``.

    Tensors present in the expert's Fisher are Fisher-weighted, the others (buffers) averaged with the
    weights. Holds ``sum_i w_i (F_i + eps) theta_i`` and ``sum_i w_i (F_i + eps)`` (and, when
    ``epsilon == 0``, ``sum_i w_i theta_i`` for coordinates where every Fisher is zero).
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        if not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
        self.epsilon = epsilon
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor] = {}
        self._avg: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._names: list[str] | None = None
        self._weight = 0.0
        self._count = 0

    def add(self, state: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"Fisher merging needs positive model weights, got {weight}")
        names = list(state)
        if self._names is None:
            self._names = names
            self._dtypes = {n: t.dtype for n, t in state.items()}
        elif set(names) != set(self._names):
            raise ValueError(f"expert {self._count} has different tensors from the first expert")
        extra = sorted(set(fisher) - set(state))
        if extra:
            raise ValueError(f"Fisher for tensor(s) not in the state: {extra[:3]}")
        for name in self._names:
            t = state[name]
            if not t.is_floating_point():
                self._avg.setdefault(name, t.clone())  # integer tensors: kept from the first expert
                continue
            theta = t.float()
            if name in fisher:
                f = fisher[name].float()
                if f.shape != theta.shape:
                    raise ValueError(f"Fisher of {name!r} has shape {tuple(f.shape)}, tensor {tuple(theta.shape)}")
                if not torch.isfinite(f).all() or (f < 0).any():
                    raise ValueError(f"Fisher of {name!r} holds negative or non-finite values")
                wf = (f + self.epsilon).mul_(weight)
                if name not in self._num:
                    self._num[name] = wf * theta
                    self._den[name] = wf
                else:
                    self._num[name].addcmul_(wf, theta)
                    self._den[name].add_(wf)
                if self.epsilon > 0:
                    continue
            if name not in self._avg:
                self._avg[name] = theta * weight
            else:
                self._avg[name].add_(theta, alpha=weight)
        self._weight += weight
        self._count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self._names is None:
            raise ValueError("no experts were added")
        out: dict[str, torch.Tensor] = {}
        for name in self._names:
            if name in self._num:
                merged = self._num[name] / self._den[name]
                if self.epsilon == 0:
                    zero = self._den[name] == 0
                    if zero.any():
                        merged = torch.where(zero, self._avg[name] / self._weight, merged)
            elif self._avg[name].is_floating_point():
                merged = self._avg[name] / self._weight
            else:
                merged = self._avg[name]
            out[name] = merged.to(self._dtypes[name])
        return out


def fisher_merge(
    states: Iterable[Mapping[str, torch.Tensor]],
    fishers: Iterable[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    epsilon: float = 1e-6,
    normalize: bool = False,
) -> dict[str, torch.Tensor]:
    """``theta = sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps)`` elementwise (buffers: weighted mean).

    ``states`` and ``fishers`` are consumed in step (they may be generators: one expert in memory at a
    time). ``weights`` default to 1. With ``normalize`` each Fisher is divided by its L2 norm first.
    """
    acc = FisherAccumulator(epsilon)
    for i, (state, fisher) in enumerate(zip(states, fishers, strict=True)):
        w = 1.0 if weights is None else float(weights[i])
        acc.add(state, normalized_fisher(fisher) if normalize else fisher, w)
    return acc.result()


# ----------------------------------------------------------------------------------- method plumbing


def use_default_samples(context: MergeContext, samples: int) -> None:
    """Use ``samples`` per task unless the spec's data section set ``samples_per_task`` itself.

    Updates ``context.data`` so that the merge record reports the count actually used.
    """
    if "samples_per_task" not in context.data.model_fields_set:
        context.data = context.data.model_copy(update={"samples_per_task": samples})


def check_own_task_pool(context: MergeContext, method: str) -> None:
    """Fisher / RegMean statistics of each expert come from its own task, with positive weights."""
    missing = sorted({e.task for e in context.experts} - set(context.tasks))
    if missing:
        raise SpecError(
            f"data.tasks: method '{method}' computes each expert's statistics on that expert's own task; "
            f"data.tasks leaves out {', '.join(missing)} (omit data.tasks or list every expert's task)"
        )
    bad = [str(e.path) for e in context.experts if not (math.isfinite(e.weight) and e.weight > 0)]
    if bad:
        raise SpecError(f"models: method '{method}' needs positive model weights; not positive for {', '.join(bad)}")


def load_expert_module(context: MergeContext, index: int) -> tuple[dict[str, torch.Tensor], nn.Module, nn.Linear]:
    """Expert ``index``'s backbone tensors, its backbone module (eval, on the device) and its own head."""
    expert = context.experts[index]
    state = context.expert_state(index)
    model = context.build_backbone()
    load_backbone_state(model, state, source=str(expert.backbone_path))
    model.eval()
    head = load_head(expert.path / HEAD_FILE, model.feature_dim).to(context.device).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return state, model, head


def expert_samples(context: MergeContext, index: int, head: nn.Linear, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of expert ``index``'s own task; a clear error if its head cannot score the task's labels."""
    expert = context.experts[index]
    x, y = context.samples(expert.task, split)
    if len(y) and int(y.max()) >= head.out_features:
        raise SpecError(
            f"models: expert {expert.path} has a {head.out_features}-class head but task '{expert.task}' has "
            f"labels up to {int(y.max())}; the expert was trained on another version of the task (rebuild it)"
        )
    return x, y


def _expert_fishers(context: MergeContext, params: FisherParams):
    split = context.split("train")
    for i in tqdm(range(len(context.experts)), desc="fisher", unit="expert", disable=not context.progress):
        expert = context.experts[i]
        state, model, head = load_expert_module(context, i)
        x, y = expert_samples(context, i, head, split)
        gen = torch.Generator().manual_seed(context.data.seed * 1_000_003 + i)
        fisher = diagonal_fisher(model, head, x, y, kind=params.fisher, generator=gen)
        log.info("fisher: expert %d (%s): %s Fisher on %d %s samples, norm %.3e",
                 i, expert.task, params.fisher, len(x), split, fisher_norm(fisher))
        yield state, {n: f.cpu() for n, f in fisher.items()}


def run_fisher(context: MergeContext, params: FisherParams) -> dict[str, torch.Tensor]:
    """The ``fisher`` method: see the module docstring."""
    check_own_task_pool(context, "fisher")
    use_default_samples(context, DEFAULT_SAMPLES)
    acc = FisherAccumulator(params.epsilon)
    for (state, fisher), expert in zip(_expert_fishers(context, params), context.experts):
        acc.add(state, normalized_fisher(fisher) if params.normalize else fisher, expert.weight)
    return acc.result()


METHODS = [
    DataInformedMethod(
        name="fisher",
        summary="Fisher merging (Matena & Raffel 2022): per-coordinate average weighted by each expert's "
        "diagonal Fisher on its own task",
        params=FisherParams,
        run=run_fisher,
        min_models=1,
    )
]

__all__ = [
    "DEFAULT_SAMPLES",
    "FisherAccumulator",
    "FisherParams",
    "METHODS",
    "diagonal_fisher",
    "fisher_merge",
    "fisher_norm",
    "normalized_fisher",
    "run_fisher",
]
