"""Models: one pass gives logits and taps; registry and weight loading fail clearly."""

import pytest
import torch
from conftest import RESNET20

from training.models import MODEL_NAMES, build_model, load_weights


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_features_matches_forward_and_taps_every_block(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x, model.block_names)
    assert torch.allclose(feats.logits, model(x), atol=1e-5)
    assert list(feats.blocks) == model.block_names
    assert feats.logits.shape == (2, 7)
    assert feats.penultimate.shape[0] == 2
    for block, fmap in feats.blocks.items():
        assert fmap.dim() == 4, block
        assert model.get_submodule(block) is not None


def test_block_counts():
    assert len(build_model("resnet20").block_names) == 9
    assert len(build_model("resnet56").block_names) == 27
    assert len(build_model("wrn40_2").block_names) == 18
    assert len(build_model("resnet18_cifar").block_names) == 8
    assert len(build_model("resnet50").block_names) == 16


def test_unknown_names_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="drop_rat"):
        build_model("wrn40_2", drop_rat=0.3)
    with pytest.raises(ValueError, match="unknown block"):
        build_model("resnet20").forward_features(torch.zeros(1, 3, 32, 32), ["layer9.0"])


def test_pretrained_resnet20_loads_and_wrong_architecture_is_refused(tmp_path):
    model = build_model("resnet20", num_classes=10)
    load_weights(model, RESNET20)
    with pytest.raises(ValueError, match="does not fit CifarResNet.*missing"):
        load_weights(build_model("resnet56", num_classes=10), RESNET20)
    with pytest.raises(ValueError, match="other shapes"):
        load_weights(build_model("resnet20", num_classes=100), RESNET20)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights(model, junk)
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "absent.th")
