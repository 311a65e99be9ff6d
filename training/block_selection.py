"""FeatureNorm block selection: jigsaw pseudo-OOD images and NormRatio (Yu et al., CVPR 2023).

A block whose FeatureNorm separates ID from OOD images should respond strongly to an ID
image and weakly to the same image with its content scrambled. For every candidate block
``B`` and ID training image ``x``, NormRatio is ``FN(x; B) / FN(jigsaw(x); B)``; the ratios
are averaged over images (a mean of per-image ratios, as in the reference code) and the
block with the largest mean is selected. No OOD data is involved, so the choice cannot leak
test-set information.

Choices (see METHOD.md part 2 and the README):

* **Grid and sizes not divisible by 3.** The image is cut into 3x3 tiles of
  ``floor(H/3) x floor(W/3)`` pixels laid over the *centred* region they cover, the tiles are
  permuted, and the leftover border rows and columns (at most 2 pixels in each direction;
  1 on each side of a 32-pixel CIFAR image) keep the image's own pixels. The reference code
  instead fills the top-left region and leaves a black border; a black frame is itself an
  unnatural feature that changes block responses, so it would not measure what shuffling
  does. The permutation is drawn per image from a seeded generator (it may be the identity,
  with probability 1/9!, as in the reference).
* **Normalisation.** Jigsaw moves pixels without changing their values, and the model's
  input normalisation is per channel, so shuffling commutes with it: the images are
  normalised exactly as in training (the reference code forgets to normalise, which we do
  not copy) and shuffled as tensors.
* **Images.** The ID training images outside the held-out validation split, without
  augmentation (the evaluation transform), optionally capped at a seeded random subset.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from training.detectors import FEATURENORM
from training.evaluation import score_batch
from training.models import TappedClassifier
from training.progress import progress

GRID = 3
# Guards the division when a block is silent (all-zero after ReLU) on a jigsaw image.
_EPS = 1e-12


def jigsaw(images: torch.Tensor, generator: torch.Generator, grid: int = GRID) -> torch.Tensor:
    """Shuffle a ``grid x grid`` arrangement of tiles in each image of (N, C, H, W).

    The tiles cover the centred ``grid * floor(H / grid)`` by ``grid * floor(W / grid)``
    region; the border outside it is left as it is.
    """
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of {h}x{w} pixels are too small for a {grid}x{grid} jigsaw")
    top, left = (h - th * grid) // 2, (w - tw * grid) // 2
    region = images[:, :, top:top + th * grid, left:left + tw * grid]
    tiles = (region.reshape(n, c, grid, th, grid, tw)
             .permute(0, 2, 4, 1, 3, 5)
             .reshape(n, grid * grid, c, th, tw))
    order = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1)
    shuffled = tiles[torch.arange(n).unsqueeze(1), order.to(images.device)]
    out = images.clone()
    out[:, :, top:top + th * grid, left:left + tw * grid] = (
        shuffled.reshape(n, grid, grid, c, th, tw)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(n, c, th * grid, tw * grid))
    return out


@torch.no_grad()
def norm_ratios(model: TappedClassifier, dataset: Dataset, device: torch.device,
                blocks: Iterable[str] | None = None, seed: int = 0, batch_size: int = 256,
                num_workers: int = 0) -> dict[str, float]:
    """Mean per-image NormRatio of each block (default: every block) over ``dataset``.

    ``dataset`` yields ``(image, label)`` with images preprocessed as for evaluation.
    """
    blocks = model.check_blocks(model.block_names if blocks is None else blocks)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    sums = dict.fromkeys(blocks, 0.0)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for images, _ in progress(loader, "NormRatio per block"):
            images = images.to(device)
            plain = score_batch(model, images, blocks)
            shuffled = score_batch(model, jigsaw(images, generator), blocks)
            for b in blocks:
                ratio = (plain.of(FEATURENORM, b).double()
                         / shuffled.of(FEATURENORM, b).double().clamp_min(_EPS))
                sums[b] += float(ratio.sum())
            count += images.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("block selection needs at least one ID image")
    return {b: sums[b] / count for b in blocks}


def select_block(ratios: dict[str, float]) -> str:
    """The block with the largest NormRatio (the first one on a tie, i.e. the shallowest)."""
    if not ratios:
        raise ValueError("no NormRatios to select from")
    return max(ratios, key=lambda b: ratios[b])
