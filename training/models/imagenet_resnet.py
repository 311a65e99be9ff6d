"""torchvision's ImageNet ResNets, adopted into the tapped-block interface.

The torchvision module's children are re-registered on this wrapper under their own names,
so parameter names are exactly torchvision's (``conv1``, ``layer4.2.conv3``, ``fc``) and a
torchvision state dict loads as is. Weights are never fetched from a hub: pass a local file
as ``pretrained`` to the registry instead.
"""

from __future__ import annotations

import torch

from training.models.base import TappedClassifier

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class TorchvisionResNet(TappedClassifier):
    def __init__(self, arch: str = "resnet50", num_classes: int = 1000):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown torchvision ResNet {arch!r}; choose one of {ARCHS}")
        # Imported here: a process that builds no torchvision model (the service with a
        # CIFAR bundle) never loads torchvision and its compiled kernels.
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.register_blocks(
            f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in range(len(getattr(self, f"layer{s}")))
        )

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def pool(self, x):
        return torch.flatten(self.avgpool(x), 1)

    def classify(self, h):
        return self.fc(h)
