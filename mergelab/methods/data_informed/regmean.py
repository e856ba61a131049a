"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For every linear map ``h = W x`` of the backbone (``W`` stored PyTorch-style as ``[out, in]``), RegMean picks
the merged ``W`` minimising the experts' regression discrepancy on their own inputs,
``sum_i w_i || X_i W^T - X_i W_i^T ||^2`` (``X_i``: the layer's inputs in expert i on its task, one row per
sample and position), whose closed form is::

    G_i   = X_i^T X_i / rows_i                                    (Gram of the layer inputs, [in, in])
    G~_i  = alpha G_i + (1 - alpha) diag(G_i)                     (off-diagonal entries scaled by alpha)
    W^T   = (sum_i w_i G~_i)^{-1}  sum_i w_i G~_i W_i^T

``alpha = 1`` is the exact regression solution; ``alpha = 0`` keeps the diagonals only, i.e. a per-input-
feature weighted average of the columns of ``W_i`` with weights ``w_i G_i[j, j]``.

Which layers: every ``nn.Linear`` (the ViT's ``qkv``, ``proj``, ``fc1``, ``fc2``) and, with ``conv: true``
(default), every ``nn.Conv2d`` with ``groups = 1``, zero padding and numeric padding (all of the ResNets'
convolutions and the ViT's patch embedding). A convolution is a linear map of its unfolded input patches,
``out[:, :, l] = W.reshape(out, in * kh * kw) @ unfold(x)[:, :, l]``, so ``X_i`` holds the patches (one row
per image and output position) and RegMean applies unchanged. The paper merges the linear layers of
transformers only; the convolution case is this extension (without it the ResNets, whose backbones have no
Linear layer, would be merged by plain averaging). Everything else (biases, BatchNorm/LayerNorm
parameters, class/position embeddings, BN running statistics) is averaged with the weights ``w_i``, as the
paper does for non-linear-layer parameters; biases are averaged, not regressed.

Defaults and their sources:

* ``alpha = 0.9``. The paper introduces the scaling of the non-diagonal items as a hyperparameter; the
  authors' released configs use 0.1 (T5, DeBERTa on emotion) and no scaling (= 1.0, GLUE RoBERTa/DistilBERT),
  FusionBench's CLIP config uses 0.6. 0.9 is this project's default; tune it for your pool.
* samples per task: 256 when the spec's ``data`` section does not set ``samples_per_task`` (FusionBench's
  ``num_regmean_examples``; the authors' configs use 1,000), from the ``train`` split unless ``data.split``
  says otherwise; forwarded in batches of ``data.batch_size``. The merge record lists the count used.
* Grams are averaged over rows (as FusionBench does) so that the model weights ``w_i`` alone set the
  experts' balance; with equal sample counts (the default) this equals the paper's ``X_i^T X_i`` exactly
  (the common factor cancels). As in the authors' code, ``w_i`` multiplies ``G~_i``.
* ``ridge = 1e-6``: used only when ``sum_i w_i G~_i`` is singular or ill-conditioned (condition number above
  1e12, e.g. an input feature that is zero on every sample: a dead ReLU channel). Then ``mu I`` with
  ``mu = ridge * mean(diag(sum_i w_i G~_i))`` is added to every ``w_i G~_i`` (scaled by ``w_i``), which
  sends input directions no expert's data excites to the weighted average of the ``W_i`` instead of to
  arbitrary values; mu grows tenfold until the system is well conditioned. Layers that needed it are
  logged.

Statistics are computed with each expert in eval mode (BatchNorm uses its running statistics), in float64.

Known result (resnet_s zoo; mnist, mnist_rot90, digits, shapes; ``joint`` BN; 100 samples per task):
RegMean loses to plain averaging (avg acc 62.6 vs 73.2) because of a property of the zoo, not of this
code: the experts' task vectors are large (10-44% of the pretrained weights' norm per layer), so the
merged network's layer inputs differ from every expert's, and the exact regression
(``W^T = (sum G~_i)^{-1} sum G~_i W_i^T`` is not a convex combination) moves the blocks' 3x3 convolutions
2.6-4.1 x ``||W_avg - W_0||`` away from the average in directions the experts' inputs barely excite; it
halves the regression error on the experts' own inputs (0.43 vs 0.79 of ``||X_i tau_i||^2``, mean over
8 layers x 4 tasks, also on held-out images) but not on the merged network's inputs (0.91 vs 0.81), and the
gap grows with the task vectors (RegMean - average: -0.8 / -5.1 / -10.6 points with the
task vectors scaled by 0.25 / 0.5 / 1). Accuracy falls with ``alpha`` (73.7 at 0, 71.2 at
0.1, 65.8 at 0.5, 62.6 at 0.9 and 1.0); Grams from 1,000 samples, from train-mode BN, from the experts with
jointly re-estimated BN, from the averaged model, centred Grams or sequential (merged-input) Grams all stay
at 58-63. The stem (whose inputs are the images, identical for all) regressed alone costs 0.4 points.
Measured in ``/work/runs/regmean-investigation``; the toy case is in ``tests/test_regmean.py``
(``test_exact_on_the_experts_inputs_but_outside_their_outputs_off_them``).

Memory: experts are streamed one at a time. The merge holds, besides the current expert, the weighted sum
of all tensors (one model-sized accumulator, used for the averaged tensors and the ridge target) and, per
merged layer, ``sum_i w_i G~_i`` (``[in, in]``) and ``sum_i w_i G~_i W_i^T`` (``[in, out]``): constant in
the pool size. For ``resnet_s`` the largest Gram is 576 x 576 (a 3x3 convolution over 64 channels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from mergelab.methods.base import MethodParams
from mergelab.methods.data_informed import DataInformedMethod
from mergelab.methods.data_informed.context import MergeContext
from mergelab.methods.data_informed.fisher import (
    check_own_task_pool,
    expert_samples,
    load_expert_module,
    use_default_samples,
)

log = logging.getLogger(__name__)

#: Samples per task when the spec's data section does not set ``samples_per_task`` (FusionBench default).
DEFAULT_SAMPLES = 256
#: Condition number above which the ridge is added.
MAX_CONDITION = 1e12


class RegMeanParams(MethodParams):
    alpha: float = Field(0.9, description="scale of the Grams' off-diagonal entries, in [0, 1]")
    conv: bool = Field(True, description="also merge Conv2d layers (linear over unfolded patches)")
    ridge: float = Field(1e-6, description="relative ridge, used only for singular / ill-conditioned Grams")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {v}")
        return v

    @field_validator("ridge")
    @classmethod
    def _ridge_range(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"ridge must be finite and > 0, got {v}")
        return v


# ------------------------------------------------------------------------------------- Gram matrices


def _conv_supported(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def regmean_layers(model: nn.Module, conv: bool = True) -> dict[str, nn.Module]:
    """The modules RegMean merges: ``nn.Linear`` and (with ``conv``) ungrouped zero-padded ``nn.Conv2d``."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (conv and isinstance(m, nn.Conv2d) and _conv_supported(m)):
            found[name] = m
    return found


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` with ``output = X @ W.reshape(out, -1).T`` (+ bias): features last, one row per position."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [B, in * kh * kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"RegMean does not handle {type(module).__name__}")


@dataclass
class Gram:
    """``sum`` of ``X^T X`` over ``rows`` input rows (float64); ``matrix`` is the per-row mean."""

    sum: torch.Tensor
    rows: int

    @property
    def matrix(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


@torch.no_grad()
def gram_matrices(model: nn.Module, x: torch.Tensor, *, batch_size: int = 64, conv: bool = True) -> dict[str, Gram]:
    """Gram matrices of the inputs of ``model``'s RegMean layers over the samples ``x`` (forward hooks).

    The model runs in eval mode (restored afterwards). Layers never called get no entry.
    """
    layers = regmean_layers(model, conv)
    grams: dict[str, Gram] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            rows = layer_inputs(module, inputs[0].detach())
            rows = rows if rows.dtype == torch.float64 else rows.float()
            g = (rows.T @ rows).double()
            if name in grams:
                grams[name].sum += g
                grams[name].rows += rows.shape[0]
            else:
                grams[name] = Gram(g, rows.shape[0])

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha G + (1 - alpha) diag(G)``: off-diagonal entries scaled by ``alpha``, diagonal unchanged."""
    if alpha == 1.0:
        return gram.clone()
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


# ------------------------------------------------------------------------------------------- merging


def _solve(
    a: torch.Tensor, b: torch.Tensor, avg_t: torch.Tensor, ridge: float, name: str
) -> tuple[torch.Tensor, float]:
    """``(a + mu I)^{-1} (b + mu avg_t)`` with ``mu = 0`` unless ``a`` is singular / ill-conditioned."""
    scale = float(a.diagonal().mean())
    if not scale > 0:  # no input energy at all: nothing to regress on
        return avg_t.clone(), math.inf
    mu = 0.0
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(12):
        m = a + mu * eye if mu else a
        cond = float(torch.linalg.cond(m))
        if math.isfinite(cond) and cond <= MAX_CONDITION:
            sol = torch.linalg.solve(m, b + mu * avg_t if mu else b)
            if torch.isfinite(sol).all():
                return sol, mu / scale
        mu = ridge * scale if mu == 0 else mu * 10
    raise ValueError(f"RegMean: the Gram system of layer {name!r} stays singular even with a ridge of {mu / scale:g}")


class RegMeanAccumulator:
    """Streaming RegMean: ``add`` one expert (its tensors and Grams) at a time, then ``result``.

    ``grams`` maps a layer name ``L`` to the Gram of its inputs; ``L + ".weight"`` must be in the state
    (``[out, in]`` or a convolution ``[out, in, kh, kw]``). Other tensors are averaged with the weights.
    """

    def __init__(self, alpha: float = 0.9, ridge: float = 1e-6) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(ridge) and ridge > 0):
            raise ValueError(f"ridge must be finite and > 0, got {ridge}")
        self.alpha, self.ridge = alpha, ridge
        self._avg: dict[str, torch.Tensor] = {}
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._names: list[str] | None = None
        self._layers: set[str] | None = None
        self._weight = 0.0
        self._count = 0
        #: layer -> relative ridge that was needed (filled by :meth:`result`)
        self.ridged: dict[str, float] = {}

    def add(self, state: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor | Gram], weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"RegMean needs positive model weights, got {weight}")
        if self._names is None:
            self._names = list(state)
            self._dtypes = {n: t.dtype for n, t in state.items()}
            self._layers = set(grams)
        else:
            if set(state) != set(self._names):
                raise ValueError(f"expert {self._count} has different tensors from the first expert")
            if set(grams) != self._layers:
                raise ValueError(f"expert {self._count} has Grams for different layers from the first expert")
        for name in self._names:
            t = state[name]
            if not t.is_floating_point():
                self._avg.setdefault(name, t.clone())
                continue
            if name in self._avg:
                self._avg[name].add_(t.double(), alpha=weight)
            else:
                self._avg[name] = t.double() * weight
        for layer, g in grams.items():
            key = f"{layer}.weight"
            if key not in state:
                raise ValueError(f"Gram for layer {layer!r} but no tensor {key!r} in the state")
            w = state[key].double()
            w_t = w.reshape(w.shape[0], -1).T  # [in, out]
            g = (g.matrix if isinstance(g, Gram) else g).double().to(w.device)
            if g.shape != (w_t.shape[0], w_t.shape[0]):
                raise ValueError(f"Gram of {layer!r} is {tuple(g.shape)}, the layer has {w_t.shape[0]} inputs")
            gt = reduce_off_diagonal(g, self.alpha).mul_(weight)
            if layer in self._a:
                self._a[layer].add_(gt)
                self._b[layer].add_(gt @ w_t)
            else:
                self._a[layer] = gt
                self._b[layer] = gt @ w_t
        self._weight += weight
        self._count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self._names is None:
            raise ValueError("no experts were added")
        out: dict[str, torch.Tensor] = {}
        for name in self._names:
            t = self._avg[name]
            out[name] = (t / self._weight if t.is_floating_point() else t).to(self._dtypes[name])
        for layer in sorted(self._a):
            key = f"{layer}.weight"
            avg = self._avg[key] / self._weight
            avg_t = avg.reshape(avg.shape[0], -1).T
            sol, rel = _solve(self._a[layer], self._b[layer], avg_t, self.ridge, layer)
            if rel:
                self.ridged[layer] = rel
            out[key] = sol.T.reshape(avg.shape).to(self._dtypes[key])
        if self.ridged:
            log.info("regmean: ridge used for %d layer(s) with singular/ill-conditioned Grams: %s", len(self.ridged),
                     ", ".join(f"{k} ({v:g})" for k, v in self.ridged.items()))
        return out


def regmean_merge(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    coefficients: Sequence[float] | None = None,
    *,
    alpha: float = 0.9,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """RegMean for one layer: ``W^T = (sum_i c_i G~_i)^{-1} sum_i c_i G~_i W_i^T`` (``W_i``: ``[out, in, ...]``)."""
    acc = RegMeanAccumulator(alpha, ridge)
    cs = [1.0] * len(weights) if coefficients is None else list(coefficients)
    if not (len(weights) == len(grams) == len(cs)):
        raise ValueError("weights, grams and coefficients must have the same length")
    for w, g, c in zip(weights, grams, cs):
        acc.add({"layer.weight": w}, {"layer": g}, c)
    return acc.result()["layer.weight"]


def regmean_merge_states(
    states: Iterable[Mapping[str, torch.Tensor]],
    grams: Iterable[Mapping[str, torch.Tensor | Gram]],
    weights: Sequence[float] | None = None,
    *,
    alpha: float = 0.9,
    ridge: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """RegMean over whole state dicts (consumed in step: they may be generators); other tensors averaged."""
    acc = RegMeanAccumulator(alpha, ridge)
    for i, (state, g) in enumerate(zip(states, grams, strict=True)):
        acc.add(state, g, 1.0 if weights is None else float(weights[i]))
    return acc.result()


# ----------------------------------------------------------------------------------- method plumbing


def run_regmean(context: MergeContext, params: RegMeanParams) -> dict[str, torch.Tensor]:
    """The ``regmean`` method: see the module docstring."""
    check_own_task_pool(context, "regmean")
    use_default_samples(context, DEFAULT_SAMPLES)
    split = context.split("train")
    acc = RegMeanAccumulator(params.alpha, params.ridge)
    for i in tqdm(range(len(context.experts)), desc="regmean", unit="expert", disable=not context.progress):
        expert = context.experts[i]
        state, model, head = load_expert_module(context, i)
        x, _ = expert_samples(context, i, head, split)
        grams = gram_matrices(model, x, batch_size=context.data.batch_size, conv=params.conv)
        log.info("regmean: expert %d (%s): Grams of %d layer(s) on %d %s samples", i, expert.task, len(grams),
                 len(x), split)
        acc.add(state, {k: Gram(v.sum.cpu(), v.rows) for k, v in grams.items()}, expert.weight)
        del model, grams
    return acc.result()


METHODS = [
    DataInformedMethod(
        name="regmean",
        summary="RegMean (Jin et al. 2023): closed-form least-squares merge of each linear/conv layer from "
        "the Gram matrices of its inputs; other tensors averaged",
        params=RegMeanParams,
        run=run_regmean,
        min_models=1,
    )
]

__all__ = [
    "DEFAULT_SAMPLES",
    "Gram",
    "METHODS",
    "RegMeanAccumulator",
    "RegMeanParams",
    "gram_matrices",
    "layer_inputs",
    "reduce_off_diagonal",
    "regmean_layers",
    "regmean_merge",
    "regmean_merge_states",
    "run_regmean",
]
