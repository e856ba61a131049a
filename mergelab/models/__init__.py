"""The model zoo: ResNet-style CNNs at three depths and a small ViT, backbone + per-task head.

Public API::

    list_archs, arch_info, build_backbone          the architecture registry   (registry.py)
    Classifier, make_head                          backbone + Linear head      (classifier.py)
    save_backbone, save_head, load_backbone_state,
    read_backbone_state, load_head                 weights on disk             (state.py)
    fit_linear_probe, extract_features             linear probes               (probe.py)
    pretrain, ensure_pretrained, PretrainConfig    pretraining                 (pretraining.py, imported lazily)
"""

from __future__ import annotations

import importlib
from typing import Any

from mergelab.models.classifier import Classifier, make_head
from mergelab.models.device import default_device
from mergelab.models.probe import extract_features, fit_linear_probe
from mergelab.models.registry import arch_info, build_backbone, list_archs
from mergelab.models.state import (
    BACKBONE_FILE,
    HEAD_FILE,
    load_backbone_state,
    load_head,
    read_backbone_state,
    save_backbone,
    save_head,
)

_LAZY = {"pretrain", "ensure_pretrained", "read_pretrained", "load_pretrained_backbone", "PretrainConfig", "PretrainResult"}

__all__ = [
    "BACKBONE_FILE",
    "HEAD_FILE",
    "Classifier",
    "arch_info",
    "build_backbone",
    "default_device",
    "extract_features",
    "fit_linear_probe",
    "list_archs",
    "load_backbone_state",
    "load_head",
    "make_head",
    "read_backbone_state",
    "save_backbone",
    "save_head",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("mergelab.models.pretraining"), name)
    raise AttributeError(f"module 'mergelab.models' has no attribute {name!r}")
