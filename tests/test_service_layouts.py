"""`python -m service` in the engine layout (OODSERVE_LAYOUT=engine; what `auto` picks on a
GPU), run on the CPU: workers and the engine share the metrics, a dead worker or a dead
engine is replaced, and SIGTERM under load loses no request."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_helpers import children, free_port, metric, service_env
from test_service_faults import requests_then_sigterm
from test_service_start import wait_for
from uploads import noise_png

import service.workers

# Loaded by every process of the service (PYTHONPATH): the engine's forward pass, in its
# own process, takes TEST_FORWARD_SECONDS longer.
SLOW_ENGINE = """
import os, time
import service.inference
run = service.inference.Predictor.run
def slow(self, n):
    time.sleep(float(os.environ["TEST_FORWARD_SECONDS"]))
    return run(self, n)
service.inference.Predictor.run = slow
"""


def start(tmp_path, **env) -> tuple[subprocess.Popen, str]:
    port, log = free_port(), tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path,
                                env=service_env(OODSERVE_PORT=port, OODSERVE_LAYOUT="engine",
                                                **env),
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def post(base: str, seed: int) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as client:  # a new connection each time
        return client.post("/predict", files={"image": ("x.png", noise_png(seed))})


def all_ready(base: str) -> bool:
    try:
        for _ in range(8):  # new connections hash to any worker
            with httpx.Client(base_url=base) as client:
                if client.get("/readyz").status_code != 200:
                    return False
    except httpx.TransportError:  # nobody listening yet
        return False
    return True


def test_engine_layout_serves_counts_and_replaces_workers_and_the_engine(tiny_bundle,
                                                                          tmp_path):
    metrics_dir = tmp_path / "prometheus"
    proc, base = start(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_WORKERS=2,
                       PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    log = tmp_path / "service.log"
    try:
        wait_for(lambda: log.read_text().count("Application startup complete") == 2, 120,
                 "two workers")
        started = time.monotonic()
        wait_for(lambda: all_ready(base), 60, "ready")
        for i in range(10):
            assert post(base, i).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "oodserve_predictions_total") == 10  # counted by the workers
        assert metric(text, "oodserve_batch_size_sum") == 10  # counted by the engine
        assert text.count("oodserve_model_info{") == 1
        processes = children(proc.pid)
        assert len(processes) == 3  # the engine and two workers
        engine = next(p for p in processes
                      if f"started the engine process {p}" in log.read_text())

        time.sleep(max(0.0, service.workers.EARLY_DEATH_S + 0.5 - (time.monotonic() - started)))
        worker = next(p for p in processes if p != engine)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: f"worker {worker} disconnected from the engine" in log.read_text(),
                 30, "the engine to forget the dead worker")
        wait_for(lambda: log.read_text().count("Application startup complete") == 3, 60,
                 "a replacement worker")
        wait_for(lambda: all_ready(base), 60, "ready after the worker's replacement")
        assert all(post(base, 20 + i).status_code == 200 for i in range(6))

        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: "the engine process" in log.read_text()
                 and "exited with -9" in log.read_text(), 30, "the engine's death noticed")
        statuses = set()
        deadline = time.time() + 90
        while time.time() < deadline:  # 503 while the new engine warms up, then 200
            status = post(base, 99).status_code
            statuses.add(status)
            if status == 200 and all_ready(base):
                break
            time.sleep(0.1)
        assert statuses <= {200, 503} and 200 in statuses, statuses
        assert "connected to the inference engine again" in log.read_text()
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert not engine_address(text).parent.exists()  # the socket's folder is removed


def engine_address(log_text: str) -> Path:
    return Path(re.search(r"in the engine process \((\S+)\)", log_text).group(1))


def test_an_engine_that_dies_at_once_stops_the_service_once(tiny_bundle, tmp_path):
    """Killed within EARLY_DEATH_S of starting, the engine is not replaced: the service
    stops with status 1, saying so once (not once per turn of the supervisor's loop)."""
    proc, base = start(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_WORKERS=1)
    log = tmp_path / "service.log"
    try:
        wait_for(lambda: all_ready(base), 120, "ready")
        engine = next(p for p in children(proc.pid)
                      if f"started the engine process {p}" in log.read_text())
        os.kill(engine, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.count("exited with -9") == 1 and text.count("stopping: ") == 1, text


def test_a_killed_supervisor_takes_its_workers_and_engine_along(tiny_bundle, tmp_path):
    """SIGKILL leaves the supervisor no chance to stop anything: the workers, watching it
    through a pidfd, stop themselves, and the kernel's parent-death signal ends the engine,
    so nothing is left holding the port, the device or the shared memory."""
    proc, base = start(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_WORKERS=2)
    try:
        wait_for(lambda: all_ready(base), 120, "ready")
        processes = children(proc.pid)
        assert len(processes) == 3
        proc.kill()
        proc.wait()
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and b"zombie" not in
                                 Path(f"/proc/{p}/status").read_bytes().lower()
                                 for p in processes), 30, "the workers and engine to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_the_requests_in_flight_through_the_engine(tiny_bundle, tmp_path):
    """As test_service_faults' SIGTERM test, in the engine layout: 16 requests on 16
    connections to 2 workers, engine passes of 2 images taking 0.4 s each; SIGTERM with the
    first answer. All 16 are answered 200, and the service exits cleanly."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_ENGINE)
    n = 16
    proc, base = start(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_WORKERS=2,
                       OODSERVE_MAX_BATCH_SIZE=2, TEST_FORWARD_SECONDS=0.4,
                       PYTHONPATH=os.pathsep.join([str(hook), *sys.path]))
    log = tmp_path / "service.log"
    port = int(base.rsplit(":", 1)[1])
    try:
        wait_for(lambda: log.read_text().count("Application startup complete") == 2, 120,
                 "two workers")
        wait_for(lambda: all_ready(base), 60, "ready")
        statuses, answered_before = requests_then_sigterm(proc, port, n)
        assert statuses == [200] * n, log.read_text()
        assert n - answered_before >= n // 2  # most were still queued or running
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.count("Application shutdown complete") == 2
    assert "Traceback" not in text and "lost the connection" not in text, text
