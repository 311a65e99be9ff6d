"""Synthetic OOD sets: deterministic per index, statistics of each recipe, errors."""

import numpy as np
import pytest
import torch

from training.data.synthetic import KINDS, SyntheticOOD, _gaussian_blur
from training.data.transforms import Preprocessing


def pixels(kind: str, count: int = 16, size: int = 32) -> np.ndarray:
    dataset = SyntheticOOD(kind, count, size=size)
    return np.stack([np.asarray(dataset[i][0]) for i in range(count)])


@pytest.mark.parametrize("kind", KINDS)
def test_item_is_an_rgb_image_with_label_minus_one(kind):
    image, label = SyntheticOOD(kind, 3, size=20)[2]
    assert label == -1 and image.mode == "RGB" and image.size == (20, 20)
    assert Preprocessing().eval_transform()(image).shape == (3, 32, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_depends_only_on_seed_kind_and_index(kind):
    a, b = SyntheticOOD(kind, 5, seed=1), SyntheticOOD(kind, 50, seed=1)
    first = np.asarray(a[3][0])
    for i in range(5):  # other items in between change nothing: no shared generator state
        a[i]
    assert np.array_equal(first, np.asarray(a[3][0]))
    assert np.array_equal(first, np.asarray(b[3][0]))  # nor does the dataset length
    assert not np.array_equal(first, np.asarray(a[2][0]))
    assert not np.array_equal(first, np.asarray(SyntheticOOD(kind, 5, seed=2)[3][0]))


def test_kinds_are_seeded_apart_and_global_rng_is_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    uniform, gaussian = pixels("uniform", 1), pixels("gaussian", 1)
    assert torch.equal(torch.rand(3), expected)
    assert not np.array_equal(uniform, gaussian)


def test_gaussian_statistics():
    # 0.5 + 0.25 N(0, 1) clipped at 2 sigma: std 0.96 * 0.25 * 255 = 61.2, 2.3% at each end
    values = pixels("gaussian")
    assert abs(values.mean() - 127.5) < 2 and 59 < values.std() < 63.5
    assert 0.015 < (values == 0).mean() < 0.03 and 0.015 < (values == 255).mean() < 0.03


def test_uniform_statistics():
    values = pixels("uniform")
    assert abs(values.mean() - 127.5) < 2 and abs(values.std() - 255 / 12**0.5) < 2
    assert values.min() <= 2 and values.max() >= 253


def test_rademacher_statistics():
    values = pixels("rademacher")
    assert set(np.unique(values)) == {0, 255}
    assert abs((values == 255).mean() - 0.5) < 0.02


def test_blobs_statistics():
    values = pixels("blobs")
    # blurred Bernoulli(0.7) has mean 0.7 and std ~0.09, so most values fall below the cut
    assert 0.5 < (values == 0).mean() < 0.9
    assert values[values > 0].min() >= round(0.75 * 255) and values.max() <= 255


def test_blur_is_a_normalised_gaussian_per_channel():
    impulse = torch.zeros(3, 31, 31, dtype=torch.float64)
    impulse[1, 15, 15] = 1.0
    blurred = _gaussian_blur(impulse, 1.5)
    assert blurred[0].abs().max() == 0 and blurred[2].abs().max() == 0  # channels stay apart
    assert blurred[1].sum().item() == pytest.approx(1.0)
    offsets = torch.arange(-15, 16, dtype=torch.float64)
    row_variance = (blurred[1].sum(dim=0) * offsets**2).sum().item()
    assert row_variance == pytest.approx(1.5**2, rel=1e-3)
    assert torch.allclose(blurred[1], blurred[1].T)
    constant = torch.full((3, 8, 8), 0.3)  # edge replication keeps a flat image flat
    assert torch.allclose(_gaussian_blur(constant, 1.5), constant)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_images(kind):
    image, _ = SyntheticOOD(kind, 1, size=1)[0]
    assert image.size == (1, 1)


def test_errors():
    with pytest.raises(ValueError, match="gaussian, uniform, rademacher, blobs"):
        SyntheticOOD("perlin", 3)
    for bad in ({"num_images": 0}, {"num_images": -1}, {"num_images": 3, "size": 0}):
        with pytest.raises(ValueError, match="positive"):
            SyntheticOOD("uniform", **bad)
    for index in (3, -1):
        with pytest.raises(IndexError):
            SyntheticOOD("uniform", 3)[index]
