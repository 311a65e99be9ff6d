"""Wide ResNet (Zagoruyko & Komodakis 2016) as used by Outlier Exposure, Energy and GReg.

WRN-40-2 is GReg's CIFAR architecture; GReg's code uses the OE/Energy definition with
dropout 0, reproduced here with the same parameter names (``block{1,2,3}.layer.{i}``,
``convShortcut``, final ``bn1`` and ``fc``) so that checkpoints from that lineage load.

The blocks are pre-activation, so a block's output is the raw residual sum before any
BatchNorm or ReLU; FeatureNorm's own ReLU rectifies it (the FeatureNorm paper taps WRN blocks
at the same place).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.models.base import TappedClassifier, global_avg_pool


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # A changing shape takes the shortcut from the pre-activated input, as in the original.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _Stage(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                               stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )


class WideResNet(TappedClassifier):
    def __init__(
        self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10, drop_rate: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _Stage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _Stage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _Stage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.register_blocks(f"block{s}.layer.{i}" for s in (1, 2, 3) for i in range(n))

    def stem(self, x):
        return self.conv1(x)

    def pool(self, x):
        return global_avg_pool(F.relu(self.bn1(x)))

    def classify(self, h):
        return self.fc(h)
