"""Learning-rate schedules as a pure function of the global step.

``lr(t) = lr * factor(t)`` for ``t = 0 .. steps-1`` (the learning rate used by optimizer step ``t``), with
``W = round(warmup_frac * steps)`` warmup steps and ``m = min_lr_ratio``:

* warmup (all schedules): ``factor(t) = (t + 1) / W`` for ``t < W``;
* ``constant``: ``factor(t) = 1``;
* ``cosine``:   ``factor(t) = m + (1 - m) (1 + cos(pi p)) / 2``, ``p = (t - W) / (steps - W)``;
* ``wsd`` (warmup-stable-decay): stable ``factor = 1`` until ``steps - D`` with ``D = round(decay_frac *
  steps)``, then a cooldown ``factor(t) = m + (1 - m) (1 - s(p))`` over the fraction of the decay done,
  ``p = (t - (steps - D) + 1) / D`` (reaching ``m`` on the last step), with the linear shape ``s(p) = p``;
* ``wsd_sqrt``: the same with the square-root shape ``s(p) = sqrt(p)``, the "1 - sqrt" cooldown of Hagele
  et al. 2024 ("Scaling laws and compute-optimal training beyond fixed training durations"), which the
  optimizer-bias paper (Zhang et al. 2025, THEORY.md section 2) uses in its WSD bifurcation protocol. It
  falls faster at first: a quarter of the way into the decay the factor is ``m + (1 - m) / 2`` (linear:
  ``m + 3 (1 - m) / 4``).

Because the schedule is a function of the global step (not of a stateful scheduler object), a run resumed
from a checkpoint at step ``s`` with the same spec follows exactly the same learning rates.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "wsd", "wsd_sqrt")
WSD_SHAPES = {"wsd": "linear", "wsd_sqrt": "sqrt"}  # the WSD schedules by the shape of their cooldown


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
    p = min(1.0, (step - start + 1) / decay)
    return 1.0 - (1.0 - m) * (math.sqrt(p) if schedule == "wsd_sqrt" else p)  # = m + (1 - m) (1 - s(p))
