"""The Open Inference Protocol (v2) endpoints: Triton's own client (``tritonclient.http``)
against the real server, scores compared with ``/predict``'s for the same images; and
malformed requests, each a 4xx in the protocol's error shape, through httpx in-process."""

import asyncio
import base64
import importlib.metadata
import json
import struct
import tarfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import CIFAR10, ISUN
from service_helpers import metric, metrics_text, running_service, serve, settings
from tritonclient.utils import InferenceServerException
from uploads import encode, noise_image, noise_png

import service
from service.inference import Predictor
from training.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
KEY = "oip-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
RTOL = 1e-5  # as the parity tests: the service batches the images its own way
OUTPUTS = ["label", "class_index", "probabilities", "energy", "featurenorm", "energy_is_ood",
           "featurenorm_is_ood", "is_ood"]


def real_images() -> list[bytes]:
    """The shipped samples, the first CIFAR-10 test images and iSUN images (read from the
    head of their archives, nothing extracted), and two of other formats."""
    images = [(REPO / "docs" / "samples" / name).read_bytes()
              for name in ("airplane.jpg", "isun.jpg")]
    for archive, count in ((CIFAR10, 4), (ISUN, 2)):
        found = 0
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".jpg", ".jpeg", ".png")):
                    data = tar.extractfile(member).read()
                    if data not in images:  # the samples are images of these archives
                        images.append(data)
                        found += 1
                    if found == count:
                        break
    images.append(noise_png(7, (40, 48)))
    images.append(encode(noise_image(8, (64, 40)), "WEBP", quality=80))
    return images


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return real_images()


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_bundle(tiny_bundle).manifest


# -- tritonclient against the real server ---------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """``python -m service`` (one worker) with an API key: the OIP URL, and a client for
    /predict on the same server."""
    tmp = tmp_path_factory.mktemp("oip")
    with (running_service(tmp, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_API_KEY=KEY,
                          OODSERVE_LAYOUT="replicated") as (_, base, _),
          httpx.Client(base_url=base, headers=AUTH) as http):
        yield base.removeprefix("http://"), http


@pytest.fixture
def client(server):
    with triton.InferenceServerClient(server[0]) as client:
        yield client


def images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return tensor


def predict(http: httpx.Client, data: bytes, **params) -> dict:
    response = http.post("/predict", files={"image": ("image", data)},
                         params={"top_k": 10, **params})
    assert response.status_code == 200, response.text
    return response.json()


def probabilities(prediction: dict) -> list[float]:
    return [c["probability"] for c in sorted(prediction["top_k"], key=lambda c: c["index"])]


def test_health_and_metadata(client, manifest):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(manifest.name)
    assert client.is_model_ready(manifest.name, manifest.version)
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(manifest.name, "no-such-version")
    server = client.get_server_metadata()
    assert server["name"] == "oodserve" and "binary_tensor_data" in server["extensions"]
    # From the sources (the Docker image runs them uninstalled), equal to the installed
    # package's metadata, which pyproject.toml reads from the same attribute.
    assert server["version"] == service.__version__ == importlib.metadata.version("oodserve")
    for version in ("", manifest.version):
        model = client.get_model_metadata(manifest.name, version)
        assert model["name"] == manifest.name and model["versions"] == [manifest.version]
        assert model["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
        shapes = {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]}
        assert shapes == {"label": ("BYTES", [-1]), "class_index": ("INT64", [-1]),
                          "probabilities": ("FP32", [-1, len(manifest.classes)]),
                          "energy": ("FP32", [-1]), "featurenorm": ("FP32", [-1]),
                          "energy_is_ood": ("BOOL", [-1]),
                          "featurenorm_is_ood": ("BOOL", [-1]), "is_ood": ("BOOL", [-1])}
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()


def test_infer_equals_predict(client, server, images, manifest):
    """A batch of real images, binary in and out: the same labels, scores and decisions as
    /predict gives each image; the thresholds used are the bundle's."""
    result = client.infer(manifest.name, [images_input(images)], request_id="batch-1",
                          headers=AUTH)
    expected = [predict(server[1], data) for data in images]
    response = result.get_response()
    assert response["id"] == "batch-1" and response["model_version"] == manifest.version
    assert [o["name"] for o in response["outputs"]] == OUTPUTS
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])

    labels = [label.decode() for label in result.as_numpy("label")]
    assert labels == [p["label"] for p in expected]
    assert result.as_numpy("class_index").tolist() == [p["class_index"] for p in expected]
    assert result.as_numpy("probabilities").shape == (len(images), len(manifest.classes))
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               [probabilities(p) for p in expected], rtol=RTOL, atol=1e-7)
    for detector in ("energy", "featurenorm"):
        np.testing.assert_allclose(result.as_numpy(detector),
                                   [p[detector]["score"] for p in expected], rtol=RTOL)
        assert result.as_numpy(f"{detector}_is_ood").tolist() == [
            p[detector]["is_ood"] for p in expected]
        assert response["parameters"][f"{detector}_threshold"] == pytest.approx(
            manifest.calibration[detector].threshold)
        assert response["parameters"][f"{detector}_threshold_source"] == "bundle"
    assert result.as_numpy("is_ood").tolist() == [p["is_ood"] for p in expected]
    assert response["parameters"]["decision"] == manifest.default_decision
    # Different images, different answers: the comparison above is not of constants.
    assert len(set(result.as_numpy("energy").tolist())) == len(images)


def test_threshold_parameters(client, server, images, manifest):
    """Request parameters set the thresholds and the rule, as /predict's query does."""
    energy = client.infer(manifest.name, [images_input(images)], headers=AUTH,
                          outputs=[triton.InferRequestedOutput("energy")]).as_numpy("energy")
    cut = float(np.median(energy))  # some images on each side
    result = client.infer(manifest.name, [images_input(images)], headers=AUTH,
                          parameters={"energy_threshold": cut, "decision": "energy"})
    assert result.as_numpy("energy_is_ood").tolist() == (result.as_numpy("energy") > cut
                                                         ).tolist()
    assert result.as_numpy("is_ood").tolist() == result.as_numpy("energy_is_ood").tolist()
    assert 0 < result.as_numpy("is_ood").sum() < len(images)
    params = result.get_response()["parameters"]
    assert params["energy_threshold"] == cut and params["energy_threshold_source"] == "request"
    assert params["decision"] == "energy"

    by_tpr = client.infer(manifest.name, [images_input(images)], headers=AUTH,
                          parameters={"tpr": 0.5, "decision": "all"})
    expected = [predict(server[1], data, tpr=0.5, decision="all") for data in images]
    for detector in ("energy", "featurenorm"):
        assert by_tpr.get_response()["parameters"][f"{detector}_threshold"] == pytest.approx(
            expected[0][detector]["threshold"])
        assert by_tpr.get_response()["parameters"][f"{detector}_tpr"] == 0.5
        assert by_tpr.as_numpy(f"{detector}_is_ood").tolist() == [
            p[detector]["is_ood"] for p in expected]
    assert by_tpr.as_numpy("is_ood").tolist() == [p["is_ood"] for p in expected]

    with pytest.raises(InferenceServerException) as bad:
        client.infer(manifest.name, [images_input(images)], headers=AUTH,
                     parameters={"tpr": 1.5})
    assert bad.value.status() == "400" and "parameters.tpr" in bad.value.message()


def test_outputs_classification_json_and_compression(client, server, images, manifest):
    """Only the outputs asked for, each binary or JSON as asked; the classification
    extension gives the top classes as Triton's "value:index:label"; a gzip body works."""
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3),
               triton.InferRequestedOutput("is_ood", binary_data=False)]
    result = client.infer(manifest.name, [images_input(images[:3])], outputs=outputs,
                          model_version=manifest.version, headers=AUTH,
                          request_compression_algorithm="gzip")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "is_ood"]
    assert "data" in response["outputs"][1] and result.as_numpy("label") is None
    expected = [predict(server[1], data, top_k=3) for data in images[:3]]
    assert result.as_numpy("is_ood").tolist() == [p["is_ood"] for p in expected]
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 3)
    for row, prediction in zip(top, expected):
        entries = [entry.decode().split(":") for entry in row]
        assert [(int(i), label) for _, i, label in entries] == [
            (c["index"], c["label"]) for c in prediction["top_k"]]
        np.testing.assert_allclose([float(v) for v, _, _ in entries],
                                   [c["probability"] for c in prediction["top_k"]], rtol=RTOL)


def test_infer_needs_the_key_and_metadata_does_not(server, manifest):
    with triton.InferenceServerClient(server[0]) as client:
        assert client.get_model_metadata(manifest.name)["name"] == manifest.name
        with pytest.raises(InferenceServerException) as refused:
            client.infer(manifest.name, [images_input([noise_png(1)])])
    assert refused.value.status() == "401" and "API key" in refused.value.message()


# -- malformed requests, in-process ------------------------------------------------------

LIMIT = 200_000


@pytest.fixture(scope="module")
async def app_client(tiny_bundle):
    async with serve(settings(tiny_bundle, max_upload_bytes=LIMIT, max_batch_images=8)) as c:
        yield c


def infer_url(manifest) -> str:
    return f"/v2/models/{manifest.name}/infer"


def json_request(images: list[bytes], **changes) -> dict:
    tensor = {"name": "images", "datatype": "BYTES", "shape": [len(images)],
              "data": [base64.b64encode(i).decode() for i in images]}
    return {"inputs": [{**tensor, **changes}]}


def binary_request(elements: list[bytes], shape: list[int],
                   size: int | None = None) -> tuple[bytes, dict]:
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape,
                                     "parameters": {"binary_data_size": size or len(data)}}]})
    return header.encode() + data, {"Inference-Header-Content-Length": str(len(header))}


def oip_error(response: httpx.Response, status: int, *words: str) -> str:
    """The message of a protocol error: ``{"error": "<message>"}`` and nothing else."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


@pytest.mark.anyio
async def test_json_request_with_base64_images(app_client, manifest, images):
    """Plain JSON both ways: base64 images in, JSON outputs, the scores of /predict; and the
    request counted in the metrics as /predict's are."""
    before = metric(await metrics_text(app_client), "oodserve_predictions_total")
    response = await app_client.post(infer_url(manifest), json={
        **json_request(images[:4]), "id": "j", "parameters": {"decision": "all"}})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "j" and body["model_name"] == manifest.name
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == OUTPUTS and all("data" in o for o in outputs.values())
    for i, data in enumerate(images[:4]):
        one = await app_client.post("/predict", files={"image": ("i", data)},
                                    params={"decision": "all"})
        p = one.json()
        assert outputs["label"]["data"][i] == p["label"]
        assert outputs["energy"]["data"][i] == pytest.approx(p["energy"]["score"], rel=RTOL)
        assert outputs["is_ood"]["data"][i] == p["is_ood"]
    text = await metrics_text(app_client)
    assert metric(text, "oodserve_predictions_total") == before + 8  # 4 infer, 4 predict
    assert metric(text, "oodserve_requests_total", endpoint="/v2/models/{name}/infer",
                  status="200") >= 1


@pytest.mark.anyio
async def test_malformed_requests(app_client, manifest, images):
    url = infer_url(manifest)
    post = app_client.post
    oip_error(await post(url, json=json_request(images[:2], datatype="FP32")), 400,
              "datatype", "BYTES")
    oip_error(await post(url, json=json_request(images[:2], shape=[3])), 400, "shape [3]")
    oip_error(await post(url, json=json_request(images[:2], shape=[2, 1])), 400, "shape")
    body, headers = binary_request(images[:2], [3])
    oip_error(await post(url, content=body, headers=headers), 400, "shape [3]")
    body, headers = binary_request(images[:2], [2], size=10)
    oip_error(await post(url, content=body, headers=headers), 400, "binary_data_size")
    oip_error(await post(url, json={"inputs": []}), 400, "missing input")
    oip_error(await post(url, json={"inputs": [{**json_request(images[:1])["inputs"][0],
                                                 "name": "pixels"}]}), 400, "unknown input")
    oip_error(await post(url, json=json_request(images[:1], data=["%%%"])), 400, "base64")
    oip_error(await post(url, content=b'{"inputs": ['), 400, "Invalid JSON")
    oip_error(await post(url, content=b"{}", headers={"Inference-Header-Content-Length":
                                                     "99"}), 400, "Inference-Header")
    # '²' (latin-1 0xb2) passes str.isdigit() but not int(): a 400, not a 500.
    oip_error(await post(url, content=b"{}", headers=[(b"Inference-Header-Content-Length",
                                                       b"\xb2")]), 400, "Inference-Header")
    for params, word in (({"tpr": 0}, "parameters.tpr"), ({"decision": "maybe"},
                                                            "parameters.decision"),
                         ({"priority": 1}, "parameters.priority"),
                         ({"energy_threshold": True}, "energy_threshold"),
                         ({"top_k": 3}, "classification"),
                         ({"model": manifest.name}, "the path names")):
        oip_error(await post(url, json={**json_request(images[:1]), "parameters": params}),
                  400, word)
    oip_error(await post(url, json={**json_request(images[:1]),
                                    "outputs": [{"name": "logits"}]}), 400, "unknown output")
    oip_error(await post(url, json={**json_request(images[:1]), "outputs": [
        {"name": "energy", "parameters": {"classification": 2}}]}), 400, "probabilities")
    oip_error(await post(url, params={"tpr": "0.5"}, json=json_request(images[:1])), 400,
              "parameters")


@pytest.mark.anyio
async def test_one_bad_image_fails_the_request_naming_it(app_client, manifest, images):
    url = infer_url(manifest)
    body, headers = binary_request([images[0], b"not an image at all", images[1]], [3])
    oip_error(await app_client.post(url, content=body, headers=headers), 415, "element 1")
    truncated = images[0][: len(images[0]) // 2]
    oip_error(await app_client.post(url, json=json_request([images[1], truncated])), 422,
              "element 1")


@pytest.mark.anyio
async def test_unknown_models_routes_and_limits(app_client, manifest, images):
    oip_error(await app_client.post("/v2/models/other/infer", json=json_request(images[:1])),
              404, "other")
    oip_error(await app_client.post(f"/v2/models/{manifest.name}/versions/9/infer",
                                    json=json_request(images[:1])), 404, "version")
    oip_error(await app_client.get("/v2/models/other/ready"), 404, "other")
    oip_error(await app_client.get("/v2/no-such-route"), 404)
    oip_error(await app_client.post(infer_url(manifest), content=b"x" * (LIMIT + 1)), 413,
              "OODSERVE_MAX_UPLOAD_BYTES")
    oip_error(await app_client.post(infer_url(manifest), json=json_request(images[:1] * 9)),
              413, "OODSERVE_MAX_BATCH_IMAGES")
    oip_error(await app_client.post(infer_url(manifest), content=b"{}",
                                    headers={"Content-Encoding": "br"}), 415, "br")
    # ... while the native API keeps its own error shape.
    native = await app_client.get("/v1/no-such-route")
    assert native.status_code == 404 and native.json()["error"]["code"] == "not_found"


@pytest.mark.anyio
async def test_overload_is_503_with_retry_after(tiny_bundle, manifest, monkeypatch):
    """With the queue taken by other requests, an inference request is refused whole with
    /predict's 503 and Retry-After, in the protocol's shape; it is admitted once they are
    done."""
    release, entered = threading.Event(), threading.Event()
    forward = Predictor.__call__

    def gated(self, batch):
        entered.set()
        release.wait(20)
        return forward(self, batch)

    monkeypatch.setattr(Predictor, "__call__", gated)
    release.set()  # warm-up goes through
    async with serve(settings(tiny_bundle, max_batch_size=1, max_batch_delay_ms=0,
                              max_queue_size=2, max_batch_images=2)) as client:
        release.clear()
        entered.clear()
        images = [noise_png(i) for i in range(2)]
        # One image in the forward pass, one waiting: the queue of 2 has one place left.
        first = asyncio.create_task(client.post(infer_url(manifest),
                                                json=json_request(images)))
        await asyncio.to_thread(entered.wait, 20)
        response = await client.post(infer_url(manifest), json=json_request(images))
        release.set()
        oip_error(response, 503, "retry")
        assert int(response.headers["retry-after"]) >= 1
        assert (await first).status_code == 200
        again = await client.post(infer_url(manifest), json=json_request(images))
        assert again.status_code == 200, again.text
