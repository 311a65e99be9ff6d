"""Everything a served bundle needs at run time, and the path of one image through it:
bytes -> decoding thread -> scorer -> scores -> decisions -> response.

The scorer is where images become scores, by layout (``OODSERVE_LAYOUT``): a
:class:`LocalScorer` runs the model in this process (its own batcher and inference thread);
an :class:`~service.engine_client.EngineClient` hands images to the engine process that all
the workers share. Both answer :meth:`submit` with the same :class:`ImageScores`, and both
measure their throughput, by which requests are admitted before their images are decoded
(:mod:`service.admission`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from service.admission import Admission, Overloaded, Reservation
from service.batcher import Batcher, QueueFull
from service.bundle_check import BundleCheck
from service.decoding import Decoder, ImageRejected, PixelBudget
from service.engine_client import EngineClient
from service.inference import ImageScores, Predictor
from service.metrics import Metrics
from service.schemas import (
    ClassProbability,
    DetectorResult,
    FeatureNormResult,
    ModelRef,
    Prediction,
    PredictParams,
)
from service.settings import Settings
from service.thresholds import Decisions, Policy, Threshold, resolve_policy
from training.bundle import Bundle
from training.detectors import SERVED, Detector

log = logging.getLogger("oodserve")
R = TypeVar("R")


class LocalScorer:
    """The model in this process: a :class:`Predictor` behind a :class:`Batcher`."""

    def __init__(self, settings: Settings, bundle: Bundle, metrics: Metrics):
        self.torch_threads = settings.resolved_torch_threads()
        self.predictor = Predictor.for_settings(bundle, settings, self.torch_threads)
        self.max_batch_size = self.predictor.max_batch_size
        self.device = str(self.predictor.device)
        self.dtype_name = self.predictor.dtype_name
        self.batcher: Batcher[ImageScores] = Batcher(
            self.predictor, max_batch_size=self.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size, metrics=metrics)
        self.preparing = self.batcher.preparing
        self.submit = self.batcher.submit
        self.throughput = self.batcher.throughput

    def in_forward_pass(self) -> int:
        """Images being scored now: they no longer wait in the queue."""
        return self.batcher.running

    async def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        sizes = sorted({1, self.max_batch_size})
        await self.batcher.run_in_thread(lambda: self.predictor.warm_up(sizes))
        # One more full batch, now warm, timed: admission's first estimate of the throughput
        # (service/admission.py), so that its wait bound holds from the first burst instead
        # of the count bound alone until batches have been measured.
        full = [torch.zeros(self.predictor.input_shape)] * self.max_batch_size

        def timed_pass() -> float:
            started = time.perf_counter()
            self.predictor(full)
            return time.perf_counter() - started

        seconds = await self.batcher.run_in_thread(timed_pass)
        if self.predictor.device.type == "cpu":
            # Timed with the worker's cores to itself. Under load its event loop is one more
            # busy thread on them: the forward pass's T threads then get T / (T + 1) of
            # their pace (half, with one), and a seed at the full pace admitted an opening
            # overload burst that then waited far past the bound (docs/benchmarks.md).
            seconds *= (self.torch_threads + 1) / self.torch_threads
        self.batcher.throughput.seed(self.max_batch_size, seconds)

    def not_ready_reason(self) -> str | None:
        return None

    async def stop(self) -> None:
        await self.batcher.stop()
        self.predictor.release()


class RequestDecoding:
    """One admitted request's share of the decoding: its places in the queue (given back as
    each image is done, the rest when the request ends: :meth:`close`), its
    pixel budget, and a limit on how many of its images are in the decode pool at once, so
    that a request of many images cannot monopolise the pool (the images of other requests
    queue behind at most that many)."""

    def __init__(self, reservation: Reservation, max_pixels: int, concurrency: int):
        self.reservation = reservation
        self.budget = PixelBudget(max_pixels)
        self.slots = asyncio.Semaphore(concurrency)

    @contextmanager
    def image(self) -> Iterator[None]:
        """One of the request's images, from decoding until it is scored or fails."""
        try:
            yield
        finally:
            self.reservation.release()

    def close(self) -> None:
        """The request is over: the places of its images that never ran are free again."""
        self.reservation.close()

    async def gather(self, jobs: list[Coroutine[Any, Any, R]]) -> list[R]:
        """Run the request's per-image ``jobs`` together and close the request. If one
        fails, the request has failed: the others are cancelled, so that their images are
        neither decoded nor scored (those still queued are dropped by the batcher, whose
        futures are cancelled), and the error goes on."""
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.close()


class Engine:
    def __init__(self, settings: Settings, bundle: Bundle, engine_address: Path | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.model_ref = ModelRef(name=self.manifest.name, version=self.manifest.version)
        self.block = self.manifest.featurenorm.selected_block
        self.metrics = metrics or Metrics(self.manifest)
        if engine_address is None:
            self.scorer: LocalScorer | EngineClient = LocalScorer(settings, bundle,
                                                                  self.metrics)
        else:
            # The model is elsewhere; this process's torch only preprocesses images.
            torch.set_num_threads(settings.resolved_torch_threads())
            size = self.manifest.preprocessing.input_size
            self.scorer = EngineClient(engine_address, settings.max_queue_size, (3, size, size),
                                       len(self.manifest.classes))
        workers = settings.workers if isinstance(settings.workers, int) else 1
        self.admission = Admission(self.scorer, settings.max_queue_size,
                                   settings.max_queue_wait_ms / 1000.0,
                                   sharers=1 if engine_address is None else workers)
        self.decoder = Decoder(self.manifest.preprocessing, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(settings.resolved_decode_workers(),
                                               thread_name_prefix="oodserve-decode")
        # A request's fair share of the pool: half of it (at least one thread).
        self.decodes_per_request = max(1, settings.resolved_decode_workers() // 2)
        self.default_policy = resolve_policy(self.manifest)
        self.bundle_check = BundleCheck(bundle, settings.bundle_public_key)
        self.ready = False
        self.failure: str | None = None  # why warm-up failed, for /readyz

    async def start(self) -> None:
        await self.scorer.start()
        where = ("in this process" if isinstance(self.scorer, LocalScorer)
                 else f"in the engine process ({self.scorer.address})")
        log.info("serving %s %s from %s on %s (%s) %s, batches of up to %d%s",
                 self.manifest.name, self.manifest.version, self.bundle.path,
                 self.scorer.device, self.scorer.dtype_name, where,
                 self.scorer.max_batch_size,
                 ", malloc thresholds set" if isinstance(self.scorer, LocalScorer)
                 and self.scorer.predictor.malloc_tuned else "")

    async def warm_up(self) -> None:
        try:
            await self.scorer.warm_up()
        except Exception as exc:  # warm-up failures are reported by /readyz, not lost
            log.exception("warm-up failed")
            self.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
            return
        # Everything alive now (torch, the model, the app) lives until the process ends or a
        # reload retires this engine (whose stop then lets go of its model and buffers, freed
        # by reference counting). Out of the garbage collector's reach, it is not walked by
        # every full collection, which cut the tail latency under load (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        await asyncio.to_thread(self.bundle_check.check)  # the first check hashes the weights
        self.ready = True
        log.info("warmed up; ready")

    async def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` should answer 503, or None."""
        if not self.ready:
            return self.failure or "warming up"
        return self.scorer.not_ready_reason() or await asyncio.to_thread(
            self.bundle_check.check)

    async def stop(self) -> None:
        """Stop serving, and let go of the model: a retired engine may stay referenced (by
        a request still unwinding, or frozen with a cycle by a later warm-up), its model's
        memory must not."""
        self.ready = False
        await self.scorer.stop()
        await asyncio.to_thread(self._decode_pool.shutdown, wait=True)  # the loop serves on
        self.bundle.model = None
        if isinstance(self.scorer, LocalScorer) and self.scorer.predictor.device.type == "cuda":
            torch.cuda.empty_cache()  # what the model and its graphs held, for the next one

    def request_decoding(self, images: list[bytes] | int = 1,
                         head: Reservation | None = None) -> RequestDecoding:
        """Admit a new request of ``images`` (their bytes, or how many), before any is
        decoded, or refuse it as a whole: 413 :class:`~service.decoding.RequestTooLarge` if
        the images' headers already pass its pixel budget, 503
        :class:`~service.admission.Overloaded` if they do not fit the queue. Its decoding
        share, to pass to :meth:`predict` for each image and to close when the request
        ends. ``head``: the place its head took (:func:`service.shedding.head_reservation`)."""
        budget = self.settings.max_request_pixels
        count = images if isinstance(images, int) else len(images)
        reservation = self.admission.admit(count, head)
        # After admission, so that a request refused for load costs no header reading.
        if not isinstance(images, int) and sum(map(self.decoder.pixels, images)) > budget:
            reservation.close()
            raise PixelBudget(budget).exceeded()
        return RequestDecoding(reservation, budget, self.decodes_per_request)

    def policy_for(self, params: PredictParams) -> Policy:
        """The thresholds and rule a request's parameters ask for (the bundle's when none)."""
        thresholds = params.thresholds()
        if not thresholds and params.tpr is None and params.decision is None:
            return self.default_policy
        return resolve_policy(self.manifest, thresholds, tpr=params.tpr,
                              decision=params.decision)

    async def predict(self, data: bytes, policy: Policy, top_k: int,
                      decoding: RequestDecoding | None = None,
                      head: Reservation | None = None) -> Prediction:
        """Prediction for one uploaded image; :class:`~service.errors.ServiceError` if it
        cannot be made (:class:`~service.decoding.RequestTooLarge`: the request's pixel
        budget is spent). Without ``decoding``, the image is a request of its own, admitted
        here (with its ``head`` place, if it has one)."""
        if decoding is None:  # a request of this one image: its places end with it
            own = self.request_decoding(1, head)
            try:
                return await self.predict(data, policy, top_k, own)
            finally:
                own.close()
        loop = asyncio.get_running_loop()
        with decoding.image():
            try:
                # Announced from now, while it waits for its turn to be decoded too: the
                # images of one request take turns, and a batch must not leave between them.
                with self.scorer.preparing():
                    async with decoding.slots:
                        image = await loop.run_in_executor(self._decode_pool, self.decoder,
                                                           data, decoding.budget)
                    # Queued while still announced, so that no batch leaves without it.
                    scoring = self.scorer.submit(image)
            except ImageRejected as exc:
                self.metrics.image_errors.labels(exc.code).inc()
                raise
            except QueueFull:
                raise Overloaded(1, "too many images are waiting") from None
            scores = await scoring
        decided = policy.decide(scores.scores)
        self._observe(scores, decided if policy is self.default_policy else
                      self.default_policy.decide(scores.scores))
        return self._prediction(scores, policy, decided, top_k)

    def _observe(self, scores: ImageScores, default: Decisions) -> None:
        m = self.metrics
        m.predictions.inc()
        for detector, score in scores.scores.items():
            m.scores[detector].observe(score)
        for detector, ood in (*default.ood.items(), ("combined", default.combined)):
            if ood:
                m.ood_decisions.labels(detector).inc()

    def _prediction(self, scores: ImageScores, policy: Policy, decided: Decisions,
                    top_k: int) -> Prediction:
        classes, probs = self.manifest.classes, scores.probabilities
        return Prediction(
            class_index=scores.pred, label=classes[scores.pred],
            probability=probs[scores.pred],
            top_k=[ClassProbability(index=i, label=classes[i], probability=probs[i])
                   for i in scores.ranking[:top_k]],
            **{d.name: self._detector_result(d, scores, policy.thresholds[d.name], decided)
               for d in SERVED},
            is_ood=decided.combined, decision=policy.decision)

    def _detector_result(self, detector: Detector, scores: ImageScores, threshold: Threshold,
                         decided: Decisions) -> DetectorResult:
        """A served detector's part of the response; one on a block names the block."""
        fields = {"score": scores.scores[detector.name], "is_ood": decided.ood[detector.name],
                  "threshold": threshold.value, "threshold_source": threshold.source,
                  "tpr": threshold.tpr, "higher_is_id": threshold.higher_is_id}
        if detector.block is None:
            return DetectorResult(**fields)
        return FeatureNormResult(**fields, block=self.block)
