"""Several worker processes on one port, each with its own listening socket.

Why not uvicorn's own ``workers``: its workers share one listening socket, and a worker that
wakes up accepts every connection waiting on it. Clients that keep their connections alive
and open them together (a load generator, a pool in a client library, a proxy) therefore
often end up on one worker while the others idle: measured with ``bench/serve.py``, 32
connections at once ran half as fast as with the connections spread out. Here every worker
binds its own socket with ``SO_REUSEPORT`` and the kernel spreads new connections across
the sockets by a hash of their addresses.

The supervisor (this process) starts the workers, starts a new one in place of any that
dies (after removing the dead one's live gauges from the shared metrics), and on SIGTERM or SIGINT passes the signal on and waits for the workers to finish the
requests in flight (uvicorn's graceful shut-down). It imports neither torch nor the app.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from typing import Any

from prometheus_client import multiprocess

log = logging.getLogger("oodserve")

# A worker that dies within this many seconds of starting is not restarted: it would only
# die again (a port in use, a bundle that broke after the check), so the service stops.
EARLY_DEATH_S = 10.0


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


def _worker(options: dict[str, Any]) -> None:
    import uvicorn

    config = uvicorn.Config("service.app:create_app", factory=True, **options)
    try:
        sock = reuse_port_socket(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        raise SystemExit(1) from None
    uvicorn.Server(config).run(sockets=[sock])


def run_workers(count: int, options: dict[str, Any]) -> int:
    """Run ``count`` workers until a signal stops them; the exit status for the supervisor."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> multiprocessing.Process:
        process = context.Process(target=_worker, args=(options,), name="oodserve-worker")
        process.start()
        log.info("started worker process %d", process.pid)
        return process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers.values():
            if process.is_alive():
                os.kill(process.pid, signum)

    workers: dict[int, multiprocessing.Process] = {}
    started: dict[int, float] = {}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(count):
        process = start()
        workers[process.sentinel], started[process.sentinel] = process, time.monotonic()
    status = 0
    while workers:
        for sentinel in multiprocessing.connection.wait(list(workers)):
            process = workers.pop(sentinel)
            process.join()
            if stopping:
                continue
            # What its own shut-down would have done: drop its live gauges from the metrics.
            multiprocess.mark_process_dead(process.pid)
            lived = time.monotonic() - started.pop(sentinel)
            log.error("worker process %d exited with %s after %.0f s", process.pid,
                      process.exitcode, lived)
            if lived < EARLY_DEATH_S:
                status = 1
                stop(signal.SIGTERM, None)
                continue
            process = start()
            workers[process.sentinel], started[process.sentinel] = process, time.monotonic()
    return status
