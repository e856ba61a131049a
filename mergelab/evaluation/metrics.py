"""Classification metrics of a backbone + head on a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn


class Metrics(BaseModel):
    """``accuracy`` = fraction of argmax-correct predictions, ``loss`` = mean cross-entropy (nats), over ``n``."""

    model_config = ConfigDict(frozen=True)

    accuracy: float
    loss: float
    n: int


@torch.no_grad()
def classifier_outputs(
    backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(correct [N] bool, loss [N] float64)`` on CPU, with both modules in eval mode."""
    device = next(backbone.parameters()).device
    modes = backbone.training, head.training
    backbone.eval()
    head.eval()
    correct, losses = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = head(backbone(xb)).float()
        correct.append((logits.argmax(1) == yb).cpu())
        losses.append(F.cross_entropy(logits, yb, reduction="none").double().cpu())
    backbone.train(modes[0])
    head.train(modes[1])
    if not correct:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    return torch.cat(correct), torch.cat(losses)


def evaluate_classifier(
    backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> Metrics:
    """Accuracy and mean cross-entropy of ``head(backbone(x))`` against ``y`` (eval mode, no gradients)."""
    correct, losses = classifier_outputs(backbone, head, x, y, batch_size)
    n = len(correct)
    if n == 0:
        return Metrics(accuracy=float("nan"), loss=float("nan"), n=0)
    return Metrics(accuracy=correct.double().mean().item(), loss=losses.mean().item(), n=n)
