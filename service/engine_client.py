"""An HTTP worker's side of the ``engine`` layout: images go to the engine process through
shared memory (:mod:`service.slots`), scores come back the same way.

The client lives on the worker's event loop and never blocks it: slot numbers written by the
requests of one loop iteration leave in one ``send``, and the engine's answers are read when
the socket is readable. A worker has ``slots`` images in flight at most
(``OODSERVE_MAX_QUEUE_SIZE``, for each worker); beyond that requests get 503, as with the
replicated layout's queue. A slot is reused only once the engine has answered for it, also when the
request that filled it has gone (the engine may be reading the image). The engine answers a
batch's images together, so each answer is one sample of the throughput this worker gets
(:class:`~service.admission.Throughput`: its images over the time since the previous answer
or since the earliest of them was sent), which bounds its requests' expected wait.

If the engine goes away (it died and the supervisor is starting a new one), the requests
waiting for it get 503, ``/readyz`` says why, and the client connects again as soon as the
new engine listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch

from service import slots as proto
from service.admission import Throughput
from service.batcher import QueueFull
from service.errors import InternalError, ServiceError
from service.inference import ImageScores
from service.slots import EngineInfo, RecordReader, SlotArrays

log = logging.getLogger("oodserve")

CONNECT_TIMEOUT_S = 30.0
RECONNECT_INTERVAL_S = 0.2


class EngineUnavailable(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "not_ready", "the inference engine is restarting; retry "
                         "shortly", headers={"Retry-After": "1"})


class EngineClient:
    def __init__(self, address: Path, slots: int, input_shape: tuple[int, ...],
                 num_classes: int):
        self.address = address
        self.throughput = Throughput()
        self._sent = [0.0] * slots  # when each slot's image was handed over
        self._last_answer = 0.0
        self._input_shape, self._num_classes = input_shape, num_classes
        self.arrays, self._fd = SlotArrays.create(slots, input_shape, num_classes)
        self._free = list(range(slots))  # a stack: the same few slots (and pages) stay hot
        self._futures: dict[int, asyncio.Future[ImageScores]] = {}
        self._sock: socket.socket | None = None
        self._reader = RecordReader()
        self._outgoing = bytearray()
        self._reconnecting: asyncio.Task | None = None
        self.info: EngineInfo | None = None

    # -- what the Engine calls ---------------------------------------------------------

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def dtype_name(self) -> str:
        return self.info.dtype

    @property
    def max_batch_size(self) -> int:
        return self.info.max_batch_size

    async def start(self) -> None:
        """Connect, waiting for the engine for up to :data:`CONNECT_TIMEOUT_S`."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                self._attach(*await asyncio.to_thread(self._connect))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(RECONNECT_INTERVAL_S)

    async def warm_up(self) -> None:
        """Nothing to do: the engine warmed up before it listened."""

    def preparing(self) -> contextlib.AbstractContextManager:
        # The engine runs whatever is queued whenever it is free; it does not wait for
        # images still being decoded.
        return contextlib.nullcontext()

    def not_ready_reason(self) -> str | None:
        return None if self._sock is not None else "the inference engine is restarting"

    def in_forward_pass(self) -> int:
        """None of the images in flight count as out of the queue: the engine's batches are
        not seen from here, and a slot is taken until the engine answers for it."""
        return 0

    def submit(self, image: torch.Tensor) -> asyncio.Future[ImageScores]:
        """Send one image to the engine; the future resolves with its answer."""
        if self._sock is None:
            raise EngineUnavailable
        if not self._free:
            raise QueueFull
        slot = self._free.pop()
        self.arrays.inputs[slot].copy_(image)
        self._sent[slot] = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        self._futures[slot] = future
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing += proto.encode([slot])
        return future

    async def stop(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # -- the connection ----------------------------------------------------------------

    def _connect(self) -> tuple[socket.socket, EngineInfo]:
        """Blocking: connect, hand over the shared memory, read the engine's answer."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(str(self.address))
            socket.send_fds(sock, [proto.HELLO.pack(self.arrays.slots, os.getpid())],
                            [self._fd])
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("the engine closed the connection")
                line += chunk
            info = EngineInfo(**json.loads(line))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock, info

    def _attach(self, sock: socket.socket, info: EngineInfo) -> None:
        self._sock, self.info, self._reader = sock, info, RecordReader()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def _flush(self) -> None:
        if self._sock is None:
            return
        try:
            sent = self._sock.send(self._outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return
        del self._outgoing[:sent]
        if self._outgoing:  # the engine is behind on reading: try again shortly
            asyncio.get_running_loop().call_later(0.001, self._flush)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        answered, earliest = 0, math.inf
        for slot, status in self._reader.feed(data):
            future = self._futures.pop(slot, None)
            if future is None:  # not one of ours: freeing it would hand it out twice
                log.error("the engine answered for slot %d, which is not in flight", slot)
                continue
            answered += 1
            earliest = min(earliest, self._sent[slot])
            if not future.done():  # else its request has gone
                if status == proto.OK:
                    future.set_result(ImageScores.from_rows(
                        self.arrays.floats[slot].tolist(), self.arrays.ints[slot].tolist()))
                else:
                    error_id = bytes(self.arrays.error_ids[slot].tolist()).hex()
                    future.set_exception(InternalError(
                        "the forward pass of this image's batch failed", error_id))
            self._free.append(slot)
        if answered:
            now = time.perf_counter()
            self.throughput.record(answered, now - max(earliest, self._last_answer))
            self._last_answer = now

    def _lost(self) -> None:
        """The connection is gone: fail what waits for it and connect again in the
        background, with new shared memory. The old memory is left to whoever still maps
        it: an engine that is still running may yet write a batch's rows into it, and those
        must not land in slots that new requests have taken."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._outgoing.clear()
        log.error("lost the connection to the inference engine; %d images were waiting",
                  len(self._futures))
        for future in self._futures.values():
            if not future.done():
                future.set_exception(EngineUnavailable())
        self._futures.clear()
        self._free = []  # none until the new memory exists
        self._reconnecting = loop.create_task(self._reconnect())

    def _renew_memory(self) -> None:
        arrays, fd = SlotArrays.create(self.arrays.slots, self._input_shape,
                                       self._num_classes)
        os.close(self._fd)  # the old mapping stays with whoever still holds it
        self.arrays, self._fd = arrays, fd
        self._free = list(range(arrays.slots))

    async def _reconnect(self) -> None:
        failures, renewed = 0, False
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                if not renewed:
                    self._renew_memory()
                    renewed = True
                self._attach(*await asyncio.to_thread(self._connect))
            except Exception as exc:  # noqa: BLE001 - keep trying, whatever went wrong
                failures += 1
                if not isinstance(exc, OSError) or failures % 50 == 0:
                    log.error("cannot connect to the inference engine yet: %s", exc)
                continue
            log.info("connected to the inference engine again")
            return
