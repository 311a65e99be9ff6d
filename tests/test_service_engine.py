"""The engine layout in one process: an :class:`EngineServer` on a thread, and the app as one
of its workers (an :class:`EngineClient` instead of a model of its own).

The same tests run on CUDA when there is one (graphs captured, as served there); the
multi-process behaviour (supervisor, SIGTERM, replacement) is in test_service_layouts.py.
"""

import asyncio
import logging
import threading
from multiprocessing import Pipe

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from service_helpers import metric, metrics_text, predict, predict_ok, serve
from service_helpers import settings as app_settings
from uploads import noise_image, noise_png, png

from service.engine_server import EngineServer
from training.bundle import load_bundle
from training.evaluation import score_batch

pytestmark = pytest.mark.anyio

RTOL = 1e-5  # as test_service_parity: batches of other sizes sum in another order

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))]


class RunningEngine:
    """An engine server on a thread, stopped the way the supervisor stops it."""

    def __init__(self, bundle, address, **overrides):
        self.fatal: list[bool] = []  # a thread that failed (the real engine would exit)
        self.server = EngineServer(app_settings(bundle, **overrides), load_bundle(bundle),
                                   address, on_fatal=lambda: self.fatal.append(True))
        self.server.start()
        self.control, child = Pipe()
        self.thread = threading.Thread(target=self.server.serve, args=(child,), daemon=True)
        self.thread.start()
        assert self.control.recv() == "ready"
        self.address = address

    def stop(self) -> None:
        self.control.send("stop")
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.fatal, "an engine thread failed (see the log)"


@pytest.fixture(params=DEVICES)
def engine(request, tiny_bundle, tmp_path):
    running = RunningEngine(tiny_bundle, tmp_path / "engine.sock", device=request.param,
                            max_batch_size=8)
    yield running
    running.stop()


def serve_worker(bundle, engine, **overrides):
    """The app as a worker of ``engine``, and a client."""
    return serve(app_settings(bundle, **overrides), engine_address=engine.address)


async def test_a_worker_gets_evaluations_scores_from_the_engine(tiny_bundle, engine):
    """24 images at once through the engine: batched (fewer passes than images), and each
    image's scores equal training's evaluation of that image alone."""
    async with serve_worker(tiny_bundle, engine) as client:
        images = [noise_image(700 + i, (40, 36)) for i in range(24)]
        served = await asyncio.gather(*(predict_ok(client, png(im)) for im in images))
        model_info = metric(await metrics_text(client), "oodserve_model_info",
                            architecture="resnet20", device=engine.server.info.device,
                            dtype="float32", name="test-resnet20",
                            selected_block="layer2.2", version="0.0.0")
    bundle = load_bundle(tiny_bundle)
    decoder_transform = bundle.manifest.preprocessing.eval_transform()
    batch = torch.stack([decoder_transform(im) for im in images])
    want = score_batch(bundle.model.eval(), batch, ["layer2.2"])
    np.testing.assert_allclose([r["energy"]["score"] for r in served], want.of("energy"),
                               rtol=RTOL)
    np.testing.assert_allclose([r["featurenorm"]["score"] for r in served],
                               want.of("featurenorm", "layer2.2"), rtol=RTOL)
    np.testing.assert_allclose([r["probability"] for r in served],
                               want.of("msp"), rtol=RTOL)
    assert [r["class_index"] for r in served] == want.pred.tolist()
    assert model_info == 1.0
    registry_text = generate_latest(engine.server.metrics.registry).decode()
    passes = metric(registry_text, "oodserve_batch_size_count")
    assert metric(registry_text, "oodserve_batch_size_sum") == 24
    assert passes < 24


async def test_a_worker_with_no_free_slot_sheds_with_503(tiny_bundle, engine, monkeypatch):
    """A worker has OODSERVE_MAX_QUEUE_SIZE images in flight at most; the next gets 503, and
    the held ones are answered once the engine moves again."""
    gate, entered = threading.Event(), threading.Event()
    run = engine.server.predictor.run

    def held(n):
        entered.set()
        assert gate.wait(20)
        return run(n)

    monkeypatch.setattr(engine.server.predictor, "run", held)
    async with serve_worker(tiny_bundle, engine, max_queue_size=2, max_batch_images=2) as client:
        try:
            first = [asyncio.create_task(predict(client, noise_png(i)))
                     for i in range(2)]
            await asyncio.to_thread(entered.wait, 20)
            shed = await predict(client, noise_png(9))
            assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
        finally:
            gate.set()
        assert [(await r).status_code for r in first] == [200, 200]
        assert (await predict(client, noise_png(10))).status_code == 200


async def test_a_failed_engine_pass_is_a_500_with_the_logged_error_id(tiny_bundle, engine,
                                                                     monkeypatch, caplog):
    def broken(n):
        raise RuntimeError("simulated device failure")

    async with serve_worker(tiny_bundle, engine) as client:
        monkeypatch.setattr(engine.server.predictor, "run", broken)
        with caplog.at_level(logging.ERROR, logger="oodserve"):
            response = await predict(client, noise_png(1))
        assert response.status_code == 500
        error_id = response.json()["error"]["id"]
        assert f"(error id {error_id})" in caplog.text
        monkeypatch.undo()
        assert (await predict(client, noise_png(2))).status_code == 200


async def test_a_worker_that_stops_reading_is_cut_off_not_waited_for(tiny_bundle, tmp_path,
                                                                    caplog):
    """A peer that sends 600 slot numbers and never reads its answers fills its socket's
    buffer (each answer is one message, and batches of one make 600): the engine cuts it off
    after SEND_TIMEOUT_S instead of blocking every worker, and a real worker is served."""
    import os
    import socket

    from service import slots as proto
    from service.slots import SlotArrays

    engine = RunningEngine(tiny_bundle, tmp_path / "engine.sock", device="cpu",
                           max_batch_size=1)
    try:
        _arrays, fd = SlotArrays.create(600, (3, 32, 32), 10)
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(engine.address))
        socket.send_fds(stalled, [proto.HELLO.pack(600, os.getpid())], [fd])
        assert stalled.recv(4096).endswith(b"\n")
        with caplog.at_level(logging.ERROR, logger="oodserve"):
            stalled.sendall(proto.encode(list(range(600))))
            async with serve_worker(tiny_bundle, engine) as client:
                response = await asyncio.wait_for(predict(client, noise_png(3)), 30)
        assert response.status_code == 200
        assert "cutting off worker" in caplog.text
        stalled.close()
        os.close(fd)
    finally:
        engine.stop()
