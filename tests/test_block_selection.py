"""Jigsaw images and NormRatio block selection, on a model whose best block is known."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from training.block_selection import jigsaw, norm_ratios, select_block
from training.models import build_model
from training.models.base import TappedClassifier, global_avg_pool

LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency positive images: tile seams are the only sharp edges a jigsaw adds."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 3, 3, generator=g) + 0.5
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def edges(x: torch.Tensor) -> torch.Tensor:
    """|Laplacian| of the first three channels, summed over them: large at tile seams."""
    kernel = LAPLACE.expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x[:, :3], (1, 1, 1, 1), mode="replicate"), kernel, groups=3).abs().sum(
        1, keepdim=True)


class Keep(nn.Module):
    def forward(self, x):
        return x[:, :3]


class Flatness(nn.Module):
    """Appends a loud channel that is high where the image is smooth: a jigsaw lowers it."""

    def forward(self, x):
        return torch.cat([x[:, :3], 100 * torch.relu(1.0 - edges(x))], dim=1)


class Edginess(nn.Module):
    """Appends a loud channel that is high at edges: a jigsaw raises it."""

    def forward(self, x):
        return torch.cat([x[:, :3], 100 * edges(x)], dim=1)


class KnownBest(TappedClassifier):
    """keep (ratio exactly 1) -> flat (ratio > 1, the best) -> edgy (ratio < 1)."""

    def __init__(self):
        super().__init__()
        self.keep, self.flat, self.edgy = Keep(), Flatness(), Edginess()
        self.fc = nn.Linear(4, 2)
        self.register_blocks(["keep", "flat", "edgy"])

    def stem(self, x):
        return x

    def pool(self, x):
        return global_avg_pool(x)

    def classify(self, h):
        return self.fc(h)


def test_jigsaw_permutes_tiles_of_the_centred_region_and_keeps_the_border():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = jigsaw(images, torch.Generator().manual_seed(0))
    # 32 = 3 x 10 + 2: one untouched row/column on each side.
    assert torch.equal(out[:, :, 0], images[:, :, 0])
    assert torch.equal(out[:, :, 31], images[:, :, 31])
    assert torch.equal(out[..., 0], images[..., 0]) and torch.equal(out[..., 31], images[..., 31])

    def tiles(x, i):
        return [x[i, :, 1 + 10 * r:11 + 10 * r, 1 + 10 * c:11 + 10 * c]
                for r in range(3) for c in range(3)]

    for i in range(2):
        before, after = tiles(images, i), tiles(out, i)
        matches = [next(k for k, t in enumerate(before) if torch.equal(t, a)) for a in after]
        assert sorted(matches) == list(range(9))   # a permutation of the 9 tiles
        assert matches != list(range(9))            # and (for this seed) not the identity
    assert torch.equal(out, jigsaw(images, torch.Generator().manual_seed(0)))  # seeded


def test_jigsaw_covers_divisible_images_entirely_and_rejects_tiny_ones():
    images = torch.rand(4, 3, 30, 30)
    out = jigsaw(images, torch.Generator().manual_seed(1))
    assert torch.equal(out.flatten(2).sort(dim=2).values, images.flatten(2).sort(dim=2).values)
    assert not torch.equal(out, images)
    with pytest.raises(ValueError, match="too small"):
        jigsaw(torch.rand(1, 3, 2, 2), torch.Generator())


def test_norm_ratio_selects_the_block_that_is_best_by_construction():
    data = TensorDataset(smooth_images(48), torch.zeros(48, dtype=torch.long))
    ratios = norm_ratios(KnownBest(), data, torch.device("cpu"), seed=0, batch_size=16)
    assert list(ratios) == ["keep", "flat", "edgy"]
    # Shuffling moves pixels but keeps them all: a pass-through block's norms do not change
    # (a black border, as in the reference code, would make this ratio exceed 1).
    assert ratios["keep"] == pytest.approx(1.0, abs=1e-6)
    assert ratios["flat"] > 1.05
    assert ratios["edgy"] < 0.95
    assert select_block(ratios) == "flat"


def test_norm_ratios_of_a_real_model_are_finite_and_seeded():
    model = build_model("resnet20").eval()
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long))
    a = norm_ratios(model, data, torch.device("cpu"), seed=3, batch_size=16)
    b = norm_ratios(model, data, torch.device("cpu"), seed=3, batch_size=32)
    assert list(a) == model.block_names
    assert all(0 < v < float("inf") for v in a.values())
    assert a == pytest.approx(b, rel=1e-5)
    assert select_block(a) == max(a, key=a.get)
    with pytest.raises(ValueError, match="unknown block"):
        norm_ratios(model, data, torch.device("cpu"), blocks=["layer9.9"])


def test_the_report_says_whether_selection_beat_the_last_block():
    from training.report import ModelResult, selection_verdict

    def result(selected, auroc_sel, auroc_last):
        ood = {"a": {"featurenorm": {"auroc": auroc_sel, "fpr95": 0.5},
                     "featurenorm_last": {"auroc": auroc_last, "fpr95": 0.4}}}
        return ModelResult("m", selected, "layer3.2", {}, 0.9, ood, {}, {})

    assert "selected the last block" in selection_verdict(result("layer3.2", 0.9, 0.9))
    assert "layer3.0 beats the last block" in selection_verdict(result("layer3.0", 0.95, 0.9))
    text = selection_verdict(result("layer3.0", 0.85, 0.9))
    assert "does not beat" in text and "85.00% vs 90.00%" in text
