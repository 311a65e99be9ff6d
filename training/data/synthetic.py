"""The synthetic noise OOD sets of the literature, as an indexable dataset.

The recipes are those of the Outlier Exposure code (Hendrycks, Mazeika & Dietterich, "Deep
Anomaly Detection with Outlier Exposure", ICLR 2019), which later OOD papers reuse. That code
works in [-1, 1] input space; here every recipe is stated in [0, 1] pixel space, per pixel and
channel:

* ``gaussian``: ``clip(0.5 + 0.25 * N(0, 1), 0, 1)``, i.e. N(0, 0.5) clipped to [-1, 1].
* ``uniform``: U[0, 1], i.e. U[-1, 1].
* ``rademacher``: 0 or 1 with probability 1/2 each, i.e. -1 or +1.
* ``blobs``: Bernoulli(0.7), Gaussian blur with sigma 1.5, then values below 0.75 set to 0.
  The blur is done per channel with a separable kernel truncated at 4 sigma and edge
  replication (the defaults of the skimage call the original uses); the original passes the
  H x W x 3 array with ``multichannel=False`` and so also blurs across the three channels.

Images are quantised to uint8 (rounded) and returned as RGB PIL images with label -1, so they
pass through the same transforms as real images. Each image depends only on (seed, kind,
index), through its own ``torch.Generator``, so any index is generated on its own: DataLoader
workers and resumed runs see the same images without sharing state.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

KINDS = ("gaussian", "uniform", "rademacher", "blobs")

_BLOB_P, _BLOB_SIGMA, _BLOB_CUTOFF = 0.7, 1.5, 0.75


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of a (C, H, W) image: a 1-D kernel along rows, then along columns."""
    radius = math.ceil(4 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).expand(image.shape[0], 1, -1)  # one kernel per channel
    x = image.unsqueeze(0)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"),
                 kernel.unsqueeze(2), groups=image.shape[0])
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"),
                 kernel.unsqueeze(3), groups=image.shape[0])
    return x.squeeze(0)


def _noise(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """One (3, size, size) image in [0, 1] following ``kind``'s recipe."""
    shape = (3, size, size)
    if kind == "gaussian":
        return (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp(0.0, 1.0)
    if kind == "uniform":
        return torch.rand(shape, generator=generator)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).float()
    blobs = _gaussian_blur(torch.bernoulli(torch.full(shape, _BLOB_P), generator=generator),
                           _BLOB_SIGMA)
    return blobs.masked_fill(blobs < _BLOB_CUTOFF, 0.0)


class SyntheticOOD(Dataset):
    """``num_images`` noise images of one ``kind`` (see the module docstring), label -1."""

    def __init__(self, kind: str, num_images: int, size: int = 32, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown synthetic kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if num_images <= 0 or size <= 0:
            raise ValueError(
                f"num_images and size must be positive, got num_images={num_images}, size={size}"
            )
        self.kind, self.num_images, self.size, self.seed = kind, num_images, size, seed

    def __len__(self) -> int:
        return self.num_images

    def _generator(self, index: int) -> torch.Generator:
        """A generator seeded by a hash of (seed, kind, index): independent per image."""
        key = f"{self.seed}:{self.kind}:{index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        pixels = _noise(self.kind, self.size, self._generator(index))
        array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(array, mode="RGB"), -1
