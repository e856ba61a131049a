"""Optimizer construction from a spec's hyperparameters.

* ``sgd``:   ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` — weight decay is the coupled L2 term
  added to the gradient (applied to all parameters, including BatchNorm/LayerNorm scales, which is what lets
  it set the effective learning rate ``eta / ||theta||^2`` of scale-invariant layers);
* ``adam``:  ``torch.optim.Adam(lr, betas=(momentum, beta2), weight_decay)`` (coupled L2);
* ``adamw``: ``torch.optim.AdamW(lr, betas=(momentum, beta2), weight_decay)`` (decoupled decay).

For Adam/AdamW the spec's ``momentum`` is ``beta1``. The learning rate is set per step from the schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    beta2: float = 0.999,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` (see the module docstring for the mapping)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, beta2), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, beta2), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def set_hyperparameters(
    optimizer: torch.optim.Optimizer, momentum: float, weight_decay: float, beta2: float = 0.999, nesterov: bool = False
) -> None:
    """Overwrite the hyperparameters of every param group (after ``load_state_dict`` restored old ones)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay
        if "betas" in group:
            group["betas"] = (momentum, beta2)
        else:
            group["momentum"] = momentum
            group["nesterov"] = nesterov
