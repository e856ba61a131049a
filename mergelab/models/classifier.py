"""Backbone + per-task head.

A task model is ``head(backbone(x))``: the shared backbone produces penultimate features of size
``feature_dim`` and the head is one ``nn.Linear(feature_dim, num_classes)`` per task. Merging acts on the
backbone only; every task keeps its own expert's head.
"""

from __future__ import annotations

import torch
from torch import nn


def make_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """A classification head ``logits = W f + b`` with ``W: [num_classes, feature_dim]`` (PyTorch init)."""
    return nn.Linear(feature_dim, num_classes)


class Classifier(nn.Module):
    """``head(backbone(x))``; the two sub-modules keep their own state-dict namespaces."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
