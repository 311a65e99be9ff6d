"""Several worker processes on one port, each with its own listening socket.

Why not uvicorn's own ``workers``: its workers share one listening socket, and a worker that
wakes up accepts every connection waiting on it. Clients that keep their connections alive
and open them together (a load generator, a pool in a client library, a proxy) therefore
often end up on one worker while the others idle, and throughput drops accordingly
(``bench/serve.py``, docs/benchmarks.md). Here every worker
binds its own socket with ``SO_REUSEPORT`` and the kernel spreads new connections across
the sockets by a hash of their addresses.

The supervisor (this process) starts the workers, starts a new one in place of any that dies
(after removing the dead one's live gauges from the shared metrics), and on SIGTERM or
SIGINT sends the workers SIGTERM and waits for them to finish the requests in flight
(uvicorn's graceful shut-down); SIGHUP it sends on to every worker, which reloads its models
(:mod:`service.reload`; not in the engine layout). Every child process is started with
SIGINT blocked (:func:`sigint_blocked`): a Ctrl-C reaches the whole process group, and a
child that took it for itself would print a ``KeyboardInterrupt`` traceback if it came while
the child was still starting, or stop before the supervisor told it to. The workers and the
engine are handed the supervisor's resolved settings. In the engine layout it also runs the
engine process (:mod:`service.engine_server`): first, before any worker, and last. It
imports neither torch nor the app.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from prometheus_client import multiprocess

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("oodserve")

# A worker that dies within this many seconds of starting is not restarted: it would only
# die again (a port in use, a bundle that broke after the check), so the service stops.
EARLY_DEATH_S = 10.0
# How long the engine, told to stop once the workers are gone, may take to do so.
ENGINE_STOP_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> None:
    """Have the kernel send this process ``signum`` when its parent dies, so that a
    supervisor killed outright (SIGKILL, OOM killer) leaves no engine holding the GPU.
    Linux only; elsewhere nothing happens."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile: a process started here inherits the block
    (across exec too) and never sees SIGINT; one sent to this process meanwhile arrives
    when the block ends."""
    # multiprocessing's resource tracker, started along with the first child process,
    # unblocks SIGINT once it has started: start it first.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other processes may bind as well. Bound, not yet
    listening: uvicorn starts listening once the app has started, and until then the kernel
    sends new connections to the other workers instead of queueing them here."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def stop_with(supervisor: int) -> None:
    """SIGTERM this process (uvicorn then drains and exits) once ``supervisor`` has ended,
    however it ended. A worker's parent is the fork server, not the supervisor, and the
    fork server lives as long as any worker does (each holds its liveness pipe), so the
    parent-death signal cannot serve here; a pidfd of the supervisor can (Linux 5.3+;
    elsewhere nothing happens)."""
    try:
        pidfd = os.pidfd_open(supervisor)
    except ProcessLookupError:  # it is gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except (OSError, AttributeError) as exc:
        log.warning("cannot watch the supervisor (%s): this worker will outlive it if it is "
                    "killed outright", exc)
        return

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="oodserve-lifeline").start()


def _worker(options: dict[str, Any], settings: Settings, engine_address: str | None,
            supervisor: int) -> None:
    import functools

    import uvicorn

    from service.app import create_app

    stop_with(supervisor)
    from service.reload import SUPERVISOR_ENV

    os.environ[SUPERVISOR_ENV] = str(supervisor)  # POST /admin/reload asks it to reload all

    if engine_address is not None:
        from service.app import ENGINE_ADDRESS_ENV

        os.environ[ENGINE_ADDRESS_ENV] = engine_address

    config = uvicorn.Config(functools.partial(create_app, settings), factory=True, **options)
    try:
        sock = reuse_port_socket(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        raise SystemExit(1) from None
    uvicorn.Server(config).run(sockets=[sock])


def _engine(address: str, control: Connection, log_config: dict, settings: Settings) -> None:
    # Ignored from the start (importing torch takes seconds): see engine_server.engine_main.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    from service.engine_server import engine_main  # here, in the child: torch stays out

    engine_main(address, control, log_config, settings)


class _EngineProcess:
    """The engine process of the engine layout (:mod:`service.engine_server`). Spawned, not
    forked from the preloaded server: it alone initialises CUDA."""

    def __init__(self, address: str, log_config: dict, settings: Settings):
        self.control, child_end = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_engine, name="oodserve-engine",
            args=(address, child_end, log_config, settings))
        with sigint_blocked():
            self.process.start()
        child_end.close()
        log.info("started the engine process %d", self.process.pid)

    def wait_ready(self, stopping: Callable[[], bool]) -> str | None:
        """None once the engine is ready, else why it is not. Gives up, killing the engine,
        as soon as ``stopping()``: a SIGTERM during warm-up (graph capture, a device that
        hangs) must not wait for it."""
        while not multiprocessing.connection.wait([self.control], timeout=0.2):
            if stopping():
                self.process.kill()
                self.process.join()
                return "stopped while the engine was starting"
        try:
            message = self.control.recv()
        except EOFError:
            self.process.join()
            return f"the engine process exited with {self.process.exitcode} while starting"
        return None if message == "ready" else f"the engine cannot start: {message}"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send("stop")
        self.process.join(ENGINE_STOP_TIMEOUT_S)
        if self.process.is_alive():  # wedged (a hung device, say): it ignores SIGTERM
            log.error("the engine process did not stop within %.0f s; killing it",
                      ENGINE_STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join()


def run_workers(count: int, options: dict[str, Any], engine: bool, settings: Settings) -> int:
    """Run ``count`` workers serving with ``settings`` until a signal stops them; the exit
    status for the supervisor.

    With ``engine``, an engine process is started first and the workers once it is ready;
    it is stopped last, when the workers have answered what they had in flight. An engine
    that dies is replaced like a worker (the workers answer 503 meanwhile and connect to the
    new one)."""
    # Workers are forked from one server process that has imported the app (torch, FastAPI,
    # pydantic) once: their memory then starts out shared with it, page for page, instead of
    # each spawned worker building the same modules and relocated libraries again in
    # private memory (docs/benchmarks.md). The server never touches CUDA.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["service.preload"])
    stopping = False
    engine_process: _EngineProcess | None = None
    socket_dir = tempfile.mkdtemp(prefix="oodserve-engine-") if engine else None
    address = os.path.join(socket_dir, "engine.sock") if socket_dir else None

    def start_engine() -> str | None:
        nonlocal engine_process
        engine_process = _EngineProcess(address, options["log_config"], settings)
        return engine_process.wait_ready(lambda: stopping)

    def start() -> None:
        process = context.Process(target=_worker,
                                  args=(options, settings, address, os.getpid()),
                                  name="oodserve-worker")
        with sigint_blocked():  # the first start also starts the fork server
            process.start()
        workers[process.sentinel], started[process.sentinel] = process, time.monotonic()
        log.info("started worker process %d", process.pid)
        if stopping:  # the signal came while it was starting: stop() did not know it yet
            os.kill(process.pid, signal.SIGTERM)

    def engine_died(lived: float) -> str | None:
        """Replace a dead engine; why the service must stop instead, or None."""
        engine_process.process.join()
        multiprocess.mark_process_dead(engine_process.process.pid)
        log.error("the engine process %d exited with %s after %.0f s",
                  engine_process.process.pid, engine_process.process.exitcode, lived)
        if stopping:
            return "the engine died while stopping"
        if lived < EARLY_DEATH_S:
            return "it died too soon"
        return start_engine()

    def stop(_signum: int, _frame: object) -> None:
        # SIGTERM whatever arrived (uvicorn's graceful shut-down); the workers never see a
        # Ctrl-C's SIGINT themselves (sigint_blocked).
        nonlocal stopping
        stopping = True
        for process in workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        if engine:
            log.warning("SIGHUP: reloading is not supported in the engine layout (the engine "
                        "process hosts the model); restart the service to serve a new bundle")
            return
        log.info("SIGHUP: asking the %d workers to reload the models", len(workers))
        for process in workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    workers: dict[int, multiprocessing.Process] = {}
    started: dict[int, float] = {}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    try:
        if engine:
            problem = start_engine()
            if problem is not None:
                if stopping:  # a signal, not a failure
                    log.info("%s", problem)
                    return 0
                log.error("%s", problem)
                return 1
            engine_started = time.monotonic()
        for _ in range(count):
            if stopping:
                break
            start()
        status = 0
        engine_watched = engine
        while workers:
            watched = list(workers)
            if engine_watched:
                watched.append(engine_process.process.sentinel)
            for sentinel in multiprocessing.connection.wait(watched):
                if engine_watched and sentinel == engine_process.process.sentinel:
                    problem = engine_died(time.monotonic() - engine_started)
                    engine_started = time.monotonic()
                    if problem is not None:
                        engine_watched = False  # gone for good: wait for the workers only
                        log.error("stopping: %s", problem)
                        status = 1
                        stop(signal.SIGTERM, None)
                    continue
                process = workers.pop(sentinel)
                process.join()
                if stopping:
                    continue
                # What its own shut-down would have done: drop its live gauges.
                multiprocess.mark_process_dead(process.pid)
                lived = time.monotonic() - started.pop(sentinel)
                log.error("worker process %d exited with %s after %.0f s", process.pid,
                          process.exitcode, lived)
                if lived < EARLY_DEATH_S:
                    status = 1
                    stop(signal.SIGTERM, None)
                    continue
                start()
        return status
    finally:
        if engine_process is not None and engine_process.process.is_alive():
            engine_process.stop()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
