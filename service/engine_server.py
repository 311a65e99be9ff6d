"""The engine process of the ``engine`` layout: it owns the model and the device, and batches
the images of every HTTP worker into shared forward passes.

Why a process of its own: on a GPU the model alone scores tens of thousands of images a
second, while one Python process spends far more CPU than that allows per request on
HTTP, multipart, decoding and the response. Workers that each hold a model would each need
a CUDA context and would split the traffic into small batches. Here N workers do the
per-request work on N cores, and this process does nothing per request but copy the image
from the worker's shared memory into the batch and its score rows back
(:mod:`service.slots`).

Two threads: one accepts workers and reads their slot numbers into one queue; the other (the
inference thread) takes up to ``max_batch_size`` images from it whenever the model is free,
so the batch size follows the load by itself, and a lone image is run at once. Padding the
batch to a captured CUDA graph's size is :class:`~service.inference.Predictor`'s business.

Lifetime: :mod:`service.workers` starts this process first and the workers once it reports
ready (model warmed up, graphs captured), and stops it last, after the workers have drained
their requests; hence SIGINT and SIGTERM are ignored here (a Ctrl-C reaches the whole process
group), and the process ends when the supervisor says so or its pipe closes (the supervisor
died). A worker that dies is simply forgotten: its queued images are skipped.

Metrics: the batch size, queue wait and forward-pass time histograms are observed here and
reach ``/metrics`` through the shared multiprocess directory; the queue wait is counted from
when this process read the slot number.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from service import slots as proto
from service.errors import new_error_id
from service.inference import Predictor
from service.metrics import Metrics
from service.settings import Settings
from service.slots import EngineInfo, RecordReader, SlotArrays
from training.bundle import Bundle, load_bundle

log = logging.getLogger("oodserve")

HELLO_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 2.0


def exit_process() -> None:
    """What a failed engine thread does by default: end the process. An engine whose thread
    died would stay up without serving, and the supervisor replaces only processes that
    exit."""
    os._exit(1)


@dataclass(eq=False)
class _Worker:
    sock: socket.socket
    pid: int
    arrays: SlotArrays
    reader: RecordReader = field(default_factory=RecordReader)
    alive: bool = True


@dataclass
class _Job:
    worker: _Worker
    slot: int
    received: float


class EngineServer:
    def __init__(self, settings: Settings, bundle: Bundle, address: Path,
                 on_fatal: Callable[[], None] = exit_process):
        self.on_fatal = on_fatal  # tests, which run the engine on a thread, record instead
        self.manifest = bundle.manifest
        self.predictor = Predictor.for_settings(bundle, settings,
                                                settings.engine_torch_threads())
        self.max_batch_size = self.predictor.max_batch_size
        self.info = EngineInfo(str(self.predictor.device), self.predictor.dtype_name,
                               self.max_batch_size)
        self.metrics = Metrics(self.manifest)
        self.metrics.describe_model(self.info.device, self.info.dtype)
        self.address = address
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._stopping = False

    def start(self) -> None:
        """Warm up (capture the graphs), then listen for workers."""
        self.predictor.warm_up(sorted({1, self.max_batch_size}))
        self.address.unlink(missing_ok=True)  # left by an engine that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.address))
        listener.listen(128)
        threading.Thread(target=self._fatal_on_error(self._receive), args=(listener,),
                         daemon=True, name="oodserve-engine-receive").start()
        log.info("engine serving %s %s on %s (%s), batches of up to %d", self.manifest.name,
                 self.manifest.version, self.info.device, self.info.dtype,
                 self.max_batch_size)

    def serve(self, control: Connection) -> None:
        """Report ready on ``control`` and run batches until told to stop."""
        try:
            control.send("ready")
        except OSError:  # the supervisor is gone: nobody will ever send work
            return
        inference = threading.Thread(target=self._fatal_on_error(self._infer),
                                     name="oodserve-engine-infer")
        inference.start()
        try:
            control.recv()  # "stop", or EOFError when the supervisor is gone
        except EOFError:
            pass
        with self._ready:
            self._stopping = True
            self._ready.notify()
        inference.join()
        self.metrics.mark_process_dead()

    def _fatal_on_error(self, target: Callable) -> Callable:
        """``target``, but an error that escapes it is logged and handed to ``on_fatal``."""
        def run(*args) -> None:
            try:
                target(*args)
            except BaseException:
                log.critical("an engine thread failed; exiting so that the engine is "
                             "replaced", exc_info=True)
                self.on_fatal()
        return run

    # -- the receiving thread ----------------------------------------------------------

    def _receive(self, listener: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is listener:
                    worker = self._accept(listener)
                    if worker is not None:
                        selector.register(worker.sock, selectors.EVENT_READ, worker)
                    continue
                worker = key.data
                try:
                    data = worker.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(worker.sock)
                    worker.alive = False
                    worker.sock.close()
                    log.info("worker %d disconnected from the engine", worker.pid)
                    continue
                now = time.perf_counter()
                jobs = [_Job(worker, slot, now) for slot, _ in worker.reader.feed(data)
                        if slot < worker.arrays.slots]
                with self._ready:
                    self._jobs.extend(jobs)
                    self._ready.notify()

    def _accept(self, listener: socket.socket) -> _Worker | None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:  # out of descriptors, or the peer gave up: not fatal
            log.error("accepting a worker's connection failed: %s", exc)
            return None
        conn.settimeout(HELLO_TIMEOUT_S)
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, proto.HELLO.size, 1)
            while len(data) < proto.HELLO.size:
                more = conn.recv(proto.HELLO.size - len(data))
                if not more:
                    raise ConnectionError("closed during the hello")
                data += more
            if len(fds) != 1:
                raise ConnectionError(f"expected one file descriptor, got {len(fds)}")
            slots, pid = proto.HELLO.unpack(data)
            if not 0 < slots < 1 << proto.STATUS_SHIFT:
                raise ValueError(f"{slots} slots")
            arrays = SlotArrays.attach(fds.pop(), slots, self.predictor.input_shape,
                                       len(self.manifest.classes))
            conn.sendall(self.info.to_line())
        except (OSError, ValueError, ConnectionError) as exc:
            log.error("a worker's connection to the engine failed: %s", exc)
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        conn.settimeout(SEND_TIMEOUT_S)
        log.info("worker %d connected to the engine with %d slots", pid, slots)
        return _Worker(conn, pid, arrays)

    # -- the inference thread ----------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        with self._ready:
            while not self._jobs and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            n = min(self.max_batch_size, len(self._jobs))
            return [self._jobs.popleft() for _ in range(n)]

    def _infer(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if job.worker.alive]
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            self.metrics.queue_wait.observe(started - job.received)
        self.metrics.batch_size.observe(len(batch))
        groups: dict[_Worker, list[int]] = {}
        for job in batch:
            groups.setdefault(job.worker, []).append(job.slot)
        # Each worker's images are one run of the batch: gathered in one copy, and their
        # rows scattered back in one.
        runs, position = [], 0
        for worker, slots in groups.items():
            runs.append((worker, slots, torch.tensor(slots),
                         slice(position, position + len(slots))))
            position += len(slots)
        try:
            for worker, _, index, rows in runs:
                torch.index_select(worker.arrays.inputs, 0, index,
                                   out=self.predictor.staging[rows])
            floats, ints = self.predictor.run(len(batch))
        except Exception as exc:
            error_id = new_error_id()
            log.error("forward pass of %d images failed (error id %s)", len(batch), error_id,
                      exc_info=exc)
            id_bytes = torch.frombuffer(bytearray(bytes.fromhex(error_id)), dtype=torch.uint8)
            for worker, slots in groups.items():
                worker.arrays.error_ids[slots] = id_bytes
                self._send(worker, slots, proto.FAILED)
            return
        finally:
            self.metrics.inference_duration.observe(time.perf_counter() - started)
        for worker, slots, index, rows in runs:
            worker.arrays.floats.index_copy_(0, index, floats[rows])
            worker.arrays.ints.index_copy_(0, index, ints[rows])
            self._send(worker, slots, proto.OK)

    @staticmethod
    def _send(worker: _Worker, slots: list[int], status: int) -> None:
        """Answer a worker. Each answer takes a message's worth of the socket's buffer (a
        few hundred fit), so a worker that stops reading would block this thread, and with
        it every worker, once they are used up: after :data:`SEND_TIMEOUT_S` it is cut off
        instead. Its requests then get 503 and it connects again, with fresh slots."""
        try:
            worker.sock.sendall(proto.encode(slots, status))
        except OSError as exc:
            if worker.alive:
                log.error("cutting off worker %d: answering it failed (%s)", worker.pid,
                          exc or type(exc).__name__)
            worker.alive = False
            with contextlib.suppress(OSError):  # the receiving thread then sees it close
                worker.sock.shutdown(socket.SHUT_RDWR)


def engine_main(address: str, control: Connection, log_config: dict,
                settings: Settings) -> None:
    """Entry point of the engine process (spawned by :mod:`service.workers`, which has
    already set SIGINT and SIGTERM to be ignored, see the module docstring), serving with
    the supervisor's resolved ``settings``."""
    logging.config.dictConfig(log_config)
    try:
        bundle = load_bundle(settings.bundle, settings.bundle_public_key)
        server = EngineServer(settings, bundle, Path(address))
        server.start()
    except Exception as exc:
        log.exception("the engine cannot start")
        control.send(f"failed: {type(exc).__name__}: {exc}")
        return
    server.serve(control)
