"""Permutation alignment of two networks by weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git
Re-Basin: Merging Models modulo Permutation Symmetries", section 3.2).

Hidden units of a layer can be reordered -- permuting the layer's output axis and the next layer's input
axis -- without changing the function. Weight matching looks for permutations ``P_l`` of model B's hidden
units that bring it closest to model A in weight space, i.e. that maximise

    J(P) = sum_l < W_l^A, P_l W_l^B P_{l-1}^T >_F

(plus the same terms for biases and normalisation parameters). The problem is NP-hard as a whole but each
``P_l`` alone is a linear assignment problem: with all other permutations fixed,
``J = sum_{i,j} C_l[i, j] [P_l]_{i j} + const`` where ``C_l = sum_{tensors t on P_l} A_t B_t'^T`` (``A_t``:
the tensor with the ``P_l`` axis moved first and the rest flattened; ``B_t'``: B's tensor with every *other*
permuted axis already permuted). It is solved exactly by ``scipy.optimize.linear_sum_assignment``; the
permutations are visited in a random order (coordinate ascent) until a full sweep changes nothing, or
``max_iter`` sweeps. ``J`` never decreases, so the loop terminates.

Permutation specs
-----------------
A :class:`PermutationSpec` maps each tensor name to one entry per axis: the name of the permutation acting on
that axis, or ``None``. Convention: applying ``perm`` gives ``new[..., i, ...] = old[..., perm[p][i], ...]``
on every axis tied to ``p``; the recovered permutation of :func:`weight_matching` is applied to model B.

* :func:`mlp_permutation_spec` -- ``nn.Sequential`` of ``Linear`` layers with element-wise activations (and
  optional ``BatchNorm1d`` / ``LayerNorm`` / leading ``Flatten``): one permutation per hidden layer.
* :func:`resnet_permutation_spec` -- :class:`mergelab.models.resnet.ResNetBackbone`. Residual additions
  force the block input and output to share one ordering, so every identity-shortcut chain is one
  permutation ("stream"): the stem and all of stage 1 share ``stream0``; a stage whose first block has a
  projection shortcut (``shortcut.conv`` 1x1 + ``shortcut.bn``) starts a new stream ``stream{s}`` shared by
  all its blocks. Each block's inner channels (``conv1`` out / ``bn1`` / ``conv2`` in) have their own
  permutation ``layer{s}.{i}.inner``. Conv weights ``[out, in, k, k]`` are permuted on axes 0 (out) and 1
  (in); BatchNorm ``weight``, ``bias``, ``running_mean``, ``running_var`` on their only axis;
  ``num_batches_tracked`` is untouched.
* The backbone's output features are the last stream. For a bare backbone that stream is left unpermuted
  by default (``permute_output=False``) so the aligned backbone computes *identical features* and any
  task head stays valid; for a :class:`mergelab.models.Classifier` it is permuted and the head's weight
  columns follow (``head.weight[:, perm]``), which preserves the classifier's function and aligns the last
  stage too. :func:`permute_head` applies an output permutation to a separate head.

Running statistics are permuted (needed for function preservation) but, by default, do not enter ``J``
(``match_buffers=False``): they are statistics, not weights. Architectures without a spec (e.g. the ViT,
whose attention heads need a head-wise symmetry) raise :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergelab.analysis.landscape import linear_interpolation
from mergelab.errors import SpecError, TensorMismatchError
from mergelab.models.resnet import BasicBlock, ConvBN, ResNetBackbone

logger = logging.getLogger(__name__)

Permutation = dict[str, torch.Tensor]
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class UnsupportedArchitectureError(SpecError):
    """No permutation spec is known for this architecture."""


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation acts on which axis of which tensor.

    Attributes:
        axes: tensor name -> tuple with one entry per axis: a permutation name or ``None``.
        output_perm: permutation acting on the module's output features, if those are permuted.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    output_perm: str | None = None
    groups: dict[str, list[tuple[str, int]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[tuple[str, int]]] = {}
        for name, per_axis in self.axes.items():
            for axis, p in enumerate(per_axis):
                if p is not None:
                    groups.setdefault(p, []).append((name, axis))
        object.__setattr__(self, "groups", groups)

    @property
    def perm_names(self) -> list[str]:
        """Permutation names in order of first appearance."""
        return list(self.groups)

    def sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size of every permutation, checked for consistency against ``state``'s tensor shapes."""
        sizes: dict[str, int] = {}
        for name, per_axis in self.axes.items():
            if name not in state:
                raise TensorMismatchError(f"permutation spec names tensor {name!r}, which the state does not have")
            shape = tuple(state[name].shape)
            if len(shape) != len(per_axis):
                raise TensorMismatchError(f"tensor {name!r} has {len(shape)} axes, the spec gives {len(per_axis)}")
            for axis, p in enumerate(per_axis):
                if p is None:
                    continue
                if sizes.setdefault(p, shape[axis]) != shape[axis]:
                    raise TensorMismatchError(
                        f"permutation {p!r} has size {sizes[p]} but axis {axis} of {name!r} has size {shape[axis]}"
                    )
        return sizes

    def prefixed(self, prefix: str) -> PermutationSpec:
        """The same spec for the module mounted under ``prefix`` (e.g. ``"backbone."``)."""
        return PermutationSpec({prefix + k: v for k, v in self.axes.items()}, self.output_perm)


# ----------------------------------------------------------------------------------------- builders
_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity, nn.Dropout,
)


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU, bias: bool = True) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), act, ..., Linear(sizes[-2], sizes[-1])`` (no activation at the end)."""
    if len(sizes) < 2:
        raise SpecError("mlp needs at least an input and an output size")
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def mlp_permutation_spec(model: nn.Sequential, permute_output: bool = False) -> PermutationSpec:
    """Spec of an MLP ``nn.Sequential``: permutation ``h{k}`` on the outputs of the k-th hidden ``Linear``.

    ``Linear.weight [out, in]`` gets ``(h_k, h_{k-1})``, ``bias`` ``(h_k,)``; ``BatchNorm1d`` / ``LayerNorm``
    (over the last axis only) following a Linear take its permutation. The input and -- unless
    ``permute_output`` -- the output of the last Linear are not permuted.
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedArchitectureError(f"mlp_permutation_spec expects nn.Sequential, got {type(model).__name__}")
    children = list(model.named_children())
    linear_idx = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
    if not linear_idx:
        raise UnsupportedArchitectureError("MLP has no nn.Linear layer")
    axes: dict[str, tuple[str | None, ...]] = {}
    cur: str | None = None
    k = 0
    for i, (name, m) in enumerate(children):
        if isinstance(m, nn.Linear):
            last = i == linear_idx[-1]
            out = None if (last and not permute_output) else f"h{k}"
            k += 1
            axes[f"{name}.weight"] = (out, cur)
            if m.bias is not None:
                axes[f"{name}.bias"] = (out,)
            cur = out
        elif isinstance(m, nn.BatchNorm1d) or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1):
            if cur is not None:
                for t, _ in list(m.named_parameters()) + list(m.named_buffers()):
                    if not t.endswith("num_batches_tracked"):
                        axes[f"{name}.{t}"] = (cur,)
        elif isinstance(m, nn.Flatten) and i < linear_idx[0]:
            continue
        elif isinstance(m, _ELEMENTWISE):
            continue
        else:
            raise UnsupportedArchitectureError(
                f"MLP layer {name!r} ({type(m).__name__}) is not supported: use Linear, element-wise "
                "activations, BatchNorm1d, LayerNorm, or a leading Flatten"
            )
    return PermutationSpec(axes, output_perm=cur if permute_output else None)


def _bn_axes(prefix: str, p: str | None) -> dict[str, tuple[str | None, ...]]:
    return {f"{prefix}.{t}": (p,) for t in ("weight", "bias", "running_mean", "running_var")}


def resnet_permutation_spec(backbone: nn.Module, permute_output: bool = False) -> PermutationSpec:
    """Spec of a :class:`mergelab.models.resnet.ResNetBackbone` (streams and inner permutations, module doc).

    Built by walking the module structure (stem, ``layer1..3`` of ``BasicBlock`` s with identity or
    ``ConvBN`` projection shortcuts); raises :class:`UnsupportedArchitectureError` on anything else.
    """
    if not isinstance(backbone, ResNetBackbone):
        raise UnsupportedArchitectureError(f"expected a ResNetBackbone, got {type(backbone).__name__}")
    axes: dict[str, tuple[str | None, ...]] = {}
    cur = "stream0"
    axes["stem.conv.weight"] = (cur, None, None, None)
    axes.update(_bn_axes("stem.bn", cur))
    stage_names = [n for n, _ in backbone.named_children() if n.startswith("layer")]
    for stage_name in stage_names:
        for i, block in enumerate(getattr(backbone, stage_name)):
            if not isinstance(block, BasicBlock):
                raise UnsupportedArchitectureError(f"{stage_name}.{i} is a {type(block).__name__}, not a BasicBlock")
            pre = f"{stage_name}.{i}"
            inner = f"{pre}.inner"
            axes[f"{pre}.conv1.weight"] = (inner, cur, None, None)
            axes.update(_bn_axes(f"{pre}.bn1", inner))
            if isinstance(block.shortcut, nn.Identity):
                out = cur
            elif isinstance(block.shortcut, ConvBN):
                out = f"stream{stage_name[len('layer'):]}"
                axes[f"{pre}.shortcut.conv.weight"] = (out, cur, None, None)
                axes.update(_bn_axes(f"{pre}.shortcut.bn", out))
            else:
                raise UnsupportedArchitectureError(f"{pre}.shortcut ({type(block.shortcut).__name__}) is not supported")
            axes[f"{pre}.conv2.weight"] = (out, inner, None, None)
            axes.update(_bn_axes(f"{pre}.bn2", out))
            cur = out
    if not permute_output:  # the last stream is the feature axis: keep it fixed
        axes = {k: tuple(None if p == cur else p for p in v) for k, v in axes.items()}
    return PermutationSpec(axes, output_perm=cur if permute_output else None)


def permutation_spec(model: nn.Module, permute_output: bool | None = None) -> PermutationSpec:
    """The spec of a supported model: MLP ``nn.Sequential``, ``ResNetBackbone``, or a ``Classifier`` of either.

    For a ``Classifier`` (``.backbone`` + ``.head``) the backbone output is permuted and ``head.weight``'s
    input axis follows (``permute_output`` defaults to True); for a bare backbone/MLP it defaults to False.
    Raises :class:`UnsupportedArchitectureError` otherwise (e.g. for ``vit_s``).
    """
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if isinstance(backbone, nn.Module) and isinstance(head, nn.Linear):
        inner = permutation_spec(backbone, True if permute_output is None else permute_output).prefixed("backbone.")
        axes = dict(inner.axes)
        if inner.output_perm is not None:
            axes["head.weight"] = (None, inner.output_perm)
        return PermutationSpec(axes, output_perm=None)
    po = bool(permute_output)

    if isinstance(model, ResNetBackbone):
        return resnet_permutation_spec(model, po)
    if isinstance(model, nn.Sequential):
        return mlp_permutation_spec(model, po)
    raise UnsupportedArchitectureError(
        f"no permutation spec for {type(model).__name__}: weight matching supports MLPs (nn.Sequential of "
        "Linear + element-wise activations) and the ResNet family (resnet_s/m/l), or a Classifier of them; "
        "transformers such as vit_s are not supported"
    )


# ------------------------------------------------------------------------------------ permutations
def _permute_tensor(
    t: torch.Tensor,
    per_axis: Sequence[str | None],
    perm: Mapping[str, torch.Tensor],
    skip: tuple[str, int] | None = None,
) -> torch.Tensor:
    """``t`` with every permuted axis reindexed, except axis ``skip[1]`` (the one being solved for)."""
    for axis, p in enumerate(per_axis):
        if p is None or (skip is not None and axis == skip[1]):
            continue
        t = t.index_select(axis, perm[p].to(t.device))
    return t


def apply_permutation(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with every spec'd axis permuted: ``new[..., i, ...] = old[..., perm[p][i], ...]``.

    Tensors not in the spec are passed through (same objects). Missing permutations are an error.
    """
    missing = [p for p in spec.perm_names if p not in perm]
    if missing:
        raise SpecError(f"permutation lacks {missing}")
    spec.sizes(state)
    out = dict(state)
    for name, per_axis in spec.axes.items():
        out[name] = _permute_tensor(state[name], per_axis, perm).contiguous()
    return out


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """``{p: argsort(perm[p])}``: applying ``perm`` then its inverse restores the original state."""
    return {p: torch.argsort(v) for p, v in perm.items()}


def identity_permutation(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Permutation:
    """``{p: arange(n_p)}`` for every permutation of ``spec``."""
    return {p: torch.arange(n) for p, n in spec.sizes(state).items()}


def random_permutation(spec: PermutationSpec, state: Mapping[str, torch.Tensor], seed: int = 0) -> Permutation:
    """A uniformly random permutation for every permutation name (for tests and null baselines)."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes(state).items()}


def permute_head(head: nn.Linear, spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> nn.Linear:
    """A copy of ``head`` whose input columns follow the backbone's output permutation (``W[:, perm]``).

    Use with a backbone spec built with ``permute_output=True`` (``spec.output_perm`` set).
    """
    if spec.output_perm is None:
        raise SpecError("the spec does not permute the output features (build it with permute_output=True)")
    new = deepcopy(head)
    with torch.no_grad():
        new.weight.copy_(head.weight.index_select(1, perm[spec.output_perm].to(head.weight.device)))
    return new


def _match_keys(spec: PermutationSpec, match_buffers: bool) -> set[str]:
    if match_buffers:
        return set(spec.axes)
    return {k for k in spec.axes if not k.endswith(_BUFFER_SUFFIXES)}


def matching_objective(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor] | None = None,
    match_buffers: bool = False,
) -> float:
    """``J(P) = sum_t <A_t, P(B)_t>`` over the spec's matched tensors (float64), ``P`` = identity if ``None``."""
    pb = apply_permutation(state_b, spec, perm) if perm is not None else state_b
    return float(sum(float((state_a[k].double() * pb[k].double()).sum()) for k in _match_keys(spec, match_buffers)))


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    perm_spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    match_buffers: bool = False,
) -> Permutation:
    """Permutation of B's units maximising ``J(P) = sum_l <W_l^A, P_l W_l^B P_{l-1}^T>`` (Git Re-Basin).

    Coordinate ascent: each sweep visits the permutations in a random order (``seed``) and replaces ``P_l``
    by the exact linear-assignment maximiser of ``J`` with the others fixed; it stops after a sweep without
    improvement or ``max_iter`` sweeps. Returns ``{name: LongTensor perm}`` to use with
    ``apply_permutation(state_b, perm_spec, perm)``. Arithmetic in float64 on CPU.

    Args:
        match_buffers: also match BatchNorm running statistics (default: weights only; they are permuted by
            :func:`apply_permutation` regardless).
        init: starting permutation (default identity).
    """
    sizes = perm_spec.sizes(state_a)
    if perm_spec.sizes(state_b) != sizes:
        raise TensorMismatchError("state_a and state_b have different permutation sizes")
    keys = _match_keys(perm_spec, match_buffers)
    a64 = {k: state_a[k].detach().to("cpu", torch.float64) for k in keys}
    b64 = {k: state_b[k].detach().to("cpu", torch.float64) for k in keys}
    perm: Permutation = {p: torch.arange(n) for p, n in sizes.items()}
    if init is not None:
        perm.update({p: torch.as_tensor(v, dtype=torch.long).cpu() for p, v in init.items()})
    names = [p for p in perm_spec.perm_names if any(k in keys for k, _ in perm_spec.groups[p])]
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        improved = False
        for idx in rng.permutation(len(names)):
            p = names[idx]
            n = sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for k, axis in perm_spec.groups[p]:
                if k not in keys:
                    continue
                wa = a64[k].movedim(axis, 0).reshape(n, -1)
                wb = _permute_tensor(b64[k], perm_spec.axes[k], perm, skip=(p, axis)).movedim(axis, 0).reshape(n, -1)
                cost += wa @ wb.T
            c = cost.numpy()
            _, col = linear_sum_assignment(c, maximize=True)
            rows = np.arange(n)
            old_val = float(c[rows, perm[p].numpy()].sum())
            new_val = float(c[rows, col].sum())
            if new_val > old_val + 1e-12 * max(1.0, abs(old_val)):
                perm[p] = torch.as_tensor(col, dtype=torch.long)
                improved = True
        if not improved:
            break
    else:
        logger.warning("weight matching: no convergence after %d sweeps", max_iter)
    logger.info("weight matching: %d permutation(s), %d sweep(s)", len(names), sweeps)
    return perm


def weight_distance(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
) -> float:
    """``||theta_A - theta_B||_2`` over floating tensors (``keys``, default all shared floating tensors)."""
    if keys is None:
        keys = [k for k, v in state_a.items() if v.is_floating_point() and k in state_b]
    names = list(keys)
    return float(sum(float(((state_a[k].double() - state_b[k].double()) ** 2).sum()) for k in names)) ** 0.5


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    permute_output: bool | None = None,
    max_iter: int = 100,
    seed: int = 0,
    match_buffers: bool = False,
) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to match ``model_a`` (weight matching).

    The copy computes the same function as ``model_b`` (for a bare backbone the output features are kept in
    place unless ``permute_output=True``; for a ``Classifier`` the head follows). ``model_b`` is not modified.
    Supported: see :func:`permutation_spec`.
    """
    spec = permutation_spec(model_a, permute_output)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in spec.axes:
        if k not in sb or sb[k].shape != sa[k].shape:
            raise TensorMismatchError(f"model_b does not match model_a's architecture at tensor {k!r}")
    perm = weight_matching(sa, sb, spec, max_iter=max_iter, seed=seed, match_buffers=match_buffers)
    before = weight_distance(sa, sb, spec.axes)
    aligned = deepcopy(model_b)
    aligned.load_state_dict(apply_permutation(sb, spec, perm))
    logger.info("align: distance %.6g -> %.6g", before, weight_distance(sa, aligned.state_dict(), spec.axes))
    return aligned


def aligned_interpolation(
    model_a: nn.Module, model_b: nn.Module, tasks: Any, alphas: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(naive, aligned)`` :class:`mergelab.analysis.landscape.PathResult` s of ``(1-a) A + a B`` before and
    after aligning B to A; ``kwargs`` go to :func:`mergelab.analysis.landscape.linear_interpolation`.
    """
    aligned = align(model_a, model_b)
    return (
        linear_interpolation(model_a, model_b, tasks, alphas, **kwargs),
        linear_interpolation(model_a, aligned, tasks, alphas, **kwargs),
    )


__all__ = [
    "PermutationSpec",
    "UnsupportedArchitectureError",
    "align",
    "aligned_interpolation",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "matching_objective",
    "mlp",
    "mlp_permutation_spec",
    "permutation_spec",
    "permute_head",
    "random_permutation",
    "resnet_permutation_spec",
    "weight_distance",
    "weight_matching",
]
