"""Admission control (issue 18): a request is admitted or refused (503 with Retry-After) as a
whole before any of its images is decoded, by the number of images waiting and by their
expected wait at the measured throughput; admitted places are all given back, so that nothing
changes when the service is not loaded. Both layouts."""

import asyncio
import gc
import threading
import time
from types import SimpleNamespace

import pytest
from service_helpers import predict, serve, settings
from test_service_engine import RunningEngine
from uploads import noise_png

from service.admission import Admission, Overloaded, Throughput
from service.decoding import Decoder
from service.inference import Predictor

pytestmark = pytest.mark.anyio


# -- the rules, on a scorer whose throughput and forward pass the test sets --------------

def scorer(rate: float | None = None, batch: int = 8, in_pass: int = 0) -> SimpleNamespace:
    throughput = Throughput()
    if rate is not None:
        for _ in range(Throughput.SETTLE):
            throughput.record(round(rate * 10), 10.0)
    return SimpleNamespace(throughput=throughput, max_batch_size=batch,
                           in_forward_pass=lambda: in_pass)


def refused(admission: Admission, images: int) -> Overloaded:
    before = admission.outstanding
    with pytest.raises(Overloaded) as info:
        admission.admit(images)
    assert admission.outstanding == before  # a refusal reserves nothing
    assert (info.value.status, info.value.code) == (503, "overloaded")
    return info.value


def test_throughput_is_an_exponentially_weighted_rate_of_batches():
    meter = Throughput()
    assert meter.rate is None
    meter.record(10, 1.0)
    assert meter.rate == 10.0
    meter.record(20, 1.0)
    assert meter.rate == pytest.approx(10.0 + Throughput.WEIGHT * 10.0)
    meter.record(0, 1.0)  # an empty or instant batch says nothing
    meter.record(5, 0.0)
    assert meter.rate == pytest.approx(12.0)
    # Used for admission only once SETTLE batches are in: the first, cold ones mislead.
    assert meter.settled_rate is None
    for _ in range(Throughput.SETTLE - 2):
        meter.record(12, 1.0)
    assert meter.settled_rate == pytest.approx(12.0)


def test_the_count_bound_refuses_a_request_as_a_whole():
    s = scorer()
    admission = Admission(s, max_queued=10, max_wait_s=1.0)
    first = admission.admit(6)
    error = refused(admission, 5)  # 6 + 5 > 10, though 4 of them would fit
    assert "OODSERVE_MAX_QUEUE_SIZE" in error.message
    assert error.headers == {"Retry-After": "1"}  # nothing measured yet
    held = [admission.admit(4)]
    s.in_forward_pass = lambda: 6  # the first request's images are being scored
    held.append(admission.admit(6))  # 4 + 6 wait
    refused(admission, 1)
    first.close()
    assert admission.outstanding == 10


def test_the_time_bound_refuses_what_would_wait_too_long():
    s = scorer(rate=100.0, batch=8)  # images per second
    admission = Admission(s, max_queued=1000, max_wait_s=0.5)
    first = admission.admit(40)  # the last waits 0.4 s
    error = refused(admission, 20)  # 0.6 s
    assert "OODSERVE_MAX_QUEUE_WAIT_MS" in error.message
    assert error.headers == {"Retry-After": "1"}  # 40 images at 100/s: under a second
    held = [admission.admit(10)]  # 0.5 s: just within
    first.release(30)
    held.append(admission.admit(20))  # 40 outstanding: 0.4 s
    assert admission.outstanding == 40

    slow = Admission(scorer(rate=10.0, batch=8), max_queued=1000, max_wait_s=0.5)
    held.append(slow.admit(8))  # 0.8 s, but one forward pass takes them all: admitted
    assert refused(slow, 1).headers == {"Retry-After": "1"}
    slow.max_wait_s = 100.0
    held.append(slow.admit(42))
    slow.max_wait_s = 0.5
    assert refused(slow, 1).headers == {"Retry-After": "5"}  # 50 images at 10/s


def test_workers_sharing_a_batch_each_count_their_share_of_it():
    """In the engine layout the workers fill one engine's batches (of 1024 on CUDA, as many
    as the queue holds): the time bound applies past a worker's share of a batch, not past
    the whole batch, which a worker's own images alone would never exceed."""
    shared = Admission(scorer(rate=100.0, batch=1024), max_queued=1024, max_wait_s=0.5,
                       sharers=8)
    held = shared.admit(128)  # a full share: 1.28 s, but one forward pass
    assert "OODSERVE_MAX_QUEUE_WAIT_MS" in refused(shared, 1).message
    alone = Admission(scorer(rate=100.0, batch=1024), max_queued=1024, max_wait_s=0.5)
    held = [held, alone.admit(1000)]  # 10 s of wait, admitted: under one batch of its own
    assert alone.outstanding == 1000


def test_places_are_given_back_once_and_at_the_latest_when_the_request_is_gone():
    admission = Admission(scorer(), max_queued=100, max_wait_s=1.0)
    reservation = admission.admit(5)
    reservation.release()
    reservation.release(2)
    assert (reservation.held, admission.outstanding) == (2, 2)
    reservation.release(10)  # never more than it holds
    assert admission.outstanding == 0
    reservation.close()
    assert admission.outstanding == 0

    admission.admit(7).close()  # closed before any image ran
    assert admission.outstanding == 0
    admission.admit(3).release()  # a caller that forgot to close: freed with the object
    gc.collect()
    assert admission.outstanding == 0


# -- the service ---------------------------------------------------------------------------

@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """One entry per image decoded, in any worker thread."""
    calls: list[int] = []
    decode = Decoder.__call__

    def counting(self, data, budget=None):
        calls.append(1)
        return decode(self, data, budget)

    monkeypatch.setattr(Decoder, "__call__", counting)
    return calls


class Gate:
    """Forward passes wait while the gate is closed (open for the warm-up)."""

    def __init__(self):
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()

    def wrap(self, forward):
        def gated(*args):
            self.entered.set()
            if not self.open.wait(timeout=20):
                raise TimeoutError("the test's gate never opened")
            return forward(*args)
        return gated


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def batch(client, seeds: list[int]):
    files = [("images", (f"{s}.png", noise_png(s))) for s in seeds]
    return await client.post("/predict/batch", files=files)


def assert_shed(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "overloaded"
    assert int(response.headers["retry-after"]) >= 1


async def check_whole_batch_admission(client, gate: Gate, decoded: list[int],
                                      queue: int) -> None:
    """With ``queue`` images admitted and the model held, a batch that does not fit is
    refused before any of its images is decoded; once the model moves on, everything admitted
    is answered and every place is free again."""
    gate.close()
    held = [asyncio.create_task(predict(client, noise_png(i))) for i in range(queue)]
    await wait_until(lambda: len(decoded) == queue and gate.entered.is_set())
    try:
        assert_shed(await batch(client, [10, 11]))
        assert len(decoded) == queue  # the refused batch was not decoded
    finally:
        gate.open.set()
    assert [(await r).status_code for r in held] == [200] * queue
    # No place was kept: a batch as large as the whole queue is admitted at once.
    response = await batch(client, list(range(20, 20 + queue)))
    assert response.status_code == 200, response.text
    assert all(item["prediction"] for item in response.json()["results"])


async def test_a_batch_that_does_not_fit_is_refused_whole_before_decoding(tiny_bundle,
                                                                          decoded,
                                                                          monkeypatch):
    gate = Gate()
    monkeypatch.setattr(Predictor, "__call__", gate.wrap(Predictor.__call__))
    # One image in the forward pass and three waiting: the queue of 4 has room for one.
    app_settings = settings(tiny_bundle, max_batch_size=1, max_batch_delay_ms=0,
                            max_queue_size=4, max_batch_images=4)
    async with serve(app_settings) as client:
        await check_whole_batch_admission(client, gate, decoded, queue=4)


async def test_the_engine_layout_admits_a_batch_whole_too(tiny_bundle, tmp_path, decoded,
                                                          monkeypatch):
    engine = RunningEngine(tiny_bundle, tmp_path / "engine.sock", device="cpu")
    gate = Gate()
    monkeypatch.setattr(engine.server.predictor, "run", gate.wrap(engine.server.predictor.run))
    try:
        # A worker's images in flight, the one being scored included, count.
        async with serve(settings(tiny_bundle, max_queue_size=3, max_batch_images=3),
                         engine_address=engine.address) as client:
            await check_whole_batch_admission(client, gate, decoded, queue=3)
    finally:
        gate.open.set()
        engine.stop()


async def shed_by_time(client, decoded: list[int]) -> tuple[int, int]:
    """Measure the throughput with enough requests for it to count, then send 12 at once:
    (answered 200, refused 503), checking that only the admitted ones were decoded."""
    for seed in range(Throughput.SETTLE):
        assert (await predict(client, noise_png(seed))).status_code == 200
    before = len(decoded)
    responses = await asyncio.gather(*(predict(client, noise_png(100 + i))
                                       for i in range(12)))
    ok = [r for r in responses if r.status_code == 200]
    for response in responses:
        if response.status_code != 200:
            assert_shed(response)
            assert "OODSERVE_MAX_QUEUE_WAIT_MS" in response.json()["error"]["message"]
    assert len(decoded) - before == len(ok)  # no image decoded for a refused request
    return len(ok), len(responses) - len(ok)


def slowed(forward, seconds: float):
    def slow(*args):
        time.sleep(seconds)
        return forward(*args)
    return slow


async def test_requests_that_would_wait_too_long_are_refused_before_decoding(
        tiny_bundle, decoded, monkeypatch):
    # About 5 images a second; a request whose image would wait over 0.5 s is refused.
    monkeypatch.setattr(Predictor, "__call__", slowed(Predictor.__call__, 0.2))
    app_settings = settings(tiny_bundle, max_batch_size=1, max_batch_delay_ms=0,
                            max_queue_wait_ms=500)
    async with serve(app_settings) as client:
        admitted, shed = await shed_by_time(client, decoded)
    assert 1 <= admitted <= 4 and shed >= 8


async def test_the_engine_layout_measures_its_throughput_and_sheds_by_time(
        tiny_bundle, tmp_path, decoded):
    engine = RunningEngine(tiny_bundle, tmp_path / "engine.sock", device="cpu",
                           max_batch_size=1)
    engine.server.predictor.run = slowed(engine.server.predictor.run, 0.2)
    try:
        async with serve(settings(tiny_bundle, max_queue_wait_ms=500),
                         engine_address=engine.address) as client:
            admitted, shed = await shed_by_time(client, decoded)
    finally:
        engine.stop()
    assert 1 <= admitted <= 4 and shed >= 8


async def test_without_load_nothing_is_refused_and_no_place_is_kept(tiny_bundle):
    """Requests one after the other, good and bad (a corrupt image in a batch, a batch over
    its pixel budget, an undecodable single image), with a queue of 4 images: none is
    refused for load, and every place comes back."""
    app_settings = settings(tiny_bundle, max_queue_size=4, max_batch_images=4, max_queue_wait_ms=1,
                            max_request_pixels=3 * 64 * 64)
    async with serve(app_settings) as client:
        for _ in range(3):
            mixed = [("images", ("a.png", noise_png(1))),
                     ("images", ("b.png", b"not an image")),
                     ("images", ("c.png", noise_png(2)))]
            response = await client.post("/predict/batch", files=mixed)
            assert response.status_code == 200
            assert [bool(item["error"]) for item in response.json()["results"]] == [
                False, True, False]
            large = [("images", (f"{i}.png", noise_png(i, (64, 64)))) for i in range(4)]
            response = await client.post("/predict/batch", files=large)
            assert response.status_code == 413, response.text
            assert (await predict(client, b"\x89PNG broken")).status_code in (415, 422)
            assert (await predict(client, noise_png(3))).status_code == 200
        response = await batch(client, [4, 5, 6, 7])  # the whole queue is free
        assert response.status_code == 200, response.text


async def test_the_wait_bound_holds_from_the_first_burst(tiny_bundle, monkeypatch):
    """Warm-up times a full batch, so admission has a throughput before any request: a
    burst that is the service's first traffic is bounded by its expected wait (about 20
    images a second here, so some 10 images within 0.5 s), not by the queue's count alone
    (1,024, which would admit all 30)."""
    monkeypatch.setattr(Predictor, "__call__", slowed(Predictor.__call__, 0.2))
    app_settings = settings(tiny_bundle, max_batch_size=4, max_batch_delay_ms=0,
                            max_queue_wait_ms=500)
    async with serve(app_settings) as client:
        throughput = client.app.state.models.served().engine.scorer.batcher.throughput
        assert throughput.seeded and throughput.batches == 1  # the warm-up's timed batch
        responses = await asyncio.gather(*(predict(client, noise_png(i))
                                           for i in range(30)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(503) >= 10 and statuses.count(200) >= 4, statuses
    for response in responses:
        if response.status_code == 503:
            assert "OODSERVE_MAX_QUEUE_WAIT_MS" in response.json()["error"]["message"]
