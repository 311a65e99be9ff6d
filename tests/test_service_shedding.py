"""Refusals answered from the request's head (service/shedding.py), against a real server.

One worker with a queue of one image: a request whose body is still on its way holds that
place (its head took it), so that every other scoring request is refused while it waits,
deterministically and without load.
"""

import http.client
import json
import socket
import time

import httpx
import pytest
from service_helpers import metric, noise_image, png, running_service

KEY = "0123456789abcdef0123"
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
MODEL = "test-resnet20"  # the tiny bundle's name


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shedding")
    with running_service(tmp, OODSERVE_LAYOUT="replicated", OODSERVE_BUNDLE=tiny_bundle,
                         OODSERVE_WORKERS="1", OODSERVE_API_KEY=KEY,
                         OODSERVE_MAX_BATCH_SIZE="1", OODSERVE_MAX_QUEUE_SIZE="1",
                         OODSERVE_MAX_BATCH_IMAGES="1", OODSERVE_READ_TIMEOUT_S="20"
                         ) as (_, base, _):
        yield int(base.rsplit(":", 1)[1])


def body(field: str = "image", padding: int = 0) -> bytes:
    """A multipart body of one PNG (``padding`` zero bytes after it)."""
    return (f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n'
            'Content-Type: image/png\r\n\r\n').encode() + png(noise_image(1)) + (
        b"\0" * padding + b"\r\n--b--\r\n")


def head(path: str, length: int, auth: bool = True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + (AUTH if auth else b"")
            + b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {length}\r\n\r\n".encode())


def answer(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    return response


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def test_a_request_that_would_be_refused_is_answered_from_its_head(server):
    data = body()
    holder = connect(server)
    holder.sendall(head("/predict", len(data)) + data[:10])  # holds the queue's one place
    probe = connect(server)
    try:
        # Refused as soon as the head is in: no byte of the body has been sent.
        for _ in range(50):
            probe.sendall(head("/predict", len(data)))
            started = time.perf_counter()
            refused = answer(probe)
            if refused.status == 503:
                break
            probe.sendall(data)  # admitted before the holder's head was read: finish it
            assert answer(probe).status == 200
            time.sleep(0.05)
        assert refused.status == 503, refused.body
        assert time.perf_counter() - started < 2
        error = json.loads(refused.body)["error"]
        assert error["code"] == "overloaded" and "OODSERVE_MAX_QUEUE_SIZE" in error["message"]
        assert int(refused.getheader("retry-after")) >= 1
        assert refused.getheader("x-content-type-options") == "nosniff"
        assert not refused.will_close
        # The body sent after the answer is read and dropped; the connection goes on.
        probe.sendall(data + head("/predict", len(data)) + data)
        assert answer(probe).status == 503
        # The protocol's own error shape on OIP infer; a client without the key gets 401.
        oip = connect(server)
        oip.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n".encode() + AUTH
                    + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        refused_oip = answer(oip)
        assert refused_oip.status == 503
        assert isinstance(json.loads(refused_oip.body)["error"], str)
        oip.close()
        keyless = connect(server)
        keyless.sendall(head("/predict", len(data), auth=False) + data)
        assert answer(keyless).status == 401
        keyless.close()
        # A request on a connection that closes after it is the app's: answering from the
        # head and closing while its body still arrives would reset the connection.
        closing = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
        closing.request("POST", "/predict", body=body(padding=4_000_000), headers={
            "Authorization": f"Bearer {KEY}", "Connection": "close",
            "Content-Type": "multipart/form-data; boundary=b"})
        assert closing.getresponse().status == 503
        closing.close()
        # The holder's request, once its body is in, is scored with the place it took.
        holder.sendall(data[10:])
        assert answer(holder).status == 200
        probe.sendall(head("/predict", len(data)) + data)
        assert answer(probe).status == 200
    finally:
        holder.close()
        probe.close()
    counted = metric(httpx.get(f"http://127.0.0.1:{server}/metrics").text,
                     "oodserve_requests_total", endpoint="/predict", status="503")
    assert counted >= 2


def test_the_place_a_head_took_comes_back_when_the_request_fails(server):
    """A request refused by the app after its head took the queue's one place (an unknown
    form field: 422) gives the place back; else the next request would be refused."""
    with connect(server) as sock:
        for _ in range(3):
            bad = body("picture")
            sock.sendall(head("/predict", len(bad)) + bad)
            assert answer(sock).status == 422
        good = body()
        sock.sendall(head("/predict", len(good)) + good)
        assert answer(sock).status == 200
