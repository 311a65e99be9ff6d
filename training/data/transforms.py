"""Input preprocessing: one description shared by training, evaluation and the service.

:class:`Preprocessing` is what a bundle manifest records, and :meth:`Preprocessing.eval_transform`
is the only place the evaluation-time pipeline is built, so that a served image is resized and
normalised exactly as the images the thresholds were calibrated on.

Evaluation resizes the shorter side to ``resize_size`` and centre-crops ``input_size`` (for
32-pixel CIFAR models both are 32, so a 32x32 image passes unchanged and larger images are
shrunk, never cropped to a corner). Training augmentations follow the papers: CIFAR-style
random crop with 4-pixel padding and horizontal flip for small images (GReg's and FeatureNorm's
code), RandomResizedCrop and flip for ImageNet-sized ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision import transforms as T

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Preprocessing(BaseModel):
    """How an RGB image becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(32, ge=8, le=1024, description="side of the square model input")
    resize_size: int = Field(32, ge=8, le=2048, description="shorter side before centre crop")
    mean: tuple[float, float, float] = IMAGENET_MEAN_STD[0]
    std: tuple[float, float, float] = IMAGENET_MEAN_STD[1]

    @model_validator(mode="after")
    def _check(self) -> "Preprocessing":
        if self.resize_size < self.input_size:
            raise ValueError("resize_size must be >= input_size")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def normalize(self) -> T.Normalize:
        return T.Normalize(self.mean, self.std)

    def eval_transform(self) -> T.Compose:
        return T.Compose([
            T.Resize(self.resize_size),
            T.CenterCrop(self.input_size),
            T.ToTensor(),
            self.normalize(),
        ])

    def train_transform(self, augment: Literal["cifar", "imagenet", "none"]) -> T.Compose:
        if augment == "cifar":
            geometric = [T.Resize(self.resize_size), T.CenterCrop(self.input_size),
                         T.RandomCrop(self.input_size, padding=4), T.RandomHorizontalFlip()]
        elif augment == "imagenet":
            geometric = [T.RandomResizedCrop(self.input_size), T.RandomHorizontalFlip()]
        else:
            geometric = [T.Resize(self.resize_size), T.CenterCrop(self.input_size)]
        return T.Compose([*geometric, T.ToTensor(), self.normalize()])
