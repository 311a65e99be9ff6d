"""Dynamic batching: concurrent requests' images share one forward pass.

Requests put their preprocessed images in a queue and await a future. One inference thread
takes up to ``max_batch_size`` images at a time, runs them, and hands the results back to
the event loop in one call, which resolves the batch's futures. One thread, because
concurrent forward passes would only fight over the same cores; while it runs, the next
batch fills up, so the batch size follows the load by itself.

The thread, not a task on the event loop, decides when to send a batch and takes the next
one as soon as the last is done: under overload the loop is busy answering refusals, and a
collector task there waited a whole turn of the loop to be woken by each new image and again
by each finished batch, while the model sat idle. The queue is shared under a
lock that neither side holds while it works.

When to send a batch that is not full: admitted images still on their way (waiting for their
turn to be decoded, or being decoded) are announced (:meth:`Batcher.preparing`), and the
thread waits for them, but never past ``max_delay``
after the oldest queued image arrived. With nothing on its way it sends at once, so a lone
request pays no delay at all. An image is queued (:meth:`Batcher.submit`) before its
announcement ends, so that a batch is never sent without it in between.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from service.admission import Throughput
from service.errors import InternalError, new_error_id
from service.metrics import Metrics

log = logging.getLogger("oodserve")
R = TypeVar("R")


class QueueFull(Exception):
    """More images are waiting than the queue may hold (requests are admitted by
    :mod:`service.admission` first; this is the backstop)."""


@dataclass
class _Job(Generic[R]):
    image: torch.Tensor
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[R]):
    def __init__(self, run_batch: Callable[[list[torch.Tensor]], list[R]], *,
                 max_batch_size: int, max_delay_s: float, max_queue_size: int,
                 metrics: Metrics):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self.throughput = Throughput()  # of the completed batches (see _run)
        self.running = 0  # images in the forward pass now
        # Shared with the inference thread, under _lock: the queue, the images announced
        # but not yet queued, functions to run on the thread (warm-up), and the stop flag.
        self._lock = threading.Condition()
        self._pending: deque[_Job[R]] = deque()
        self._preparing = 0
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # The inference thread's own.
        self._last_finished = 0.0  # when the previous batch came back
        self._backlog_at_last_finish = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="oodserve-infer", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            dropped, calls = list(self._pending), list(self._calls)
            self._pending.clear()
            self._calls.clear()
            self._lock.notify()
        for job in dropped:
            job.future.cancel()
        for _, future in calls:
            future.cancel()
        if self._thread is not None:
            # The batch running now ends first; the loop serves on meanwhile (other models).
            await asyncio.to_thread(self._thread.join)

    async def run_in_thread(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the inference thread (warm-up), in order with the batches."""
        future = self._loop.create_future()
        with self._lock:
            self._check_running()
            self._calls.append((fn, future))
            self._lock.notify()
        return await future

    def _check_running(self) -> None:
        """Under the lock: nothing may be queued once stopped (no thread would run it)."""
        if self._stopping:
            raise RuntimeError("the batcher is stopped")

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce an image that will be submitted (or given up) before the block ends."""
        with self._lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._lock:
                self._preparing -= 1
                if self._preparing == 0:
                    self._lock.notify()

    def submit(self, image: torch.Tensor) -> asyncio.Future[R]:
        """Queue one image for scoring; the future resolves when the batch it joined has
        been run."""
        if len(self._pending) >= self.max_queue_size:
            raise QueueFull
        job: _Job[R] = _Job(image, self._loop.create_future())
        with self._lock:
            self._check_running()
            self._pending.append(job)
            self._lock.notify()
        return job.future

    # -- the inference thread -------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._lock:
                work = self._next()
            if work is None:
                return
            if isinstance(work, list):
                self._run(work)
                continue
            fn, future = work
            try:
                result, error = fn(), None
            except Exception as exc:  # noqa: BLE001 - raised again to the caller, on the loop
                result, error = None, exc
            self._hand_back(_settle, future, result, error)

    def _next(self) -> list[_Job[R]] | tuple[Callable[[], Any], asyncio.Future] | None:
        """The next batch or function to run, waiting for one (under the lock); None once
        stopped."""
        while True:
            if self._stopping:
                return None
            if self._calls:
                return self._calls.popleft()
            if self._pending:
                if len(self._pending) >= self.max_batch_size or self._preparing == 0:
                    break
                wait = self._pending[0].enqueued + self.max_delay_s - time.perf_counter()
                if wait <= 0:
                    break
                self._lock.wait(wait)
            else:
                if self._preparing == 0:  # nothing on its way: the next batch is no backlog
                    self._backlog_at_last_finish = False
                self._lock.wait()
        return [self._pending.popleft()
                for _ in range(min(self.max_batch_size, len(self._pending)))]

    def _run(self, batch: list[_Job[R]]) -> None:
        # Clients that left (their futures cancelled on the loop; read from here, a race at
        # worst scores an image for nobody).
        batch = [job for job in batch if not job.future.done()]
        if not batch:
            return
        started = time.perf_counter()
        for job in batch:
            self._metrics.queue_wait.observe(started - job.enqueued)
        self._metrics.batch_size.observe(len(batch))
        self.running = len(batch)
        results: list[R] | None = None
        error: InternalError | None = None
        try:
            results = self._run_batch([job.image for job in batch])
            finished = time.perf_counter()
            # Since the previous batch if images were queued or being decoded when it ended
            # (the gap is then the pipeline's pace: decoding, when it is the bottleneck),
            # else since this batch started (an idle gap says nothing of capacity).
            since = self._last_finished if self._backlog_at_last_finish else started
            self.throughput.record(len(batch), finished - since)
        except Exception as exc:
            # Logged once, with its traceback, under the id that each of the batch's
            # requests gets in its 500; the next batch runs as usual.
            error_id = new_error_id()
            log.error("forward pass of %d images failed (error id %s)", len(batch), error_id,
                      exc_info=exc)
            error = InternalError("the forward pass of this image's batch failed", error_id)
        finally:
            self.running = 0
            self._last_finished = time.perf_counter()
            self._metrics.inference_duration.observe(self._last_finished - started)
            with self._lock:
                self._backlog_at_last_finish = bool(self._pending) or self._preparing > 0
        self._hand_back(_deliver, batch, results, error)

    def _hand_back(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            log.warning("the event loop closed before a result could be handed back")


def _deliver(batch: list[_Job[R]], results: list[R] | None,
             error: InternalError | None) -> None:
    """On the loop: each of the batch's futures gets its result, or the batch's error."""
    for i, job in enumerate(batch):
        if not job.future.done():
            if error is None:
                job.future.set_result(results[i])
            else:
                job.future.set_exception(error)


def _settle(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
