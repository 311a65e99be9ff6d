"""Hardening against the outside attack run (issue 18): one parameter set for the query and
the form, a per-request decode budget with fair sharing of the decode pool, header and read
limits, early refusals that every client reads, and no small leaks."""

import asyncio
import contextlib
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest
import torch
from PIL import Image
from service_helpers import running_service, serve, settings
from uploads import encode, noise_image, noise_png, png

pytestmark = pytest.mark.anyio


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


# -- parameters: the query and the form are one set -------------------------------------

IMAGE = noise_png(0)


async def form_predict(client, data: dict, params=None, files=None):
    return await client.post("/predict", data=data, params=params,
                             files=files or {"image": ("a.png", IMAGE)})


@pytest.mark.parametrize("fields,word", [
    ({"tpr": "1.5", "decision": "bogus"}, "tpr"),
    ({"tpr": "1.5", "decision": "bogus"}, "decision"),
    ({"energy_threshold": "nan"}, "energy_threshold"),
    ({"colour": "blue"}, "colour"),  # unknown field: not ignored
])
async def test_bad_or_unknown_form_fields_are_422(client, fields, word):
    assert_error(await form_predict(client, fields), 422, "invalid_request", word)


async def test_valid_form_fields_are_honoured_like_query_parameters(client):
    by_form = (await form_predict(client, {"tpr": "0.9", "decision": "all",
                                           "top_k": "2"})).json()
    by_query = (await form_predict(client, {}, params={"tpr": "0.9", "decision": "all",
                                                       "top_k": "2"})).json()
    plain = (await form_predict(client, {})).json()
    assert by_form["energy"]["threshold_source"] == "tpr"
    assert by_form["featurenorm"]["tpr"] == 0.9 and by_form["decision"] == "all"
    assert len(by_form["top_k"]) == 2
    for key in ("energy", "featurenorm", "decision", "top_k"):
        assert by_form[key] == by_query[key]
    assert plain["energy"]["threshold_source"] == "bundle"


async def test_batch_form_fields_are_honoured_and_checked(client):
    files = [("images", ("a.png", IMAGE)), ("images", ("b.png", IMAGE))]
    ok = await client.post("/predict/batch", data={"tpr": "0.9"}, files=files)
    assert ok.status_code == 200, ok.text
    assert all(r["prediction"]["energy"]["threshold_source"] == "tpr"
               for r in ok.json()["results"])
    bad = await client.post("/predict/batch", data={"tpr": "1.5"}, files=files)
    assert_error(bad, 422, "invalid_request", "tpr")


async def test_a_parameter_given_twice_must_agree(client):
    same = await form_predict(client, {"tpr": "0.9"}, params={"tpr": "0.9"})
    assert same.status_code == 200, same.text
    differ = await form_predict(client, {"tpr": "0.8"}, params={"tpr": "0.9"})
    assert_error(differ, 422, "invalid_request", "tpr", "different values")
    twice = await client.post("/predict", files=[("image", ("a.png", IMAGE)),
                                                 ("tpr", (None, "0.8")),
                                                 ("tpr", (None, "0.9"))])
    assert_error(twice, 422, "invalid_request", "tpr", "different values")


async def test_a_second_image_on_predict_is_422(client):
    files = [("image", ("a.png", IMAGE)), ("image", ("b.png", noise_png(1)))]
    assert_error(await client.post("/predict", files=files), 422, "invalid_request",
                 "image", "/predict/batch")


async def test_a_file_under_another_name_is_422(client):
    files = [("image", ("a.png", IMAGE)), ("extra", ("b.png", IMAGE))]
    assert_error(await client.post("/predict", files=files), 422, "invalid_request",
                 "extra")
    batch = [("images", ("a.png", IMAGE)), ("image", ("b.png", IMAGE))]
    assert_error(await client.post("/predict/batch", files=batch), 422, "invalid_request",
                 "form.image")


# -- the per-request decode budget and the fair share of the decode pool -----------------

async def test_a_batch_of_large_blank_pngs_is_refused_within_its_budget(tiny_bundle,
                                                                        monkeypatch):
    """The attack at small scale: each all-zero PNG passes the per-image limit and is tiny
    on the wire, but together they would decode to 8 Mpx; their headers say so, and the
    request gets 413 before any of them is decoded."""
    from service import decoding

    decoded = []
    load_rgb = decoding.load_rgb
    monkeypatch.setattr(decoding, "load_rgb",
                        lambda image: decoded.append(image.size) or load_rgb(image))
    blank = png(Image.new("RGB", (1000, 1000)))
    app_settings = settings(tiny_bundle, max_image_pixels=1_000_000,
                            max_request_pixels=2_500_000, decode_workers=2)
    async with serve(app_settings) as client:
        files = [("images", (f"{i}.png", blank)) for i in range(8)]
        response = await client.post("/predict/batch", files=files)
        assert_error(response, 413, "request_too_many_pixels", "2500000",
                     "OODSERVE_MAX_REQUEST_PIXELS")
        assert decoded == []  # refused on the headers, not after the budget's worth
        decoded.clear()
        ok = await client.post("/predict/batch", files=files[:2])  # within the budget
        assert ok.status_code == 200 and len(decoded) == 2
        single = await client.post("/predict", files={"image": ("a.png", blank)})
        assert single.status_code == 200


async def test_one_request_cannot_monopolise_the_decode_pool(tiny_bundle, monkeypatch):
    """One decoding thread, a batch of 24 slow images in flight: a single image sent just
    after it is answered long before the batch, not behind its 24 queued decodes."""
    from service import decoding

    load_rgb = decoding.load_rgb
    monkeypatch.setattr(decoding, "load_rgb",
                        lambda image: (time.sleep(0.05), load_rgb(image))[1])
    async with serve(settings(tiny_bundle, decode_workers=1)) as client:
        done = {}

        async def batch():
            files = [("images", (f"{i}.png", noise_png(i))) for i in range(24)]
            response = await client.post("/predict/batch", files=files)
            done["batch"] = time.perf_counter()
            assert response.status_code == 200

        async def probe():
            await asyncio.sleep(0.15)
            start = time.perf_counter()
            response = await client.post("/predict", files={"image": ("p.png", IMAGE)})
            done["probe"] = time.perf_counter()
            assert response.status_code == 200
            return done["probe"] - start

        _, probe_s = await asyncio.gather(batch(), probe())
        assert done["probe"] < done["batch"]
        assert probe_s < 0.5, probe_s  # two decodes' wait, not 20


def test_large_jpegs_are_decoded_reduced_and_small_ones_exactly(tiny_bundle):
    from service.decoding import DRAFT_FACTOR, Decoder, PixelBudget
    from training.bundle import load_bundle
    from training.data.folders import load_rgb

    pre = load_bundle(tiny_bundle).manifest.preprocessing
    decoder = Decoder(pre, 100_000_000)
    side = 2 * DRAFT_FACTOR * pre.resize_size  # the smallest size that is reduced
    big = encode(noise_image(3, (side * 2, side * 2)), "JPEG", quality=92)
    budget = PixelBudget(10**9)
    reduced = decoder(big, budget)
    # decoded at 1/4 scale (the shorter side kept >= side / 2), and counted so
    assert budget.used == (side // 2) ** 2
    with Image.open(io.BytesIO(big)) as image:
        exact = decoder.transform(load_rgb(image))
    assert (reduced - exact).abs().mean() < 0.02  # close to the full decode
    small = encode(noise_image(4, (side - 8, side - 8)), "JPEG", quality=92)
    budget = PixelBudget(10**9)
    with Image.open(io.BytesIO(small)) as image:
        assert torch.equal(decoder(small, budget), decoder.transform(load_rgb(image)))
    assert budget.used == (side - 8) ** 2


# -- the real server: head limits, read timeouts, early answers, response headers -------

KEY = "0123456789abcdef0123"
REQUESTS_PER_CONNECTION = 3


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """``python -m service`` (one worker) with an API key, a 2 s read timeout and
    :data:`REQUESTS_PER_CONNECTION`."""
    tmp = tmp_path_factory.mktemp("server")
    with running_service(tmp, OODSERVE_LAYOUT="replicated", OODSERVE_BUNDLE=tiny_bundle,
                         OODSERVE_API_KEY=KEY, OODSERVE_READ_TIMEOUT_S=2,
                         OODSERVE_MAX_REQUESTS_PER_CONNECTION=REQUESTS_PER_CONNECTION
                         ) as (_, base, _):
        yield int(base.rsplit(":", 1)[1])


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[float, bytes]:
    """Send ``data`` on a new connection; (seconds until the server closed it, the answer)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        start, answer = time.perf_counter(), b""
        with contextlib.suppress(OSError):  # a reset after the answer: the unread rest
            sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return time.perf_counter() - start, answer


def json_error(answer: bytes, status: int, code: str) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


def test_a_megabyte_of_headers_is_431(server):
    _, answer = raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                    + b"a" * 1_000_000 + b"\r\n\r\n")
    assert "OODSERVE_MAX_HEADER_BYTES" in json_error(answer, 431, "headers_too_large")[
        "message"]


def test_too_many_header_fields_is_431(server):
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    _, answer = raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    json_error(answer, 431, "headers_too_large")


def test_a_stalled_body_is_408_within_the_timeout(server):
    took, answer = raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + KEY.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b"
                       b"\r\nContent-Length: 1000\r\n\r\n--b\r\n")
    assert "OODSERVE_READ_TIMEOUT_S" in json_error(answer, 408, "request_timeout")["message"]
    assert 1.5 < took < 5


def test_stalled_headers_are_408_within_the_timeout(server):
    took, answer = raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    json_error(answer, 408, "request_timeout")
    assert 1.5 < took < 5


def test_an_unparsable_request_is_a_json_400(server):
    _, answer = raw(server, b"NONSENSE\x01 / HTTP/9\r\n\r\n")
    json_error(answer, 400, "bad_request")


def multipart_body(size: int) -> bytes:
    return (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
            + b"\0" * size + b"\r\n--b--\r\n")


@pytest.mark.parametrize("authorized", [True, False])
def test_early_refusals_reach_http_client_as_a_status(server, authorized):
    """40 MB to a 10 MiB limit, sent whole before reading, as http.client does: 413 (or
    401 without the key, before the body is read), never a reset."""
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    if authorized:
        headers["Authorization"] = f"Bearer {KEY}"
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    connection.request("POST", "/predict", body=multipart_body(40 * 2**20), headers=headers)
    response = connection.getresponse()
    assert response.status == (413 if authorized else 401)
    json.loads(response.read())


def test_early_refusals_reach_urllib_with_connection_close(server):
    request = urllib.request.Request(
        f"http://127.0.0.1:{server}/predict", data=multipart_body(12 * 2**20),
        headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401


def test_early_refusal_to_an_expect_100_client_is_at_once(server):
    headers = (b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 40000000\r\n\r\n")
    took, answer = raw(server, headers)
    json_error(answer, 401, "unauthorized")
    assert took < 1.5  # neither waiting for the body nor for the read timeout


def test_a_connection_closes_after_its_last_allowed_request(server):
    """Keep-alive up to the cap, then ``Connection: close`` and the server's end closes, so
    that the client reconnects (and may land on another worker)."""
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    sockets = []
    for n in range(1, REQUESTS_PER_CONNECTION + 1):
        connection.request("GET", "/healthz")
        sockets.append(connection.sock)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        last = n == REQUESTS_PER_CONNECTION
        assert response.will_close == last, n
        assert response.getheader("connection") == ("close" if last else None), n
    assert all(s is sockets[0] for s in sockets)  # one connection until then
    connection.request("GET", "/healthz")  # http.client opens a new one
    assert connection.sock is not sockets[0]
    assert connection.getresponse().status == 200
    connection.close()

    # The server, not only the client, ends the connection after the last response.
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.settimeout(10)
        for _ in range(REQUESTS_PER_CONNECTION):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()
            assert response.status == 200
        assert sock.recv(1) == b""  # end of stream, not a timeout


def test_response_headers_say_nosniff_and_not_the_server(server):
    response = httpx.get(f"http://127.0.0.1:{server}/healthz")
    assert "server" not in response.headers
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_readyz_shows_no_path_nor_hash(tiny_bundle, tmp_path, caplog):
    import re
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    async with serve(settings(bundle)) as client:
        weights = bundle / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
        response = await client.get("/readyz")
        reason = response.json()["reason"]
        assert response.status_code == 503 and "sha256" in reason, reason
        assert str(tmp_path) not in reason and not re.search(r"[0-9a-f]{64}", reason)
        assert str(bundle) in caplog.text and re.search(r"[0-9a-f]{64}", caplog.text)
        shutil.rmtree(bundle)
        reason = (await client.get("/readyz")).json()["reason"]
        assert reason == "bundle directory not found"
