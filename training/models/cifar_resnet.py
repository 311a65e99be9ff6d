"""CIFAR-style ResNets for 32x32 inputs.

Two families, because the literature uses both:

* :class:`CifarResNet` is the ResNet of He et al. 2016, section 4.2 (depth 6n+2: ResNet-20,
  -56, ...): 16/32/64 channels and a parameter-free "option A" shortcut. Its parameter names
  (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``) are the ones of
  the pretrained weights in ``shared/checkpoints``, so those load without renaming.
* :class:`CifarResNet18` is the 3x3-stem ResNet-18 used by the FeatureNorm paper and by most
  CIFAR OOD work (64..512 channels, 1x1-conv "option B" shortcuts, no max-pool).

Every BasicBlock is a tap point; its output is taken after the residual addition and the
final ReLU, as in the FeatureNorm reference code for ResNet-18.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.base import TappedClassifier, global_avg_pool


class _PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the channels; no parameters."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_stages(
    model: nn.Module, in_planes: int, widths: list[int], depths: list[int], shortcut: str
) -> list[str]:
    names = []
    for stage, (planes, n) in enumerate(zip(widths, depths), start=1):
        blocks = []
        for i in range(n):
            stride = 2 if (i == 0 and stage > 1) else 1
            blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
            in_planes = planes
            names.append(f"layer{stage}.{i}")
        model.add_module(f"layer{stage}", nn.Sequential(*blocks))
    return names


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _CifarStem(TappedClassifier):
    """Shared ends of both families: conv-BN-ReLU stem, global pooling, ``linear`` head."""

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def pool(self, x):
        return global_avg_pool(x)

    def classify(self, h):
        return self.linear(h)


class CifarResNet(_CifarStem):
    """He et al.'s CIFAR ResNet of depth 6n+2 (ResNet-20: n=3, ResNet-56: n=9)."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        names = _make_stages(self, 16, [16, 32, 64], [n, n, n], shortcut="A")
        self.linear = nn.Linear(64, num_classes)
        _init_weights(self)
        self.register_blocks(names)


class CifarResNet18(_CifarStem):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        names = _make_stages(self, 64, [64, 128, 256, 512], [2, 2, 2, 2], shortcut="B")
        self.linear = nn.Linear(512, num_classes)
        _init_weights(self)
        self.register_blocks(names)
