"""Input preprocessing: one description shared by training, evaluation and the service.

:class:`Preprocessing` is what a bundle manifest records, and :meth:`Preprocessing.eval_transform`
is the only place the evaluation-time pipeline is built, so that a served image is resized and
normalised exactly as the images the thresholds were calibrated on.

Evaluation resizes the shorter side to ``resize_size`` and centre-crops ``input_size`` (for
32-pixel CIFAR models both are 32, so a 32x32 image passes unchanged and larger images are
shrunk, never cropped to a corner). Training augmentations follow the papers: CIFAR-style
random crop with 4-pixel padding and horizontal flip for small images (GReg's and FeatureNorm's
code), RandomResizedCrop and flip for ImageNet-sized ones.

The evaluation pipeline (:class:`EvalTransform`) is written with Pillow and torch alone,
step for step what torchvision's ``Resize``/``CenterCrop``/``ToTensor``/``Normalize`` do
(a test checks that the tensors are identical), so that a serving process never imports
torchvision: on the CUDA build of torch used here that import alone adds about 170 MB to
each worker's resident memory. Training's augmentations still come from torchvision.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Preprocessing(BaseModel):
    """How an RGB image becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(32, ge=8, le=1024, description="side of the square model input")
    resize_size: int = Field(32, ge=8, le=2048, description="shorter side before centre crop")
    mean: tuple[float, float, float] = IMAGENET_MEAN_STD[0]
    std: tuple[float, float, float] = IMAGENET_MEAN_STD[1]

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.resize_size < self.input_size:
            raise ValueError("resize_size must be >= input_size")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self)

    def train_transform(self, augment: Literal["cifar", "imagenet", "none"]):
        from torchvision import transforms as T

        if augment == "cifar":
            geometric = [T.Resize(self.resize_size), T.CenterCrop(self.input_size),
                         T.RandomCrop(self.input_size, padding=4), T.RandomHorizontalFlip()]
        elif augment == "imagenet":
            geometric = [T.RandomResizedCrop(self.input_size), T.RandomHorizontalFlip()]
        else:
            geometric = [T.Resize(self.resize_size), T.CenterCrop(self.input_size)]
        return T.Compose([*geometric, T.ToTensor(), T.Normalize(self.mean, self.std)])


class EvalTransform:
    """RGB PIL image -> normalised float tensor: shorter side resized to ``resize_size``
    (bilinear), centre crop of ``input_size``, scaled to [0, 1], then ``(x - mean) / std``."""

    def __init__(self, pre: Preprocessing):
        self.resize_size, self.input_size = pre.resize_size, pre.input_size
        self.mean = torch.tensor(pre.mean).view(3, 1, 1)
        self.std = torch.tensor(pre.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} "
                             "(training.data.folders.load_rgb converts any image)")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        if short != self.resize_size:
            # The long side's length is truncated, as torchvision computes it.
            new_long = int(self.resize_size * long / short)
            image = image.resize((self.resize_size, new_long) if w <= h else
                                 (new_long, self.resize_size), Image.Resampling.BILINEAR)
            w, h = image.size
        crop = self.input_size
        if (w, h) != (crop, crop):
            top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
            image = image.crop((left, top, left + crop, top + crop))
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1)
        return pixels.contiguous().float().div(255).sub_(self.mean).div_(self.std)
