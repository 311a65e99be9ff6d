"""Dynamic batching: concurrent requests' images share one forward pass.

Requests put their preprocessed images in a queue and await a future. One collector task on
the event loop takes up to ``max_batch_size`` images and hands them to a single inference
thread; the futures are resolved back on the loop. One thread, because concurrent forward
passes would only fight over the same cores; while it runs, the next batch fills up, so the
batch size follows the load by itself.

When to send a batch that is not full: images still being decoded are announced
(:meth:`Batcher.preparing`), and the collector waits for them, but never past ``max_delay``
after the oldest queued image arrived. With nothing on its way it sends at once, so a lone
request pays no delay at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
        self.throughput = Throughput()  # of the completed batches (see _collect)
        self.running = 0  # images in the forward pass now
        self._pending: deque[_Job[R]] = deque()
        self._preparing = 0  # images announced but not yet submitted
        self._has_work = asyncio.Event()
        self._dispatch = asyncio.Event()  # the batch is full or nothing more is on its way
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oodserve-infer")
        self._task: asyncio.Task | None = None
        self._last_finished = 0.0  # when the previous batch came back
        self._backlog_at_last_finish = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        # The batch running now ends first; the loop serves on meanwhile (other models).
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def run_in_thread(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the inference thread (warm-up), in order with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce an image that will be submitted (or given up) when the block ends."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            if self._preparing == 0:
                self._dispatch.set()
                if not self._pending:  # nothing on its way (an image given up): idle from here
                    self._backlog_at_last_finish = False

    async def submit(self, image: torch.Tensor) -> R:
        """Score one image; resolves when the batch it joined has been run."""
        if len(self._pending) >= self.max_queue_size:
            raise QueueFull
        job: _Job[R] = _Job(image, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._has_work.set()
        if len(self._pending) >= self.max_batch_size:
            self._dispatch.set()
        return await job.future

    async def _wait_for_more(self) -> None:
        while len(self._pending) < self.max_batch_size and self._preparing > 0:
            wait = self._pending[0].enqueued + self.max_delay_s - time.perf_counter()
            if wait <= 0:
                return
            self._dispatch.clear()
            try:
                await asyncio.wait_for(self._dispatch.wait(), wait)
            except TimeoutError:
                return

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has_work.wait()
            await self._wait_for_more()
            batch = [self._pending.popleft()
                     for _ in range(min(self.max_batch_size, len(self._pending)))]
            if not self._pending:
                self._has_work.clear()
            batch = [job for job in batch if not job.future.done()]  # clients that left
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                self._metrics.queue_wait.observe(started - job.enqueued)
            self._metrics.batch_size.observe(len(batch))
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [job.image for job in batch])
                finished = time.perf_counter()
                # Since the previous batch if images were queued or being decoded when it
                # ended (the gap is then the pipeline's pace: decoding, when it is the
                # bottleneck), else since this batch started (an idle gap says nothing of
                # capacity).
                since = self._last_finished if self._backlog_at_last_finish else started
                self.throughput.record(len(batch), finished - since)
            except Exception as exc:
                # Logged once, with its traceback, under the id that each of the batch's
                # requests gets in its 500; the next batch runs as usual.
                error_id = new_error_id()
                log.error("forward pass of %d images failed (error id %s)", len(batch),
                          error_id, exc_info=exc)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(InternalError(
                            "the forward pass of this image's batch failed", error_id))
                continue
            finally:
                self.running = 0
                self._last_finished = time.perf_counter()
                self._metrics.inference_duration.observe(self._last_finished - started)
                self._backlog_at_last_finish = bool(self._pending) or self._preparing > 0
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
