"""``GET /metrics``: Prometheus names, the series a dashboard needs, and values that move
with the requests."""

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import metric, metrics_text, predict_ok, serve, settings
from uploads import noise_png

from training.bundle import load_bundle

pytestmark = pytest.mark.anyio

# The labels of the tiny bundle's series (tests/conftest.py: make_bundle).
MODEL = {"model": "test-resnet20", "version": "0.0.0"}


@pytest.fixture(scope="module")
async def client(tiny_bundle):
    async with serve(settings(tiny_bundle, max_batch_delay_ms=0)) as client:
        yield client


async def test_exposition_format_and_names(client, tiny_bundle):
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "oodserve_requests": "counter", "oodserve_predictions": "counter",
        "oodserve_ood_decisions": "counter", "oodserve_image_errors": "counter",
        "oodserve_request_duration_seconds": "histogram",
        "oodserve_queue_wait_seconds": "histogram",
        "oodserve_inference_duration_seconds": "histogram",
        "oodserve_batch_size": "histogram", "oodserve_energy_score": "histogram",
        "oodserve_featurenorm_score": "histogram", "oodserve_model_info": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    text = response.text
    m = load_bundle(tiny_bundle).manifest
    assert metric(text, "oodserve_model_info", name=m.name, version=m.version,
                  architecture="resnet20", selected_block=m.featurenorm.selected_block,
                  device="cpu", dtype="float32") == 1
    # Series for every detector exist from the start, so rate() never sees one appear.
    decisions = [s.labels for s in families["oodserve_ood_decisions"].samples
                 if s.name == "oodserve_ood_decisions_total"]
    for detector in ("energy", "featurenorm", "combined"):
        assert {**MODEL, "detector": detector} in decisions
    assert "_created" not in text


async def test_metrics_move_with_predictions(client):
    before = await metrics_text(client)
    bodies = [await predict_ok(client, noise_png(600 + i)) for i in range(3)]
    after = await metrics_text(client)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    def model_delta(name, **labels):  # a series of the model: with its name and version
        return delta(name, **MODEL, **labels)

    assert model_delta("oodserve_predictions_total") == 3
    assert delta("oodserve_requests_total", endpoint="/predict", status="200") == 3
    assert delta("oodserve_request_duration_seconds_count", endpoint="/predict") == 3
    # The queue's and batches' series: by model only (a reload adds none).
    model = {"model": MODEL["model"]}
    assert delta("oodserve_queue_wait_seconds_count", **model) == 3
    assert delta("oodserve_batch_size_sum", **model) == 3
    assert delta("oodserve_inference_duration_seconds_count", **model) == delta(
        "oodserve_batch_size_count", **model) >= 1
    assert all("version" not in s.labels for f in text_string_to_metric_families(after)
               if f.name in ("oodserve_queue_wait_seconds", "oodserve_batch_size",
                             "oodserve_inference_duration_seconds") for s in f.samples)
    for detector in ("energy", "featurenorm"):
        assert model_delta(f"oodserve_{detector}_score_count") == 3
        assert model_delta("oodserve_ood_decisions_total", detector=detector) == sum(
            b[detector]["is_ood"] for b in bodies)
    # Energies are negative: prometheus_client gives that histogram no _sum.
    assert model_delta("oodserve_featurenorm_score_sum") == pytest.approx(
        sum(b["featurenorm"]["score"] for b in bodies), rel=1e-6)
    energies = sorted(b["energy"]["score"] for b in bodies)
    bound = next(float(s.labels["le"]) for f in text_string_to_metric_families(after)
                 if f.name == "oodserve_energy_score" for s in f.samples
                 if s.name.endswith("_bucket") and float(s.labels["le"]) >= energies[-1])
    assert model_delta("oodserve_energy_score_bucket", le=_le(bound)) == 3
    assert model_delta("oodserve_ood_decisions_total", detector="combined") == sum(
        b["is_ood"] for b in bodies)


async def test_endpoint_label_is_the_route_template_never_the_raw_path(client):
    await client.get("/v1/model", params={"anything": "x"})
    for path in ("/secret/user-1234", "/predict/../etc/passwd", "/healthz/extra"):
        await client.get(path)
    text = await metrics_text(client)
    assert metric(text, "oodserve_requests_total", endpoint="/v1/model", status="200") >= 1
    assert metric(text, "oodserve_requests_total", endpoint="unmatched", status="404") >= 3
    for raw in ("user-1234", "passwd", "extra", "anything"):
        assert raw not in text


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


async def test_score_buckets_follow_the_calibration(client, tiny_bundle):
    """Histogram bounds sit where the bundle's ID scores lie, so a shift shows up."""
    m = load_bundle(tiny_bundle).manifest
    text = await metrics_text(client)
    for detector in ("energy", "featurenorm"):
        bounds = [float(s.labels["le"]) for f in text_string_to_metric_families(text)
                  if f.name == f"oodserve_{detector}_score" for s in f.samples
                  if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
        table = m.calibration[detector].quantiles
        assert len(bounds) >= 8, detector
        assert all(table.values[0] <= b <= table.values[-1] for b in bounds), detector
        threshold = m.calibration[detector].threshold  # the 5% / 95% quantile
        assert min(abs(b - threshold) for b in bounds) <= 1e-3 * abs(threshold), detector
