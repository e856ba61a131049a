"""The optimisation loop shared by pretraining and fine-tuning.

Step ``t`` (global, 0-based): set ``lr = base_lr * factor(t)`` (see :mod:`mergelab.training.schedule`),
take batch ``t`` from :class:`~mergelab.training.sampler.BatchSampler` (augmented by
:func:`~mergelab.training.augment.random_affine` with ``(seed, t)`` when enabled), minimise the mean
cross-entropy of ``model(x)``, record the loss. Everything random is a function of ``(seed, t)``, so running
steps ``[0, K)`` in one go or as ``[0, k)`` + ``[k, K)`` with restored model and optimizer state gives the
same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.training.augment import random_affine
from mergelab.training.sampler import BatchSampler
from mergelab.training.schedule import lr_factor


class TrainingDivergedError(MergeLabError):
    """The training loss became NaN or infinite (usually: the learning rate is too large)."""


@dataclass(frozen=True)
class LoopSettings:
    """Hyperparameters of the loop itself (the optimizer carries the rest)."""

    lr: float
    steps: int
    batch_size: int
    seed: int
    augment: bool = False
    schedule: str = "cosine"
    warmup_frac: float = 0.0
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, self.steps, self.schedule, self.warmup_frac, self.decay_frac, self.min_lr_ratio)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: LoopSettings,
    start: int = 0,
    end: int | None = None,
    on_step_end: Callable[[int], None] | None = None,
) -> list[float]:
    """Run global steps ``start .. end-1`` (``end`` defaults to ``settings.steps``); return their losses.

    ``x``/``y`` may live on CPU; batches are moved to the model's device. ``on_step_end(s)`` is called with
    the number of completed steps ``s`` (e.g. to save a checkpoint).
    """
    end = settings.steps if end is None else end
    device = next(model.parameters()).device
    if device.type != "cpu":
        x, y = x.to(device), y.to(device)
    sampler = BatchSampler(len(x), settings.batch_size, settings.seed)
    model.train()
    losses: list[float] = []
    for step in range(start, end):
        lr = settings.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sampler.indices(step).to(x.device)
        xb, yb = x[idx], y[idx]
        if settings.augment:
            xb = random_affine(xb, settings.seed, step)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if value != value or value in (float("inf"), float("-inf")):
            raise TrainingDivergedError(
                f"training diverged: the loss became {value} at step {step} (lr {lr:g}); lower the learning rate"
            )
        losses.append(value)
        if on_step_end is not None:
            on_step_end(step + 1)
    return losses
