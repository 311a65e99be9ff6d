"""The service's endpoints through a real httpx client: shapes, values, formats, OpenAPI."""

import io
import threading

import anyio
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import predict_ok, serve, settings
from uploads import encode, noise_image, noise_png, png

from service.inference import Predictor
from training.bundle import load_bundle
from training.data.folders import load_rgb
from training.evaluation import score_batch

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


async def test_healthz_and_readyz(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_readyz_is_503_until_the_model_is_warm(tiny_bundle, monkeypatch):
    release = threading.Event()
    warm_up = Predictor.warm_up
    monkeypatch.setattr(Predictor, "warm_up",
                        lambda self, sizes: (release.wait(10), warm_up(self, sizes)))
    async with serve(settings(tiny_bundle), wait_ready=False) as client:
        waiting = await client.get("/readyz")
        assert waiting.status_code == 503
        assert waiting.json() == {"ready": False, "reason": "warming up"}
        assert (await client.get("/healthz")).status_code == 200  # alive all the same
        release.set()
        for _ in range(500):
            if (await client.get("/readyz")).status_code == 200:
                break
            await anyio.sleep(0.01)
        else:
            pytest.fail("never became ready after warm-up")


async def test_model_summary(client, bundle):
    m = bundle.manifest
    body = (await client.get("/v1/model")).json()
    assert body["name"] == m.name and body["version"] == m.version
    assert body["classes"] == m.classes
    assert body["blocks"] == m.taps
    assert body["selected_block"] == m.featurenorm.selected_block
    assert body["norm_ratios"] == m.featurenorm.norm_ratios
    for detector in ("energy", "featurenorm"):
        cal = m.calibration[detector]
        assert body["thresholds"][detector] == {
            "threshold": cal.threshold, "tpr": cal.tpr, "higher_is_id": cal.higher_is_id,
            "calibration_images": cal.quantiles.count}
    assert body["device"] == "cpu" and body["dtype"] == "float32"
    assert body["weights_sha256"] == m.weights.sha256


def expected_scores(bundle, rgb: Image.Image) -> dict:
    """Scores computed directly with training's functions, for comparison."""
    m = bundle.manifest
    x = m.preprocessing.eval_transform()(load_rgb(rgb)).unsqueeze(0)
    out = score_batch(bundle.model, x, [m.featurenorm.selected_block])
    return {"energy": out.of("energy").item(),
            "featurenorm": out.of("featurenorm", m.featurenorm.selected_block).item(),
            "probs": torch.softmax(out.logits, 1)[0].numpy(), "pred": out.pred.item()}


async def test_predict_response(client, bundle):
    image = noise_image(1, (48, 40))
    body = await predict_ok(client, png(image))
    m = bundle.manifest
    want = expected_scores(bundle, image)
    assert body["class_index"] == want["pred"]
    assert body["label"] == m.classes[want["pred"]]
    assert body["probability"] == pytest.approx(float(want["probs"][want["pred"]]), abs=1e-6)
    assert body["energy"]["score"] == pytest.approx(want["energy"], abs=1e-4)
    assert body["featurenorm"]["score"] == pytest.approx(want["featurenorm"], rel=1e-5)
    assert body["featurenorm"]["block"] == m.featurenorm.selected_block
    order = np.argsort(-want["probs"], kind="stable")[:5]
    assert [c["index"] for c in body["top_k"]] == order.tolist()
    assert [c["label"] for c in body["top_k"]] == [m.classes[i] for i in order]
    assert body["top_k"][0]["probability"] == body["probability"]
    for detector in ("energy", "featurenorm"):
        result, cal = body[detector], m.calibration[detector]
        assert result["threshold"] == cal.threshold
        assert result["threshold_source"] == "bundle" and result["tpr"] == cal.tpr
        assert result["higher_is_id"] == cal.higher_is_id
        score, threshold = result["score"], result["threshold"]
        assert result["is_ood"] == (score < threshold if cal.higher_is_id else score > threshold)
    assert body["decision"] == m.default_decision == "any"
    assert body["is_ood"] == (body["energy"]["is_ood"] or body["featurenorm"]["is_ood"])
    assert body["model"] == {"name": m.name, "version": m.version}
    assert 0 < body["server_time_ms"] < 10_000


async def test_top_k_parameter(client):
    data = noise_png(2)
    assert len((await predict_ok(client, data, top_k=3))["top_k"]) == 3
    assert len((await predict_ok(client, data, top_k=50))["top_k"]) == 10  # capped at classes


async def test_batch_results_in_order(client):
    images = [noise_image(s) for s in (3, 4, 5)]
    response = await client.post(
        "/predict/batch", files=[("images", (f"{i}.png", png(im))) for i, im in enumerate(images)])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["filename"] for r in results] == ["0.png", "1.png", "2.png"]
    for image, result in zip(images, results):
        alone = await predict_ok(client, png(image))
        assert result["error"] is None
        assert result["prediction"]["energy"]["score"] == pytest.approx(
            alone["energy"]["score"], abs=1e-4)
        assert result["prediction"]["class_index"] == alone["class_index"]


def _exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _cases():
    """(name, uploaded bytes, the RGB image it must be read as)."""
    rgb = noise_image(7, (40, 32))
    jpeg = encode(rgb, "JPEG", quality=90)
    cmyk = encode(rgb.convert("CMYK"), "JPEG", quality=90)
    gray = rgb.convert("L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    white = Image.new("RGB", rgb.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # I;16, full range
    second = noise_image(8, (40, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    gif = encode(palette, "GIF", save_all=True, append_images=[second])
    return [
        ("jpeg", jpeg, Image.open(io.BytesIO(jpeg)).convert("RGB")),
        ("png", png(rgb), rgb),
        ("webp-lossless", encode(rgb, "WEBP", lossless=True), rgb),
        ("bmp", encode(rgb, "BMP"), rgb),
        ("gif-first-frame", gif, Image.open(io.BytesIO(gif)).convert("RGB")),
        ("grayscale", png(gray), gray.convert("RGB")),
        ("palette", png(palette), palette.convert("RGB")),
        ("rgba-over-white", png(rgba), white),
        ("cmyk-jpeg", cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")),
        ("16-bit", png(sixteen), gray.convert("RGB")),
        ("exif-rotated", encode(rgb, "PNG", exif=_exif_orientation(6)),
         rgb.transpose(Image.Transpose.ROTATE_270)),
    ]


@pytest.mark.parametrize("name,data,expected", _cases(), ids=[c[0] for c in _cases()])
async def test_image_formats_decode_like_the_expected_rgb(client, name, data, expected):
    got = await predict_ok(client, data)
    want = await predict_ok(client, png(expected))
    assert got["energy"]["score"] == want["energy"]["score"]
    assert got["featurenorm"]["score"] == want["featurenorm"]["score"]


async def test_exif_orientation_matters(client):
    """The EXIF case above would pass vacuously if rotation did not change the scores."""
    rgb = noise_image(7, (40, 32))
    rotated = await predict_ok(client, encode(rgb, "PNG", exif=_exif_orientation(6)))
    upright = await predict_ok(client, png(rgb))
    assert rotated["energy"]["score"] != upright["energy"]["score"]


async def test_gif_second_frame_is_ignored(client):
    first = noise_image(9).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    second = noise_image(10).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    animated = await predict_ok(client, encode(first, "GIF", save_all=True,
                                               append_images=[second]))
    assert animated["energy"]["score"] == (await predict_ok(client, png(first)))["energy"]["score"]
    assert animated["energy"]["score"] != (await predict_ok(client, png(second)))["energy"]["score"]


async def test_openapi_documents_the_predict_contract(client):
    spec = (await client.get("/openapi.json")).json()
    post = spec["paths"]["/predict"]["post"]
    ref = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/PredictResponse")
    schemas = spec["components"]["schemas"]
    response_fields = set(schemas["PredictResponse"]["properties"])
    assert {"class_index", "label", "probability", "top_k", "energy", "featurenorm", "is_ood",
            "decision", "model", "server_time_ms"} <= response_fields
    assert {"score", "threshold", "threshold_source", "is_ood", "block"} <= set(
        schemas["FeatureNormResult"]["properties"])
    query = {p["name"] for p in post["parameters"] if p["in"] == "query"}
    assert query == {"energy_threshold", "featurenorm_threshold", "tpr", "decision", "top_k",
                     "model"}
    body_ref = post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = schemas[body_ref.rsplit("/", 1)[1]]
    assert body["required"] == ["image"]
    for status in ("413", "415", "422"):
        assert post["responses"][status]["content"]["application/json"]["schema"][
            "$ref"].endswith("/ErrorResponse")
    assert "/predict/batch" in spec["paths"] and "/v1/model" in spec["paths"]


async def test_unknown_route_and_wrong_method_are_json_errors(client):
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await client.get("/predict")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
