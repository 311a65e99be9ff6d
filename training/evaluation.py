"""Score whole datasets with a model: the numbers every report and threshold is made of.

:func:`score_batch` turns one forward pass into every score (energy, MSP, MaxLogit and the
FeatureNorm of each tapped block); :func:`score_dataset` runs it over a dataset. The service
calls :func:`score_batch` too, which is what makes training's evaluation and the served
scores identical for the same image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training import scores
from training.models.base import TappedClassifier
from training.progress import progress


@torch.no_grad()
def score_batch(model: TappedClassifier, images: torch.Tensor,
                taps: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """All scores for a batch of preprocessed images, from one forward pass.

    Keys: ``logits``, ``energy``, ``msp``, ``max_logit``, ``pred`` and ``featurenorm/<block>``
    for each tapped block. The model must already be in eval mode.
    """
    feats = model.forward_features(images, taps)
    out = {
        "logits": feats.logits.float(),
        "energy": scores.energy(feats.logits),
        "msp": scores.msp(feats.logits),
        "max_logit": scores.max_logit(feats.logits),
        "pred": feats.logits.argmax(dim=1),
    }
    for name, fmap in feats.blocks.items():
        out[f"featurenorm/{name}"] = scores.featurenorm(fmap)
    return out


def score_dataset(model: TappedClassifier, dataset: Dataset, device: torch.device,
                  taps: Iterable[str] = (), batch_size: int = 256,
                  num_workers: int = 0, desc: str = "scoring") -> dict[str, np.ndarray]:
    """:func:`score_batch` over ``dataset`` (items ``(image, label)``), plus ``label``;
    ``desc`` names the progress bar."""
    taps = list(taps)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for images, labels in progress(loader, desc):
            batch = score_batch(model, images.to(device, non_blocking=True), taps)
            batch["label"] = torch.as_tensor(labels)
            for key, value in batch.items():
                if key != "logits":
                    parts.setdefault(key, []).append(value.cpu().numpy())
    finally:
        model.train(was_training)
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}
