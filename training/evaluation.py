"""Score whole datasets with a model: the numbers every report and threshold is made of.

:func:`score_batch` turns one forward pass into every detector's scores (the table of
:mod:`training.detectors`), a :class:`DetectorScores`; :func:`score_dataset` runs it over a
dataset. The service calls :func:`score_batch` too, which is what makes training's
evaluation and the served scores identical for the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.detectors import BY_NAME, DETECTORS, Detector
from training.models.base import TappedClassifier
from training.progress import progress

A = TypeVar("A", torch.Tensor, np.ndarray)


@dataclass
class DetectorScores(Generic[A]):
    """Every detector's scores for a batch (tensors) or a dataset (arrays).

    ``on_logits`` holds the detectors on the logits by name; ``per_block`` the detectors on
    a block by name, then by tapped block (detectors with the same score function share one
    dict, computed once). :meth:`of` picks a detector's scores.
    """

    pred: A
    on_logits: dict[str, A]
    per_block: dict[str, dict[str, A]]
    logits: A | None = field(default=None, repr=False)  # float32, batches only
    label: A | None = None  # datasets only

    def of(self, detector: Detector | str, selected: str | None = None,
           last: str | None = None) -> A:
        """The scores of ``detector`` (or its name); one on a block reads the ``selected``
        or the ``last`` block, as its table entry says."""
        d = BY_NAME[detector] if isinstance(detector, str) else detector
        block = d.block_name(selected, last)
        return self.on_logits[d.name] if block is None else self.per_block[d.name][block]

    def map(self, fn: Callable[[A], np.ndarray]) -> DetectorScores:
        """The same scores with ``fn`` applied to each array (the logits left out)."""
        return DetectorScores(
            pred=fn(self.pred), on_logits={k: fn(v) for k, v in self.on_logits.items()},
            per_block={k: {b: fn(v) for b, v in blocks.items()}
                       for k, blocks in self.per_block.items()},
            label=None if self.label is None else fn(self.label))


def _concat(parts: list[DetectorScores]) -> DetectorScores[np.ndarray]:
    first = parts[0]
    return DetectorScores(
        pred=np.concatenate([p.pred for p in parts]),
        on_logits={k: np.concatenate([p.on_logits[k] for p in parts]) for k in first.on_logits},
        per_block={k: {b: np.concatenate([p.per_block[k][b] for p in parts]) for b in blocks}
                   for k, blocks in first.per_block.items()},
        label=None if first.label is None else np.concatenate([p.label for p in parts]))


@torch.no_grad()
def score_batch(model: TappedClassifier, images: torch.Tensor,
                taps: Iterable[str] = ()) -> DetectorScores[torch.Tensor]:
    """Every detector's scores for a batch of preprocessed images, from one forward pass;
    the detectors on a block at each block of ``taps``. The model must already be in eval
    mode."""
    feats = model.forward_features(images, taps)
    on_logits = {d.name: d.score(feats.logits) for d in DETECTORS if d.block is None}
    by_function: dict[Callable, dict[str, torch.Tensor]] = {}
    per_block = {}
    for d in DETECTORS:
        if d.block is not None:
            if d.score not in by_function:
                by_function[d.score] = {b: d.score(fmap) for b, fmap in feats.blocks.items()}
            per_block[d.name] = by_function[d.score]
    return DetectorScores(pred=feats.logits.argmax(dim=1), on_logits=on_logits,
                          per_block=per_block, logits=feats.logits.float())


def score_dataset(model: TappedClassifier, dataset: Dataset, device: torch.device,
                  taps: Iterable[str] = (), batch_size: int = 256,
                  num_workers: int = 0, desc: str = "scoring") -> DetectorScores[np.ndarray]:
    """:func:`score_batch` over ``dataset`` (items ``(image, label)``), plus ``label``;
    ``desc`` names the progress bar."""
    taps = list(taps)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    parts: list[DetectorScores[np.ndarray]] = []
    try:
        for images, labels in progress(loader, desc):
            batch = score_batch(model, images.to(device, non_blocking=True), taps)
            batch.label = torch.as_tensor(labels)
            parts.append(batch.map(lambda t: t.cpu().numpy()))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError(f"{desc}: the dataset is empty")
    return _concat(parts)
