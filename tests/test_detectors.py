"""The table of detectors: an entry is all a new unserved detector needs to be scored,
measured, tabled and plotted; the served ones have their calibration, thresholds, decision
rules and API fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from service.schemas import Prediction, PredictParams
from service.thresholds import resolve_policy
from training import evaluation, report
from training.bundle import load_bundle
from training.detectors import DETECTORS, SERVED, SERVED_NAMES, DecisionRule, Detector
from training.models import build_model


def logit_spread(logits: torch.Tensor) -> torch.Tensor:
    """A made-up detector for the test: the standard deviation of the logits."""
    return logits.float().std(dim=1)


SPREAD = Detector("logit_spread", logit_spread, higher_is_id=True, title="Logit spread")


def test_an_unserved_entry_is_scored_measured_tabled_and_plotted(monkeypatch):
    table = (*DETECTORS, SPREAD)
    for module in (evaluation, report):  # the modules that read the table by name
        monkeypatch.setattr(module, "DETECTORS", table)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    id_test = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 10)
    noise = TensorDataset(3 * torch.rand(16, 3, 32, 32, generator=g), torch.zeros(16))
    result = report.evaluate_model("m", model, id_test=id_test, ood_sets={"noise": noise},
                                   device=torch.device("cpu"), selected_block="layer2.2",
                                   ratios={"layer2.2": 1.0}, batch_size=10)

    logits = model(id_test.tensors[0])
    np.testing.assert_allclose(result.scores["id"]["logit_spread"],
                               logit_spread(logits).detach().numpy(), rtol=1e-5)
    assert set(result.ood["noise"]) == {d.name for d in table}
    md = report.markdown([result], "t")
    assert "| m | logit_spread |" in md
    plots = report.figures(result, "noise")
    assert "plots/hist_logit_spread.svg" in plots
    assert "Logit spread (higher = more in-distribution)" in plots["plots/hist_logit_spread.svg"]


def test_detectors_on_a_block_read_the_block_their_entry_names():
    model = build_model("resnet20", num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = evaluation.score_batch(model, images, ["layer2.2", "layer3.2"])
    feats = model.forward_features(images, ["layer2.2", "layer3.2"])
    for d in DETECTORS:
        want = d.score(feats.logits if d.block is None else
                       feats.blocks["layer2.2" if d.block == "selected" else "layer3.2"])
        torch.testing.assert_close(scores.of(d, "layer2.2", "layer3.2"), want)
    with pytest.raises(ValueError, match="reads the last block"):
        scores.of("featurenorm_last", selected="layer2.2")


def test_a_served_detector_must_read_the_logits_or_the_tapped_block():
    with pytest.raises(ValueError, match="taps only the selected block"):
        Detector("x", logit_spread, higher_is_id=True, title="X", block="last", served=True)


def test_every_served_detector_has_its_api_fields_rules_and_calibration(tiny_bundle):
    """The API is written out per detector (service/schemas.py): a served entry without its
    fields would be served by nothing."""
    manifest = load_bundle(tiny_bundle).manifest
    assert set(DecisionRule.__args__) == {"any", "all", *SERVED_NAMES}
    assert set(manifest.calibration) == set(SERVED_NAMES)
    for d in SERVED:
        assert f"{d.name}_threshold" in PredictParams.model_fields
        assert d.name in Prediction.model_fields
        assert manifest.calibration[d.name].higher_is_id == d.higher_is_id
    params = PredictParams(energy_threshold=-3.0)
    assert params.thresholds() == {"energy": -3.0}
    policy = resolve_policy(manifest, params.thresholds(), tpr=0.9, decision="all")
    assert policy.thresholds["energy"].source == "request"
    assert policy.thresholds["featurenorm"].source == "tpr"
    with pytest.raises(ValueError, match="no served detector named"):
        resolve_policy(manifest, {"msp": 0.5})
