"""Recomputing BatchNorm running statistics of a (merged) backbone.

A merged backbone's BN ``running_mean`` / ``running_var`` are merged like any parameter (e.g. averaged),
which is generally *not* the statistics of the merged network's own activations: averaging weights changes
the activation distribution (variance collapse, Jordan et al. 2023 "REPAIR"). ``reset_bn_statistics``
re-estimates them: reset, then forward ``num_batches`` training batches in train mode with cumulative
averaging (``momentum=None``), no gradients, and restore each layer's momentum. Only BN buffers change.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def reset_bn_statistics(
    backbone: nn.Module, x: torch.Tensor, batch_size: int = 128, num_batches: int = 20, seed: int = 0
) -> int:
    """Re-estimate BN running statistics of ``backbone`` on up to ``num_batches`` random batches of ``x``.

    Returns the number of BatchNorm layers reset (0 for a BN-free backbone, which is left untouched).
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) == 0:
        return 0
    device = next(backbone.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)[: batch_size * num_batches]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = backbone.training
    backbone.train()
    for i in range(0, len(order), batch_size):
        backbone(x[order[i : i + batch_size]].to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    backbone.train(was_training)
    return len(bns)
