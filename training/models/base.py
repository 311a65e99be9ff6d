"""The one interface every oodserve model implements: logits and tapped blocks in one pass.

OOD scores need more than logits: energy and MSP come from the logits, FeatureNorm from the
feature map of a chosen block, and GReg+'s sampler from the pooled penultimate feature. Hooks
would work, but they hide state in the module and are awkward under DistributedDataParallel,
so each model instead spells out its forward pass as ``stem -> named blocks -> pool -> fc``
and :meth:`TappedClassifier.forward_features` walks that list once, keeping the outputs of
the blocks it was asked for. ``forward`` returns plain logits so that the models stay drop-in
``nn.Module`` classifiers for DDP, optimisers and ``torch.compile``.

Block names are the modules' own attribute paths (``layer3.2``, ``block2.layer.5``), so a
name in a bundle manifest can always be found again with ``model.get_submodule(name)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Features:
    """Everything one forward pass yields.

    ``penultimate`` is the pooled vector that the final linear layer sees; ``blocks`` maps
    each requested block name to that block's output feature map (N, C, H, W).
    """

    logits: torch.Tensor
    penultimate: torch.Tensor
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)


class TappedClassifier(nn.Module):
    """Base class: a classifier whose body is an ordered list of named blocks.

    Subclasses build their modules, call :meth:`register_blocks` with the block paths in
    execution order, and implement :meth:`stem`, :meth:`pool` and :meth:`classify`; this
    class provides the tapped forward pass and name checks.
    """

    def register_blocks(self, names: Iterable[str]) -> None:
        self._blocks = [(name, self.get_submodule(name)) for name in names]

    def block_modules(self) -> list[tuple[str, nn.Module]]:
        """The blocks in execution order, as ``(attribute path, module)`` pairs."""
        return self._blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's output -> the penultimate feature vector (N, D)."""
        raise NotImplementedError

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.block_modules()]

    def check_blocks(self, names: Iterable[str]) -> list[str]:
        """Return ``names`` as a list, or raise ``ValueError`` naming the unknown ones."""
        names = list(names)
        known = set(self.block_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"unknown block(s) {unknown} for {type(self).__name__}; "
                f"the blocks are {self.block_names}"
            )
        return names

    def forward_features(self, x: torch.Tensor, taps: Iterable[str] = ()) -> Features:
        """One pass: logits, penultimate features and the outputs of the ``taps`` blocks."""
        wanted = set(self.check_blocks(taps))
        tapped: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for name, block in self.block_modules():
            x = block(x)
            if name in wanted:
                tapped[name] = x
        h = self.pool(x)
        return Features(logits=self.classify(h), penultimate=h, blocks=tapped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _, block in self.block_modules():
            x = block(x)
        return self.classify(self.pool(x))


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
