"""Dynamic batching: concurrent requests share forward passes and keep their own scores; a
queued image waits for images still being decoded, never past the delay; inference never
blocks the event loop."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from service_helpers import metric, metrics_text, predict, predict_ok, serve, settings
from uploads import noise_png

from service.batcher import Batcher
from service.decoding import Decoder
from service.inference import Predictor

pytestmark = pytest.mark.anyio

MAX_BATCH = 8
DELAY_MS = 300
# Scores of an image in a batch vs alone. float32 convolutions and matrix products may
# accumulate in a different order for different batch sizes (measured: at most 2e-6 on an
# energy of -12, i.e. 1.5e-7 relative, about one float32 ulp). 1e-5 relative is ~80 ulps:
# room for other kernels, yet far below what mixing up two images would do (their scores
# differ by 1e-2 relative or more).
RTOL = 1e-5


@pytest.fixture(scope="module")
async def batched(tiny_bundle):
    async with serve(settings(tiny_bundle, max_batch_size=MAX_BATCH, max_batch_delay_ms=DELAY_MS,
                              decode_workers=2)) as client:
        yield client


@pytest.fixture(scope="module")
async def unbatched(tiny_bundle):
    async with serve(settings(tiny_bundle, max_batch_size=1, max_batch_delay_ms=0)) as client:
        yield client


def batch_stats(text: str) -> tuple[float, float]:
    """(number of forward passes, images in them)."""
    labels = {"model": "test-resnet20"}  # the tiny bundle's series
    return (metric(text, "oodserve_batch_size_count", **labels),
            metric(text, "oodserve_batch_size_sum", **labels))


async def test_concurrent_requests_share_one_forward_pass_and_keep_their_scores(
        batched, unbatched):
    images = [noise_png(100 + i, (32 + 4 * i, 32)) for i in range(MAX_BATCH)]
    before = batch_stats(await metrics_text(batched))
    together = await asyncio.gather(*(predict_ok(batched, data) for data in images))
    after = batch_stats(await metrics_text(batched))
    passes, served = after[0] - before[0], after[1] - before[1]
    assert served == MAX_BATCH
    assert passes == 1  # a full batch goes at once, well within the 300 ms delay

    for data, batch_result in zip(images, together):
        alone = await predict_ok(unbatched, data)
        for detector in ("energy", "featurenorm"):
            assert batch_result[detector]["score"] == pytest.approx(
                alone[detector]["score"], rel=RTOL)
        assert batch_result["class_index"] == alone["class_index"]
        assert batch_result["probability"] == pytest.approx(alone["probability"], abs=1e-6)
    energies = [r["energy"]["score"] for r in together]
    assert len(set(energies)) == len(energies)  # distinct images, distinct scores


async def test_batch_endpoint_images_share_a_forward_pass(batched):
    before = batch_stats(await metrics_text(batched))
    files = [("images", (f"{i}.png", noise_png(200 + i))) for i in range(5)]
    response = await batched.post("/predict/batch", files=files)
    assert response.status_code == 200
    after = batch_stats(await metrics_text(batched))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 5)


async def test_a_lone_request_is_sent_at_once(batched):
    """Nothing else is on its way, so there is nothing to wait for."""
    before = await metrics_text(batched)
    body = await predict_ok(batched, noise_png(300))
    after = await metrics_text(batched)
    waited = (metric(after, "oodserve_queue_wait_seconds_sum")
              - metric(before, "oodserve_queue_wait_seconds_sum"))
    assert waited < DELAY_MS / 1000 / 3
    assert body["server_time_ms"] < DELAY_MS


@pytest.fixture
def slow_decoding(monkeypatch) -> tuple[bytes, threading.Event]:
    """Decoding these bytes waits for the event."""
    slow, release = noise_png(301), threading.Event()
    decode = Decoder.__call__

    def held(self, data, *rest):
        if data == slow:
            release.wait(timeout=20)
        return decode(self, data, *rest)

    monkeypatch.setattr(Decoder, "__call__", held)
    return slow, release


async def test_a_queued_image_waits_for_one_being_decoded(batched, slow_decoding):
    slow, release = slow_decoding
    before = batch_stats(await metrics_text(batched))
    first = asyncio.create_task(predict_ok(batched, slow))
    second = asyncio.create_task(predict_ok(batched, noise_png(302)))
    await asyncio.sleep(DELAY_MS / 1000 / 3)  # second is queued, first still decoding
    release.set()
    await asyncio.gather(first, second)
    after = batch_stats(await metrics_text(batched))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)  # one pass for both


async def test_but_never_longer_than_the_delay(batched, slow_decoding):
    slow, release = slow_decoding
    before = batch_stats(await metrics_text(batched))
    first = asyncio.create_task(predict_ok(batched, slow))
    second = await predict_ok(batched, noise_png(303))  # returns while first is held
    assert DELAY_MS <= second["server_time_ms"] < DELAY_MS + 1000
    release.set()
    await first
    after = batch_stats(await metrics_text(batched))
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


class Gate:
    """Forward passes wait while the gate is closed (it starts open for the warm-up)."""

    def __init__(self):
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()

    def close(self):
        self.entered.clear()
        self.open.clear()


@pytest.fixture
def gate(monkeypatch) -> Gate:
    gate = Gate()
    forward = Predictor.__call__

    def gated(self, images):
        gate.entered.set()
        if not gate.open.wait(timeout=20):
            raise TimeoutError("test gate never opened")
        return forward(self, images)

    monkeypatch.setattr(Predictor, "__call__", gated)
    return gate


async def test_full_queue_is_503_and_the_loop_stays_free(tiny_bundle, gate):
    app_settings = settings(tiny_bundle, max_batch_size=1, max_batch_delay_ms=0,
                            max_queue_size=1, max_batch_images=1)
    async with serve(app_settings) as client:
        gate.close()
        first = asyncio.create_task(predict(client, noise_png(1)))
        await wait_until(gate.entered.is_set)  # first is in the forward pass
        second = asyncio.create_task(predict(client, noise_png(2)))
        batcher = client.app.state.models.served().engine.scorer.batcher
        await wait_until(lambda: len(batcher._pending) == 1)  # queued

        started = time.perf_counter()
        assert (await client.get("/healthz")).status_code == 200
        assert time.perf_counter() - started < 1.0  # inference is off the event loop

        third = await predict(client, noise_png(3))
        assert third.status_code == 503
        assert third.json()["error"]["code"] == "overloaded"
        assert third.headers["retry-after"] == "1"

        gate.open.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def test_a_failed_forward_pass_fails_its_requests_not_the_service(tiny_bundle,
                                                                        monkeypatch):
    async with serve(settings(tiny_bundle, max_batch_delay_ms=0)) as client:
        def broken(self, images):
            raise RuntimeError("simulated device failure")

        forward = Predictor.__call__
        monkeypatch.setattr(Predictor, "__call__", broken)
        response = await predict(client, noise_png(4))
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        monkeypatch.setattr(Predictor, "__call__", forward)
        assert (await predict(client, noise_png(4))).status_code == 200


def instant_batcher() -> Batcher:
    """A started batcher whose forward pass takes no time (each image's result is itself),
    without metrics: for what the batcher measures by itself."""
    histogram = SimpleNamespace(observe=lambda value: None)
    metrics = SimpleNamespace(queue_wait=histogram, batch_size=histogram,
                              inference_duration=histogram)
    batcher = Batcher(lambda images: list(images), max_batch_size=8, max_delay_s=0.0,
                      max_queue_size=100, metrics=metrics)
    batcher.start()
    return batcher


async def test_throughput_follows_decoding_when_decoding_is_the_bottleneck():
    """A forward pass that takes no time, fed one image every 20 ms by a decoder that is
    always busy: the measured rate is the pace images arrive at (about 50/s, less on a loaded
    machine), which is what the queue drains at, not the forward pass's own (thousands a
    second). After an idle gap, the gap is not counted."""
    batcher = instant_batcher()
    try:
        decoding = batcher.preparing()
        decoding.__enter__()
        for i in range(40):  # the first batch's (instant) sample weighs 0.8**39 at the end
            await asyncio.sleep(0.02)  # image i is being decoded
            done, decoding = decoding, batcher.preparing()
            decoding.__enter__()  # the next image's decoding starts: never idle
            done.__exit__(None, None, None)
            await batcher.submit(i)
        assert 5 < batcher.throughput.rate < 100, batcher.throughput.rate  # not thousands
        decoding.__exit__(None, None, None)  # the last one is given up
        await asyncio.sleep(0.5)  # idle, nothing on its way
        rate = batcher.throughput.rate
        await batcher.submit(99)
        assert batcher.throughput.rate >= rate  # the idle half second is not a slow batch
    finally:
        await batcher.stop()


async def test_an_image_given_up_leaves_no_backlog_behind():
    """A batch ends while another image is being decoded; that decode then fails (the image
    never comes) and the service idles: the next batch is timed from its own start, not
    from the old batch's end, so an idle gap never reads as a slow pipeline."""
    batcher = instant_batcher()
    try:
        for i in range(5):
            await batcher.submit(i)
        rate = batcher.throughput.rate
        with batcher.preparing():  # decoding an image while the next batch runs ...
            await batcher.submit(5)
        # ... which is then given up: nothing is on its way any more.
        await asyncio.sleep(0.5)
        await batcher.submit(6)
        assert batcher.throughput.rate > 0.5 * rate  # a 0.5 s sample would take it to ~0.2
    finally:
        await batcher.stop()



async def test_a_stopped_batcher_refuses_work_instead_of_hanging():
    """Once stopped, no thread would ever run what is queued: submitting an image or a
    function is an error at once, not a future that never resolves; what was queued at the
    stop is cancelled."""
    batcher = instant_batcher()
    assert await batcher.submit(1) == 1
    assert await batcher.run_in_thread(lambda: 2) == 2
    await batcher.stop()
    assert batcher.stopped
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(3)
    with pytest.raises(RuntimeError, match="stopped"):
        await batcher.run_in_thread(lambda: 4)
