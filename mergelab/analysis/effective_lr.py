"""Effective learning rate of normalised (scale-invariant) layers, the route by which weight decay enters the
effective noise scale (THEORY.md section 2; van Laarhoven 2017, "L2 regularization versus batch and weight
normalization"; Zhang et al. 2025, the optimizer-bias paper).

A convolution whose output goes straight into a BatchNorm is *scale-invariant* in its weight ``W``: the
network's output is unchanged under ``W -> c W`` (``c > 0``), so the gradient is orthogonal to ``W`` and scales
as ``1 / ||W||``, and a step of size ``eta`` turns ``W`` by an angle ~ ``eta / ||W||^2``. The layer's
*effective learning rate* is

    ``eta_eff,l = eta / ||W_l||_F^2``.

Without weight decay the norms grow and ``eta_eff`` decays; weight decay shrinks them and keeps it up. Over
the normalised layers of a model, ``eta_eff`` is summarised by the **geometric mean** of the per-layer values,
``exp(mean_l log eta_eff,l) = eta / exp(mean_l log ||W_l||^2)``: every layer's relative change counts equally,
and a small layer (a 1x1 shortcut, the stem) with a tiny norm cannot dominate as it would an arithmetic mean.
The matching noise scale is ``T_eff = eta_eff / (B (1 - beta))`` next to the proxy ``T = eta / (B (1 - beta))``
(:func:`mergelab.experiments.noise_study.noise_scale` of ``eta_eff``).

Which convolutions are normalised is read from the data flow, not from names: one forward pass with hooks
records each ``Conv1d/2d/3d``'s output tensor and each BatchNorm's input tensor; a convolution is normalised
when its output tensor *is* (same object, unmodified: the same autograd version counter, so an in-place
activation in between does not count) the input of a BatchNorm. A convolution followed by anything else
first (an activation, an addition) is not scale-invariant and is left out; so are BatchNorm's own affine
parameters and linear layers.

:func:`normalized_layer_lrs` is the wider tracer the estimators' report uses: weights of Conv and Linear layers
feeding a BatchNorm, LayerNorm or GroupNorm (a weight with a bias only when the norm removes it), traced by
tensor identity alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergelab.analysis.estimators import model_device, modules_in_mode

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def normalised_convolutions(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names (``model.named_modules()``) of the convolutions whose output feeds a BatchNorm directly, found by
    one forward pass of ``example`` in eval mode under ``no_grad`` (the model's mode and buffers are kept)."""
    outputs: dict[tuple[int, int], str] = {}  # (id, version) of each conv output -> conv name
    alive: list[torch.Tensor] = []  # keeps the outputs alive during the pass, so their ids stay unique
    found: list[str] = []
    hooks = []

    def conv_hook(name: str):
        def hook(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            alive.append(out)
            outputs[(id(out), out._version)] = name
        return hook

    def bn_hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        name = outputs.get((id(inp[0]), inp[0]._version)) if inp else None
        if name is not None and name not in found:
            found.append(name)

    for name, m in model.named_modules():
        if isinstance(m, CONVS):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def effective_learning_rates(model: nn.Module, lr: float, example: torch.Tensor) -> dict[str, float]:
    """``{conv name: lr / ||W||_F^2}`` over :func:`normalised_convolutions` (module docstring)."""
    modules = dict(model.named_modules())
    out = {}
    for name in normalised_convolutions(model, example):
        sq = float(modules[name].weight.detach().double().pow(2).sum())
        out[name] = lr / sq if sq > 0 else math.inf
    return out


def mean_effective_lr(rates: dict[str, float]) -> float:
    """Geometric mean of the per-layer effective learning rates (NaN without normalised layers)."""
    values = [v for v in rates.values() if v > 0]
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class NormalizedLayerLR:
    """A weight whose output feeds a normalisation layer directly (scale-invariant), and its
    effective learning rate ``eta_eff = eta / ||W||_F^2``."""

    name: str
    norm_layer: str
    norm_kind: str
    norm2: float
    eta_eff: float


def normalized_layer_lrs(model: nn.Module, example_input: torch.Tensor, lr: float) -> list[NormalizedLayerLR]:
    """Effective learning rates ``eta / ||W||^2`` of the weights followed by BatchNorm/LayerNorm.

    The pairs are found by tracing one forward pass on ``example_input`` (eval mode, no gradients): a
    Conv/Linear module whose output tensor is *itself* the input of a BatchNorm/LayerNorm/GroupNorm module.
    Only then is the loss invariant to rescaling that weight (``W -> c W``), the case where SGD's step on ``W``
    acts like a step of ``eta / ||W||^2`` on its direction (van Laarhoven 2017; Zhang et al. 2025); weight
    decay keeps ``||W||`` from growing and the effective rate from vanishing. A pre-norm transformer's
    LayerNorms read a residual sum, so its Linear layers are not listed. A trailing bias would break the
    invariance, so weights with a bias are listed only if the norm removes it (BatchNorm/GroupNorm do).
    """
    weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep traced outputs alive so their ids are not reused
    pairs: list[tuple[str, str, str]] = []
    names = {m: k for k, m in model.named_modules()}
    hooks = []

    def out_hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = names[mod]
            alive.append(out)

    def in_hook(mod: nn.Module, inp: Any) -> None:
        if inp and isinstance(inp[0], torch.Tensor) and id(inp[0]) in produced:
            pairs.append((produced[id(inp[0])], names[mod], type(mod).__name__))

    for m in model.modules():
        if isinstance(m, weighted):
            hooks.append(m.register_forward_hook(out_hook))
        elif isinstance(m, norms):
            hooks.append(m.register_forward_pre_hook(in_hook))
    try:
        with torch.no_grad(), modules_in_mode(model, False):
            model(example_input.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    out: list[NormalizedLayerLR] = []
    for wname, nname, kind in pairs:
        mod = modules[wname]
        if getattr(mod, "bias", None) is not None and isinstance(modules[nname], nn.LayerNorm):
            continue
        norm2 = float(mod.weight.detach().double().pow(2).sum())
        out.append(NormalizedLayerLR(f"{wname}.weight", nname, kind, norm2, lr / norm2 if norm2 > 0 else float("inf")))
    return out
