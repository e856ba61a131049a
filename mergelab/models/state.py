"""Backbone and head weights on disk.

Format (chosen so that ``mergelab merge`` can merge experts' backbones file by file):

* ``backbone.safetensors`` holds the backbone's state dict with its own names (no prefix), e.g.
  ``stem.conv.weight``, ``layer1.0.bn1.running_mean``, ``blocks.0.attn.qkv.weight``. BatchNorm running
  statistics (``running_mean``, ``running_var``) are included, so a merge averages them like any parameter;
  the integer counters ``*.num_batches_tracked`` are left out (unused with a fixed BN momentum, and integer
  tensors do not average meaningfully).
* ``head.safetensors`` holds the task head: ``weight`` ``[num_classes, feature_dim]`` and ``bias``.

To merge experts, give ``mergelab merge`` their ``backbone.safetensors`` files as models and the pretrained
``<root>/zoo/<arch>/pretrained/backbone.safetensors`` as base; the merged output folder is itself a valid
backbone for ``mergelab evaluate`` (which pairs it with each task's expert head). Expert folders are not HF
folders (no ``model.safetensors``), so the merge engine rejects them by name rather than merging heads.

Readers also accept a single state dict whose keys carry ``backbone.`` / ``head.`` prefixes, a merged
output folder (``model.safetensors`` or sharded safetensors + index), and ``.pt`` / ``.bin`` files: all
non-directory-layout inputs go through :func:`mergelab.checkpoints.load_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.errors import CheckpointError, NonFiniteError, TensorMismatchError

BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"
_SKIPPED_SUFFIX = "num_batches_tracked"

PathLike = str | os.PathLike[str]


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict as contiguous CPU tensors, without ``num_batches_tracked`` counters."""
    return {
        name: t.detach().to("cpu").contiguous().clone()
        for name, t in backbone.state_dict().items()
        if not name.endswith(_SKIPPED_SUFFIX)
    }


def head_state(head: nn.Linear) -> dict[str, torch.Tensor]:
    """``{"weight", "bias"}`` of a head as contiguous CPU tensors."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in head.state_dict().items()}


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed, if any key has it; else ``state`` unchanged."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_backbone_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state>") -> None:
    """Copy ``state`` into ``backbone`` after checking names, shapes and finiteness.

    Keys may carry a ``backbone.`` prefix (then ``head.*`` keys are ignored). Missing
    ``num_batches_tracked`` counters are fine; any other missing or extra tensor, shape mismatch or
    non-finite value raises an error naming ``source`` and the tensor. Floating tensors are cast to the
    module's dtype (a merged fp16/bf16 backbone loads into a float32 model).
    """
    state = _strip_prefix(state, "backbone.")
    own = backbone.state_dict()
    expected = {k for k in own if not k.endswith(_SKIPPED_SUFFIX)}
    given = {k for k in state if not k.endswith(_SKIPPED_SUFFIX)}
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
        raise TensorMismatchError(f"{source}: does not match the backbone architecture: " + "; ".join(parts))
    new_state = {}
    for name in own:
        if name not in state or name.endswith(_SKIPPED_SUFFIX):
            new_state[name] = own[name]
            continue
        t = state[name]
        if tuple(t.shape) != tuple(own[name].shape):
            raise TensorMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the backbone expects {tuple(own[name].shape)}"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{source}: tensor {name!r} holds NaN or Inf values")
        new_state[name] = t.to(own[name].dtype)
    backbone.load_state_dict(new_state, strict=True)


def resolve_backbone_file(path: PathLike) -> Path:
    """The file or folder to read a backbone from: ``<dir>/backbone.safetensors`` if present, else ``path``."""
    p = Path(path)
    if p.is_dir() and (p / BACKBONE_FILE).is_file():
        return p / BACKBONE_FILE
    return p


def read_backbone_state(path: PathLike) -> dict[str, torch.Tensor]:
    """Backbone tensors from an expert / pretrained folder, a merged folder, or a weights file."""
    p = resolve_backbone_file(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return load_state_dict(p)


def read_head_state(path: PathLike) -> dict[str, torch.Tensor]:
    """Head tensors (``weight``, ``bias``) from an expert folder or a weights file (``head.`` prefix allowed)."""
    p = Path(path)
    if p.is_dir():
        p = p / HEAD_FILE
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    state = _strip_prefix(load_state_dict(p), "head.")
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise TensorMismatchError(f"{p}: a head needs exactly 'weight' [C, F] and 'bias' [C], got {sorted(state)}")
    return state


def load_head(path: PathLike, feature_dim: int | None = None) -> nn.Linear:
    """An ``nn.Linear`` head read from ``path``; checks its input size against ``feature_dim`` if given."""
    state = read_head_state(path)
    num_classes, in_features = state["weight"].shape
    if feature_dim is not None and in_features != feature_dim:
        raise TensorMismatchError(f"{path}: head expects {in_features} features, the backbone gives {feature_dim}")
    head = nn.Linear(in_features, num_classes)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head


def save_backbone(backbone: nn.Module, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write :func:`backbone_state` as one safetensors file (atomic)."""
    save_state_dict(backbone_state(backbone), path, metadata=dict(metadata or {}))


def save_head(head: nn.Linear, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write :func:`head_state` as one safetensors file (atomic)."""
    save_state_dict(head_state(head), path, metadata=dict(metadata or {}))
