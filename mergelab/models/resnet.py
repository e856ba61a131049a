"""ResNet-style CNN backbones for 28x28x1 inputs: small-scale analogues of ResNet-18/50/152.

Layout (all convolutions 3x3 unless noted, BatchNorm after every convolution, ReLU activations)::

    stem      conv(1 -> w0, stride 2) -> BN -> ReLU            28x28 -> 14x14
    layer1    ``depth`` basic blocks at width w0, stride 1      14x14
    layer2    ``depth`` basic blocks at width w1, first stride 2 -> 7x7
    layer3    ``depth`` basic blocks at width w2, first stride 2 -> 4x4
    pool      global average pool -> flatten                    features of size w2

A basic block computes ``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))`` where the shortcut is the
identity, or ``BN(conv1x1(x))`` when the stride or width changes (He et al. 2016, option B).

The stride-2 stem keeps one expert's fine-tuning to a few seconds on a CPU core; depth is what separates
the family members (``resnet_s``: 1 block per stage, ``resnet_m``: 2, ``resnet_l``: 4).

Parameter names are stable and are part of the checkpoint format: ``stem.conv.weight``, ``stem.bn.*``,
``layer{1,2,3}.{i}.conv{1,2}.weight``, ``layer{1,2,3}.{i}.bn{1,2}.*``, ``layer{s}.0.shortcut.{conv,bn}.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    """``BN(conv(x))`` with a bias-free convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projection shortcut when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = ConvBN(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Feature extractor ``[B, 1, 28, 28] -> [B, widths[-1]]`` (penultimate features, after global pooling).

    Args:
        depth: basic blocks per stage (three stages).
        widths: channel widths of the three stages; the stem uses ``widths[0]``.
        in_channels: input channels (1 for the task suite).
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 32, 64), in_channels: int = 1) -> None:
        super().__init__()
        if depth < 1 or len(widths) != 3:
            raise ValueError("ResNetBackbone needs depth >= 1 and three stage widths")
        self.depth = depth
        self.widths = tuple(int(w) for w in widths)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(widths[0]))
        self.stem.add_module("relu", nn.ReLU())
        cin = widths[0]
        for stage, width in enumerate(widths, start=1):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and stage > 1) else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.feature_dim = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
