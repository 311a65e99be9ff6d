"""Per-request thresholds, tpr and decision rules change is_ood as they should, and the
response says which thresholds were used and where they came from."""

import pytest
from service_helpers import metric, metrics_text, predict_ok
from uploads import noise_png

from training.bundle import load_bundle
from training.calibration import threshold_for_tpr

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_bundle(tiny_bundle).manifest


@pytest.fixture(scope="module")
def image() -> bytes:
    return noise_png(21)


@pytest.fixture
async def scores(client, image) -> tuple[float, float]:
    body = await predict_ok(client, image)
    return body["energy"]["score"], body["featurenorm"]["score"]


async def test_energy_threshold_override(client, image, scores):
    energy, _ = scores
    for threshold, ood in [(energy, False),            # equal: in-distribution
                           (energy - 1e-3, True),      # energy above the threshold: OOD
                           (energy + 1.0, False)]:
        result = (await predict_ok(client, image, energy_threshold=threshold,
                                   decision="energy"))
        assert result["energy"]["threshold"] == threshold
        assert result["energy"]["threshold_source"] == "request"
        assert result["energy"]["tpr"] is None
        assert result["energy"]["is_ood"] is ood
        assert result["is_ood"] is ood
        assert result["featurenorm"]["threshold_source"] == "bundle"


async def test_featurenorm_threshold_override(client, image, scores):
    _, featurenorm = scores
    for threshold, ood in [(featurenorm, False),        # equal: in-distribution
                           (featurenorm + 1e-3, True),  # norm below the threshold: OOD
                           (max(featurenorm - 1.0, 0.0), False)]:
        result = await predict_ok(client, image, featurenorm_threshold=threshold,
                                  decision="featurenorm")
        assert result["featurenorm"]["threshold"] == threshold
        assert result["featurenorm"]["threshold_source"] == "request"
        assert result["featurenorm"]["is_ood"] is ood
        assert result["is_ood"] is ood


@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.999, 1.0])
async def test_tpr_reads_thresholds_from_the_quantile_tables(client, image, manifest, tpr):
    result = await predict_ok(client, image, tpr=tpr)
    for detector in ("energy", "featurenorm"):
        want = threshold_for_tpr(manifest.calibration[detector].quantiles, tpr)
        assert result[detector]["threshold"] == want
        assert result[detector]["threshold_source"] == "tpr"
        assert result[detector]["tpr"] == tpr


async def test_a_repeated_parameter_counts_with_its_last_value(client, image, manifest):
    response = await client.post("/predict?tpr=0.5&tpr=0.9", files={"image": ("a.png", image)})
    assert response.status_code == 200
    assert response.json()["energy"]["threshold"] == threshold_for_tpr(
        manifest.calibration["energy"].quantiles, 0.9)


async def test_tpr_moves_thresholds_in_the_right_direction(client, image):
    strict = await predict_ok(client, image, tpr=0.5)
    lenient = await predict_ok(client, image, tpr=0.99)
    # Keeping more ID images means accepting higher energies and lower norms.
    assert lenient["energy"]["threshold"] > strict["energy"]["threshold"]
    assert lenient["featurenorm"]["threshold"] < strict["featurenorm"]["threshold"]


async def test_explicit_threshold_wins_over_tpr(client, image, manifest):
    result = await predict_ok(client, image, tpr=0.8, energy_threshold=-3.0)
    assert result["energy"]["threshold"] == -3.0
    assert result["energy"]["threshold_source"] == "request"
    assert result["featurenorm"]["threshold_source"] == "tpr"
    assert result["featurenorm"]["threshold"] == threshold_for_tpr(
        manifest.calibration["featurenorm"].quantiles, 0.8)


@pytest.mark.parametrize("energy_ood,featurenorm_ood", [(True, False), (False, True),
                                                        (True, True), (False, False)])
async def test_decision_rules(client, image, scores, energy_ood, featurenorm_ood):
    energy, featurenorm = scores
    params = {"energy_threshold": energy - 1.0 if energy_ood else energy + 1.0,
              "featurenorm_threshold": featurenorm + 1.0 if featurenorm_ood else featurenorm - 1.0}
    expected = {"any": energy_ood or featurenorm_ood, "all": energy_ood and featurenorm_ood,
                "energy": energy_ood, "featurenorm": featurenorm_ood}
    for rule, ood in expected.items():
        result = await predict_ok(client, image, decision=rule, **params)
        assert result["energy"]["is_ood"] is energy_ood
        assert result["featurenorm"]["is_ood"] is featurenorm_ood
        assert result["decision"] == rule
        assert result["is_ood"] is ood, rule


async def test_batch_applies_the_parameters_to_every_image(client):
    files = [("images", (f"{i}.png", noise_png(30 + i))) for i in range(3)]
    response = await client.post("/predict/batch", files=files,
                                 params={"energy_threshold": 1e5, "decision": "energy"})
    for item in response.json()["results"]:
        energy = item["prediction"]["energy"]
        assert energy["threshold"] == 1e5 and energy["threshold_source"] == "request"
        assert item["prediction"]["is_ood"] is False


async def test_ood_metrics_count_the_bundle_defaults_not_the_request(client, image):
    """A client's own thresholds must not move the dashboard's OOD rate."""
    default = await predict_ok(client, image)
    before = await metrics_text(client)
    # The same image twice: once everything is OOD, once nothing is, by the request's
    # thresholds. Counting those decisions would add 1 per detector; counting the bundle's
    # adds 0 or 2.
    forced_ood = await predict_ok(client, image, energy_threshold=-1e6,
                                  featurenorm_threshold=1e6, decision="all")
    forced_id = await predict_ok(client, image, energy_threshold=1e6,
                                 featurenorm_threshold=0, decision="any")
    assert forced_ood["is_ood"] is True and forced_id["is_ood"] is False
    after = await metrics_text(client)
    expected = {"energy": default["energy"]["is_ood"],
                "featurenorm": default["featurenorm"]["is_ood"],
                "combined": default["is_ood"]}
    for detector, ood in expected.items():
        delta = (metric(after, "oodserve_ood_decisions_total", detector=detector)
                 - metric(before, "oodserve_ood_decisions_total", detector=detector))
        assert delta == 2 * int(ood), detector
    assert metric(after, "oodserve_predictions_total") == metric(
        before, "oodserve_predictions_total") + 2
