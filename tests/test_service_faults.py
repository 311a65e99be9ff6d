"""Faults: a forward pass that raises fails its own batch's requests (500 with an error id
that is in the log) and no other; out of memory splits a batch and retries; SIGTERM drains
the requests in flight before the process exits; a bundle that goes missing or bad makes
/readyz fail with the reason, in the answer and in the log, while predictions keep coming
from the model checked at start."""

import asyncio
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from service_helpers import free_port, predict, predict_ok, serve, settings
from uploads import noise_png

import service.inference
from service.app import create_app
from service.inference import Predictor
from training.bundle import BundleError, load_bundle

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[1]


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# -- a forward pass that raises -----------------------------------------------------------

class FailingForward:
    """Predictor.__call__ that waits at a gate and raises on the given calls (counted from
    the first after arm())."""

    def __init__(self, fail_calls: set[int]):
        self.fail_calls, self.calls, self.armed = fail_calls, 0, False
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.forward = Predictor.__call__

    def arm(self) -> None:
        self.armed, self.calls = True, 0
        self.gate.clear()

    def __call__(self, predictor, images):
        if not self.armed:
            return self.forward(predictor, images)
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        if self.calls in self.fail_calls:
            raise RuntimeError("simulated device failure")
        return self.forward(predictor, images)


async def test_a_failed_forward_pass_fails_only_its_batch_with_a_logged_error_id(
        tiny_bundle, monkeypatch, caplog):
    failing = FailingForward(fail_calls={2})
    monkeypatch.setattr(Predictor, "__call__",
                        lambda self, images: failing(self, images))
    app_settings = settings(tiny_bundle, max_batch_size=2, max_batch_delay_ms=0)
    async with serve(app_settings) as client:
        pending = client.app.state.models.served().engine.scorer.batcher._pending
        failing.arm()
        send = lambda seed: asyncio.create_task(predict(client, noise_png(seed)))
        first = send(1)  # forward pass 1, held at the gate
        await wait_until(failing.entered.is_set)
        failed = [send(2), send(3)]  # queued together: forward pass 2, which raises
        await wait_until(lambda: len(pending) == 2)
        after = [send(4), send(5)]  # forward pass 3
        await wait_until(lambda: len(pending) == 4)
        with caplog.at_level(logging.ERROR, logger="oodserve"):
            failing.gate.set()
            responses = await asyncio.gather(first, *failed, *after)
        assert failing.calls == 3
        assert [r.status_code for r in responses] == [200, 500, 500, 200, 200]
        errors = [r.json()["error"] for r in responses[1:3]]
        assert {e["code"] for e in errors} == {"internal_error"}
        error_id = errors[0]["id"]
        assert errors[1]["id"] == error_id and len(error_id) == 16
        assert error_id in errors[0]["message"]
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert len(logged) == 1  # once per batch, not once per request
        assert "forward pass of 2 images failed" in logged[0].getMessage()
        assert "simulated device failure" in caplog.text  # with the traceback
        # The service goes on: the next request, and readiness, are fine.
        assert (await predict(client, noise_png(6))).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_a_failed_forward_pass_fails_a_batch_request_whole(tiny_bundle, monkeypatch,
                                                                 caplog):
    async with serve(settings(tiny_bundle, max_batch_delay_ms=0)) as client:
        def broken(self, images):
            raise RuntimeError("simulated device failure")

        monkeypatch.setattr(Predictor, "__call__", broken)
        files = [("images", (f"{i}.png", noise_png(i))) for i in range(2)]
        with caplog.at_level(logging.ERROR, logger="oodserve"):
            response = await client.post("/predict/batch", files=files)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal_error" and error["id"] in caplog.text


async def test_an_unexpected_error_gets_an_id_in_the_log(tiny_bundle, monkeypatch, caplog):
    async with serve(settings(tiny_bundle)) as client:
        def broken(*args, **kwargs):
            raise ValueError("simulated bug")

        monkeypatch.setattr(client.app.state.models.served().engine, "_prediction", broken)
        with caplog.at_level(logging.ERROR, logger="oodserve"):
            response = await predict(client, noise_png(1))
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal_error" and error["id"] in error["message"]
        record = next(r for r in caplog.records if error["id"] in r.getMessage())
        assert "/predict" in record.getMessage() and record.exc_info is not None


# -- out of memory ------------------------------------------------------------------------

class FakeOOM(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, which only a GPU raises for real."""


@pytest.fixture
def predictor(tiny_bundle):
    return Predictor(load_bundle(tiny_bundle), "cpu", "float32", 32, 1)


def images(n: int) -> list[torch.Tensor]:
    return [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))
            for i in range(n)]


def test_out_of_memory_splits_the_batch_and_retries(predictor, monkeypatch, caplog):
    monkeypatch.setattr(service.inference, "OOM_ERRORS", (FakeOOM,))
    score_batch, sizes = service.inference.score_batch, []

    def limited(model, batch, taps):
        sizes.append(len(batch))
        if len(batch) > 3:  # more than 3 images "do not fit"
            raise FakeOOM("CUDA out of memory (simulated)")
        return score_batch(model, batch, taps)

    batch = images(7)
    alone = [predictor([image])[0] for image in batch]
    monkeypatch.setattr(service.inference, "score_batch", limited)
    with caplog.at_level(logging.WARNING, logger="oodserve"):
        results = predictor(batch)
    assert sizes == [7, 3, 4, 2, 2]  # halves, recursively, until they fit
    assert [r.pred for r in results] == [a.pred for a in alone]
    for got, want in zip(results, alone):
        assert got.scores == pytest.approx(want.scores, rel=1e-5)
    assert "out of memory on a batch of 7 images; retrying as 3 + 4" in caplog.text


def test_a_single_image_that_does_not_fit_fails(predictor, monkeypatch):
    monkeypatch.setattr(service.inference, "OOM_ERRORS", (FakeOOM,))

    def never(model, batch, taps):
        raise FakeOOM("CUDA out of memory (simulated)")

    monkeypatch.setattr(service.inference, "score_batch", never)
    with pytest.raises(FakeOOM):
        predictor(images(4))


def test_other_errors_are_not_retried(predictor, monkeypatch):
    calls = []

    def broken(model, batch, taps):
        calls.append(len(batch))
        raise RuntimeError("not an out-of-memory error")

    monkeypatch.setattr(service.inference, "score_batch", broken)
    with pytest.raises(RuntimeError):
        predictor(images(4))
    assert calls == [4]


def test_the_real_oom_error_is_caught_by_default():
    assert torch.cuda.OutOfMemoryError in service.inference.OOM_ERRORS


# -- SIGTERM ------------------------------------------------------------------------------

SLOW_SERVICE = """
import os, sys, time
from service.inference import Predictor
forward = Predictor.__call__
def slow(self, images):
    time.sleep(float(os.environ["TEST_FORWARD_SECONDS"]))
    return forward(self, images)
Predictor.__call__ = slow
from service.__main__ import main
main()
"""


def raw_request(port: int, image: bytes) -> bytes:
    boundary = "drainboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x.png\"\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode() + body


def read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the body"
        rest += chunk
    return int(head.split()[1])


def requests_then_sigterm(proc: subprocess.Popen, port: int, n: int) -> tuple[list[int], int]:
    """``n`` requests on ``n`` connections, SIGTERM as the first answer comes in; checks
    that nothing is accepted any more, then returns every request's status and how many had
    been answered when the signal was sent."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for i, sock in enumerate(sockets):
        sock.sendall(raw_request(port, noise_png(i)))
    select.select(sockets, [], [], 60)  # the first answer is coming in
    proc.send_signal(signal.SIGTERM)
    answered_before = len(select.select(sockets, [], [], 0)[0])
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    statuses = [read_status(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    return statuses, answered_before


def test_sigterm_drains_the_requests_in_flight(tiny_bundle, tmp_path):
    """16 requests on 16 connections, forward passes of 2 images taking 0.4 s each: SIGTERM
    arrives with the first answer, most of the others still queued or running. All 16 are
    answered 200, nothing new is accepted meanwhile, and the process exits cleanly."""
    port, n = free_port(), 16
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODSERVE_")}
    # One worker: the slow forward pass is patched into this process, not spawned workers.
    # The 16 images' expected wait (about 3 s at 5 a second) is admitted: draining is what
    # this test is about, not shedding.
    env.update(OMP_NUM_THREADS="1", OODSERVE_TORCH_THREADS="1", OODSERVE_BUNDLE=str(tiny_bundle),
               OODSERVE_WORKERS="1", OODSERVE_PORT=str(port), OODSERVE_MAX_BATCH_SIZE="2",
               OODSERVE_MAX_BATCH_DELAY_MS="0", OODSERVE_MAX_QUEUE_WAIT_MS="60000",
               TEST_FORWARD_SECONDS="0.4", PYTHONPATH=str(REPO))
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVICE], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while b"200" not in _get(port, "/readyz"):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        statuses, answered_before = requests_then_sigterm(proc, port, n)
        assert statuses == [200] * n, log.read_text()
        assert n - answered_before >= n // 2  # most were still queued or running at SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Waiting for application shutdown" in text and "Application shutdown complete" in text
    assert "Traceback" not in text and "Cancelled" not in text


def _get(port: int, path: str) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(100)
    except OSError:
        return b""


# -- the bundle ---------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    return path


async def readiness(client) -> tuple[int, str | None]:
    response = await client.get("/readyz")
    return response.status_code, response.json()["reason"]


async def test_a_bundle_corrupted_while_serving_fails_readyz_not_predictions(
        bundle_copy, caplog):
    weights = bundle_copy / "model.safetensors"
    original = weights.read_bytes()
    async with serve(settings(bundle_copy)) as client:
        before = await predict_ok(client, noise_png(1))
        assert await readiness(client) == (200, None)

        corrupt = bytearray(original)
        corrupt[len(corrupt) // 2] ^= 0xFF
        with caplog.at_level(logging.WARNING, logger="oodserve"):
            weights.write_bytes(bytes(corrupt))
            status, reason = await readiness(client)
            assert status == 503 and "sha256" in reason and "does not match" in reason
            assert (await readiness(client))[0] == 503  # stays so
            # Still the model checked at start: the same answer as before.
            after = await predict_ok(client, noise_png(1))
            assert after["energy"] == before["energy"]
            logged = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(logged) == 1 and reason in logged[0].getMessage()  # logged once

            weights.write_bytes(original)
            assert await readiness(client) == (200, None)
            assert "the served one again" in caplog.text


async def test_a_bundle_removed_or_replaced_while_serving_fails_readyz(bundle_copy,
                                                                       tiny_bundle, tmp_path):
    async with serve(settings(bundle_copy)) as client:
        moved = tmp_path / "moved"
        bundle_copy.rename(moved)
        status, reason = await readiness(client)
        assert status == 503 and "bundle directory not found" in reason
        moved.rename(bundle_copy)
        assert await readiness(client) == (200, None)

        (bundle_copy / "model.safetensors").unlink()
        status, reason = await readiness(client)
        assert status == 503 and "cannot be read" in reason
        shutil.copy(tiny_bundle / "model.safetensors", bundle_copy / "model.safetensors")
        assert await readiness(client) == (200, None)

        manifest = bundle_copy / "manifest.json"
        text = manifest.read_text()
        manifest.write_text(text.replace('"version": "0.0.0"', '"version": "0.0.1"'))
        status, reason = await readiness(client)
        assert status == 503 and "changed since the bundle was loaded" in reason
        manifest.write_text("{not json")
        status, reason = await readiness(client)
        assert status == 503 and "no longer a valid manifest" in reason
        manifest.write_text(text)
        assert await readiness(client) == (200, None)


async def test_a_bad_bundle_at_start_is_refused_and_logged(bundle_copy, caplog):
    """The in-process path (also uvicorn's --factory, used with several workers);
    `python -m service` refuses it before uvicorn starts (tests/test_service_start.py)."""
    weights = bundle_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    app = create_app(settings(bundle_copy))
    with caplog.at_level(logging.ERROR, logger="oodserve"), pytest.raises(BundleError):
        async with app.router.lifespan_context(app):
            pass
    assert "cannot serve the bundle" in caplog.text and "does not match" in caplog.text
    assert app.state.models is None  # nothing was ever served
