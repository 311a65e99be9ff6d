"""Helpers for the service tests: a running app with an httpx client, requests, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**overrides) -> dict[str, str]:
    """The environment for a `python -m service` subprocess: no OODSERVE_* or metrics
    directory from this one, one thread and one worker unless ``overrides`` say otherwise."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OODSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(OMP_NUM_THREADS="1", OODSERVE_TORCH_THREADS="1", OODSERVE_DECODE_WORKERS="1",
               OODSERVE_WORKERS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    """Until ``python -m service`` (``proc``, logging to ``log``) answers ``/readyz`` with 200
    on ``port``; fails with the log if it exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@contextlib.contextmanager
def running_service(cwd: Path, **env) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """A ready ``python -m service`` on a free port, started in ``cwd`` with
    :func:`service_env` and ``env``: (the process, its base URL, its log). Stopped with
    SIGTERM at the end, which it must obey within a minute."""
    port = free_port()
    log = Path(cwd) / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=cwd,
                                env=service_env(OODSERVE_PORT=port, **env),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, log)
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()


def children(pid: int) -> list[int]:
    """The worker processes of supervisor ``pid`` (forked by its fork server) and its engine
    process (spawned), not the fork server itself or multiprocessing's resource tracker."""
    def kids(p: int) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except FileNotFoundError:
            return []

    found = []
    for child in kids(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            found.append(child)
        elif b"forkserver" in cmdline:
            found += kids(child)
    return found


def settings(bundle: Path, **overrides) -> Settings:
    """Settings for a test app: one torch thread, and no .env from the working directory."""
    return Settings(_env_file=None, bundle=bundle, torch_threads=1, **overrides)


@asynccontextmanager
async def serve(app_settings: Settings, wait_ready: bool = True, engine_address=None):
    """The app with its lifespan running, and an httpx client talking to it in-process
    (with ``engine_address``: as a worker of the engine listening there)."""
    app = create_app(app_settings, engine_address=engine_address)
    async with app.router.lifespan_context(app):
        # A 500 stays a response (as a real client sees it) instead of a raised exception.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://oodserve") as client:
            if wait_ready:
                for _ in range(500):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise RuntimeError("the app never became ready")
            client.app = app
            yield client


async def predict(client: httpx.AsyncClient, data: bytes, **params) -> httpx.Response:
    return await client.post("/predict", files={"image": ("image", data)}, params=params)


async def predict_ok(client: httpx.AsyncClient, data: bytes, **params) -> dict:
    response = await predict(client, data, **params)
    assert response.status_code == 200, response.text
    return response.json()


MODEL_LABELS = ("model", "version")


def metric(text: str, sample_name: str, /, **labels: str) -> float:
    """Value of the sample ``name`` with exactly ``labels`` (0 when absent). The labels of a
    model's series (``model``, ``version``), unless given, are summed over, as a query that
    aggregates them away would."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != sample_name:
                continue
            ignored = [k for k in MODEL_LABELS if k not in labels]
            if {k: v for k, v in sample.labels.items() if k not in ignored} == labels:
                total += sample.value
    return total


async def metrics_text(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text
