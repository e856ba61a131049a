"""A tiny pretraining pool and pretraining on it, shared by the test modules that build a small resnet_s zoo.

The real pretraining pool (31 classes) takes seconds to build and minutes to learn; tests only need *a*
pretrained backbone to fine-tune from. :func:`tiny_pool` is 4 synthetic classes (which quadrant of the image
is bright) and :func:`pretrain_tiny` pretrains on it inside a monkeypatch, so the real pool is untouched.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import mergelab.tasks
from mergelab.models.pretraining import PretrainConfig, PretrainResult, pretrain
from mergelab.tasks import TaskData


def tiny_pool(n: int = 256, seed: int = 0) -> TaskData:
    """``n`` noisy 28x28 images, class = bright quadrant; the first 3/4 train, the rest test."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, r * 14 : (r + 1) * 14, q * 14 : (q + 1) * 14] += 1.0
    k = 3 * n // 4
    return TaskData("pool", 4, x[:k], y[:k], x[k:], y[k:], "tiny synthetic pool")


def pretrain_tiny(root, config: PretrainConfig, *, n: int = 256, seed: int = 0, arch: str = "resnet_s",
                  force: bool = False) -> PretrainResult:
    """Pretrain ``arch`` into cache root ``root`` on :func:`tiny_pool` ``(n, seed)`` with ``config``.

    Another pool ``seed`` with the same config gives another backbone under the same config id (as another
    machine's torch would); ``force`` replaces the cached one even then."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mergelab.tasks, "pretraining_pool", partial(tiny_pool, n, seed))
        return pretrain(arch, root, config, force=force)
