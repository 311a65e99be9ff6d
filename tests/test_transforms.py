"""The evaluation transform, written without torchvision, against torchvision's own pipeline.

Bundles were calibrated with ``Resize -> CenterCrop -> ToTensor -> Normalize``; the
reimplementation must give exactly the same tensors, or served scores would drift from the
calibrated thresholds.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from training.data.transforms import Preprocessing


def torchvision_pipeline(pre: Preprocessing) -> T.Compose:
    return T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.input_size), T.ToTensor(),
                      T.Normalize(pre.mean, pre.std)])


def random_rgb(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("pre", [
    Preprocessing(),                                           # CIFAR: 32 -> 32
    Preprocessing(input_size=224, resize_size=256, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
    Preprocessing(input_size=31, resize_size=33),              # odd margins: rounding of the crop
], ids=["cifar", "imagenet", "odd"])
@pytest.mark.parametrize("size", [(32, 32), (33, 33), (64, 48), (48, 64), (17, 90), (500, 333),
                                  (256, 256), (1, 40)])
def test_eval_transform_equals_torchvision(pre, size):
    image = random_rgb(*size, seed=size[0] * 1000 + size[1])
    ours = pre.eval_transform()(image)
    theirs = torchvision_pipeline(pre)(image)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_eval_transform_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        Preprocessing().eval_transform()(Image.new("L", (32, 32)))
