"""Learning-rate schedules as a pure function of the global step.

``lr(t) = lr * factor(t)`` for ``t = 0 .. steps-1`` (the learning rate used by optimizer step ``t``), with
``W = round(warmup_frac * steps)`` warmup steps and ``m = min_lr_ratio``:

* warmup (all schedules): ``factor(t) = (t + 1) / W`` for ``t < W``;
* ``constant``: ``factor(t) = 1``;
* ``cosine``:   ``factor(t) = m + (1 - m) (1 + cos(pi p)) / 2``, ``p = (t - W) / (steps - W)``;
* ``wsd`` (warmup-stable-decay): stable ``factor = 1`` until ``steps - D`` with ``D = round(decay_frac *
  steps)``, then linear decay ``factor(t) = 1 - (1 - m) (t - (steps - D) + 1) / D``, reaching ``m`` on the
  last step.

Because the schedule is a function of the global step (not of a stateful scheduler object), a run resumed
from a checkpoint at step ``s`` with the same spec follows exactly the same learning rates.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "wsd")


def lr_factor(
    step: int,
    steps: int,
    schedule: str = "cosine",
    warmup_frac: float = 0.0,
    decay_frac: float = 0.2,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at global step ``step`` (0-based) of a ``steps``-step run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    warmup = round(warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    m = min_lr_ratio
    if schedule == "cosine":
        p = (step - warmup) / max(1, steps - warmup)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    decay = max(1, round(decay_frac * steps))
    start = steps - decay
    if step < start:
        return 1.0
    return 1.0 - (1.0 - m) * min(1.0, (step - start + 1) / decay)
