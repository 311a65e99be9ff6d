"""Bad input: a JSON error with a clear message and the right status, counted in the metrics,
and the service still serving afterwards."""

import struct
import zlib

import pytest
from PIL import Image
from service_helpers import metric, metrics_text, predict, serve, settings
from uploads import encode, noise_image, noise_png, png

pytestmark = pytest.mark.anyio

MAX_UPLOAD = 64 * 1024
MAX_PIXELS = 1_000_000
MAX_IMAGES = 4


@pytest.fixture(scope="module")
async def client(tiny_bundle):
    # No draining after an early answer: the streaming test below sees where reading stops.
    app_settings = settings(tiny_bundle, max_upload_bytes=MAX_UPLOAD,
                            max_image_pixels=MAX_PIXELS, max_batch_images=MAX_IMAGES,
                            max_drain_bytes=0)
    async with serve(app_settings) as client:
        yield client


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for word in words:
        assert word in error["message"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels in a few dozen bytes: a decompression
    bomb's header, which must be refused before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


async def test_not_an_image_is_415_and_counted(client):
    before = await metrics_text(client)
    response = await predict(client, b"this is plain text, not a picture")
    assert_error(response, 415, "not_an_image", "JPEG")
    after = await metrics_text(client)
    for name, labels in [("oodserve_requests_total", {"endpoint": "/predict", "status": "415"}),
                         ("oodserve_image_errors_total", {"reason": "not_an_image"})]:
        assert metric(after, name, **labels) == metric(before, name, **labels) + 1


async def test_unsupported_format_is_415(client):
    tiff = encode(noise_image(0), "TIFF")
    assert_error(await predict(client, tiff), 415, "not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
async def test_truncated_image_is_422(client, fmt):
    data = encode(noise_image(1, (64, 64)), fmt)
    assert_error(await predict(client, data[: len(data) // 2]), 422, "corrupt_image",
                 "truncated")


async def test_empty_file_is_422(client):
    assert_error(await predict(client, b""), 422, "empty_file")


async def test_too_many_bytes_by_content_length_is_413(client):
    before = await metrics_text(client)
    response = await predict(client, b"\xff" * (MAX_UPLOAD + 1))
    assert_error(response, 413, "body_too_large", str(MAX_UPLOAD))
    after = await metrics_text(client)
    labels = {"endpoint": "/predict", "status": "413"}
    assert metric(after, "oodserve_requests_total", **labels) == metric(
        before, "oodserve_requests_total", **labels) + 1


async def test_too_many_bytes_is_refused_while_streaming(client):
    """No Content-Length (chunked upload): the server must stop reading at the limit, not
    take in the whole body first."""
    chunk, chunks = 4096, 256  # 1 MiB in all, 16x the limit
    sent = 0
    boundary = "oodserveboundary"

    async def body():
        nonlocal sent
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
               f"filename=\"big.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(chunks):
            sent += 1
            yield b"\xff" * chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await client.post("/predict", content=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "body_too_large")
    assert sent * chunk <= MAX_UPLOAD + 2 * chunk  # stopped at the limit


async def test_too_many_pixels_is_413(client):
    big = png(Image.new("RGB", (1001, 1000)))  # small file, 1.001 megapixels
    assert len(big) < MAX_UPLOAD
    assert_error(await predict(client, big), 413, "too_many_pixels", "1001x1000")


async def test_decompression_bomb_header_is_413(client):
    assert_error(await predict(client, png_header_only(100_000, 100_000)), 413,
                 "too_many_pixels")


async def test_sliver_that_resizing_would_blow_up_is_413(client):
    # 1 x 900,000 is under the pixel limit, but its shorter side resized to 32 is not.
    sliver = png(Image.new("L", (1, 900_000)))
    assert_error(await predict(client, sliver), 413, "too_many_pixels", "resizing")


async def test_missing_field_is_422(client):
    assert_error(await client.post("/predict"), 422, "invalid_request", "image")
    wrong_name = await client.post("/predict", files={"file": ("a.png", noise_png(0))})
    assert_error(wrong_name, 422, "invalid_request", "image", "Field required")


@pytest.mark.parametrize("params,field", [
    ({"energy_threshold": "nan"}, "energy_threshold"),
    ({"energy_threshold": "inf"}, "energy_threshold"),
    ({"energy_threshold": "-1e9"}, "energy_threshold"),
    ({"featurenorm_threshold": "-1"}, "featurenorm_threshold"),
    ({"featurenorm_threshold": "Infinity"}, "featurenorm_threshold"),
    ({"tpr": "0"}, "tpr"),
    ({"tpr": "1.5"}, "tpr"),
    ({"tpr": "nan"}, "tpr"),
    ({"tpr": "lots"}, "tpr"),
    ({"decision": "most"}, "decision"),
    ({"top_k": "0"}, "top_k"),
    ({"energy_treshold": "1"}, "energy_treshold"),  # a typo is reported, not ignored
])
async def test_bad_parameters_are_422(client, params, field):
    response = await predict(client, noise_png(0), **params)
    assert_error(response, 422, "invalid_request", field)


async def test_too_many_images_in_a_batch_is_413(client):
    files = [("images", (f"{i}.png", noise_png(i))) for i in range(MAX_IMAGES + 1)]
    response = await client.post("/predict/batch", files=files)
    assert_error(response, 413, "too_many_images", str(MAX_IMAGES))


async def test_a_bad_image_in_a_batch_is_an_error_entry(client):
    before = await metrics_text(client)
    files = [("images", ("good0.png", noise_png(0))),
             ("images", ("text.txt", b"not an image")),
             ("images", ("cut.jpg", encode(noise_image(1, (64, 64)), "JPEG")[:300])),
             ("images", ("good1.png", noise_png(1)))]
    response = await client.post("/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["good0.png", "text.txt", "cut.jpg", "good1.png"]
    assert results[0]["prediction"] is not None and results[0]["error"] is None
    assert results[1]["prediction"] is None and results[1]["error"]["code"] == "not_an_image"
    assert results[2]["prediction"] is None and results[2]["error"]["code"] == "corrupt_image"
    assert results[3]["prediction"] is not None
    after = await metrics_text(client)
    for reason in ("not_an_image", "corrupt_image"):
        assert metric(after, "oodserve_image_errors_total", reason=reason) == metric(
            before, "oodserve_image_errors_total", reason=reason) + 1
    assert metric(after, "oodserve_predictions_total") == metric(
        before, "oodserve_predictions_total") + 2


async def test_malformed_multipart_is_a_json_error(client):
    response = await client.post("/predict", content=b"--x\r\nnonsense", headers={
        "Content-Type": "multipart/form-data"})  # no boundary
    assert response.status_code in (400, 422)
    assert "error" in response.json()


async def test_still_serving_after_bad_input(client):
    assert (await client.get("/healthz")).status_code == 200
    assert (await predict(client, noise_png(5))).status_code == 200
