"""Refusals answered from the request's head (service/shedding.py), through the real HTTP
protocol: uvicorn with the service's protocol class, in this process, so that a test can
hold the forward pass.

A queue of one image and batches of one: with one image held in the forward pass and one
waiting, every other scoring request is refused, deterministically and without load.
"""

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from service_helpers import free_port, metric, settings
from test_service_admission import Gate
from uploads import noise_png

from service.app import create_app
from service.http_protocol import HttpProtocol
from service.inference import Predictor

KEY = "0123456789abcdef0123"
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
MODEL = "test-resnet20"  # the tiny bundle's name
READ_TIMEOUT_S = 3.0
KEEP_ALIVE_S = 1.0


@contextmanager
def live_server(app_settings):
    """The app served by uvicorn with the service's protocol on a free port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(app_settings), host="127.0.0.1", port=port, http=HttpProtocol,
        lifespan="on", log_level="warning", timeout_keep_alive=KEEP_ALIVE_S))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def gate(monkeypatch):
    gate = Gate()
    monkeypatch.setattr(Predictor, "__call__", gate.wrap(Predictor.__call__))
    return gate


@pytest.fixture
def server(tiny_bundle, gate):
    app_settings = settings(tiny_bundle, api_key=KEY, max_batch_size=1, max_queue_size=1,
                            max_batch_images=1, max_batch_delay_ms=0,
                            read_timeout_s=READ_TIMEOUT_S)
    with live_server(app_settings) as port:
        yield port


def body(field: str = "image", padding: int = 0) -> bytes:
    """A multipart body of one PNG (``padding`` zero bytes after it)."""
    return (f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n'
            'Content-Type: image/png\r\n\r\n').encode() + noise_png(1) + (
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


def statuses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of the next ``count`` responses on ``sock``, read from one buffer: a
    pipelined response may arrive with the one before it, which a reader per response would
    swallow."""
    data, found = b"", []
    while len(found) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {found}"
            data += chunk
            continue
        head = data[:head_end].decode("latin-1").lower()
        length = int(head.split("content-length: ")[1].split("\r\n")[0])
        if len(data) < head_end + 4 + length:
            data += sock.recv(65536)
            continue
        found.append(int(head.split(" ")[1]))
        data = data[head_end + 4 + length:]
    return found


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


@contextmanager
def queue_held(port: int, gate: Gate):
    """Two requests admitted, one in the held forward pass and one waiting: the queue of one
    is full until the block ends, when both are answered 200."""
    data, socks = body(), [connect(port), connect(port)]
    gate.close()
    socks[0].sendall(head("/predict", len(data)) + data)
    assert gate.entered.wait(10)
    socks[1].sendall(head("/predict", len(data)) + data)
    time.sleep(0.3)  # its head read and its place taken
    try:
        yield
    finally:
        gate.open.set()
        assert [answer(s).status for s in socks] == [200, 200]
        for s in socks:
            s.close()


def test_a_request_that_would_be_refused_is_answered_from_its_head(server, gate):
    data = body()
    with queue_held(server, gate), connect(server) as probe:
        # Answered as soon as the head is in: no byte of the body has been sent.
        probe.sendall(head("/predict", len(data)))
        refused = answer(probe)
        assert refused.status == 503, refused.body
        error = json.loads(refused.body)["error"]
        assert error["code"] == "overloaded" and "OODSERVE_MAX_QUEUE_SIZE" in error["message"]
        assert int(refused.getheader("retry-after")) >= 1
        assert refused.getheader("x-content-type-options") == "nosniff"
        assert not refused.will_close
        # The body sent after the answer is read and dropped; the connection goes on, and
        # pipelined requests are answered in order.
        probe.sendall(data + (head("/predict", len(data)) + data) * 2
                      + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(probe, 3) == [503, 503, 200]
        # The protocol's own error shape on OIP infer; a client without the key gets 401.
        with connect(server) as oip:
            oip.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n".encode()
                        + AUTH + b"Content-Type: application/json\r\n"
                        b"Content-Length: 2\r\n\r\n{}")
            refused_oip = answer(oip)
            assert refused_oip.status == 503
            assert isinstance(json.loads(refused_oip.body)["error"], str)
        with connect(server) as keyless:
            keyless.sendall(head("/predict", len(data), auth=False) + data)
            assert answer(keyless).status == 401
        # A request on a connection that closes after it is the app's: answering from the
        # head and closing while its body still arrives would reset the connection.
        closing = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
        closing.request("POST", "/predict", body=body(padding=4_000_000), headers={
            "Authorization": f"Bearer {KEY}", "Connection": "close",
            "Content-Type": "multipart/form-data; boundary=b"})
        assert closing.getresponse().status == 503
        closing.close()
    with connect(server) as probe:  # the places are free again
        probe.sendall(head("/predict", len(data)) + data)
        assert answer(probe).status == 200
    counted = metric(httpx.get(f"http://127.0.0.1:{server}/metrics").text,
                     "oodserve_requests_total", endpoint="/predict", status="503")
    assert counted >= 3


def test_a_slow_upload_holds_no_place(server, gate):
    """The head takes a place only when the body came with it: an upload still on its way
    holds none, so slow uploads cannot hold the queue."""
    data = body()
    with connect(server) as slow, connect(server) as probe:
        slow.sendall(head("/predict", len(data)) + data[:10])
        time.sleep(0.3)
        for _ in range(3):
            probe.sendall(head("/predict", len(data)) + data)
            assert answer(probe).status == 200
        slow.sendall(data[10:])
        assert answer(slow).status == 200


def test_a_refused_body_that_stalls_or_ends_does_not_hold_the_connection(server, gate):
    """The refused request's body must keep coming (the read timeout between reads); once it
    has all been dropped, the idle connection closes after the keep-alive time, as after any
    answer."""
    data = body()
    with queue_held(server, gate), connect(server) as stalled, connect(server) as idle:
        stalled.sendall(head("/predict", len(data)) + data[:10])
        assert answer(stalled).status == 503
        stalled.sendall(data[10:20])  # more of it after the answer, then nothing
        idle.sendall(head("/predict", len(data)))
        assert answer(idle).status == 503
        idle.sendall(data)
        assert closed_within(stalled, READ_TIMEOUT_S + 2)
        assert closed_within(idle, KEEP_ALIVE_S + 2)


def test_the_place_a_head_took_comes_back_when_the_request_fails(server, gate):
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


def test_a_pause_in_a_refused_body_shorter_than_the_read_timeout_is_allowed(server, gate):
    """While a refused body is dropped, the read timeout governs, not the (shorter)
    keep-alive time: a pause longer than keep-alive does not cut the body off."""
    data = body()
    with queue_held(server, gate), connect(server) as probe:
        probe.sendall(head("/predict", len(data)) + data[:10])
        assert answer(probe).status == 503
        time.sleep(KEEP_ALIVE_S + 1)
        probe.sendall(data[10:] + head("/predict", len(data)) + data)
        assert statuses(probe, 1) == [503]


def test_a_request_after_a_dropped_body_is_not_cut_off_by_keep_alive(server, gate):
    """The rest of a refused body and a whole next request in one read: the keep-alive
    timer armed when the body ended must not close the connection while the next request
    is being answered (held here longer than the keep-alive time)."""
    data = body()
    with connect(server) as probe:
        with queue_held(server, gate):
            probe.sendall(head("/predict", len(data)) + data[:10])
            assert answer(probe).status == 503
        gate.close()
        probe.sendall(data[10:] + head("/predict", len(data)) + data)
        assert gate.entered.wait(10)
        time.sleep(KEEP_ALIVE_S + 1.5)
        gate.open.set()
        assert statuses(probe, 1) == [200]


def test_hundreds_of_pipelined_refusals_are_answered_in_order(server, gate):
    """Each refusal, answered at once, starts the next pipelined request: that must not
    recurse (400 in one read passed Python's recursion limit)."""
    refused = (b"POST /predict HTTP/1.1\r\nHost: x\r\n" + AUTH
               + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 0\r\n\r\n")
    with queue_held(server, gate), connect(server) as probe:
        probe.sendall(refused * 400)
        assert statuses(probe, 400) == [503] * 400
