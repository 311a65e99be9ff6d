"""Starting the service: settings from the environment and .env, a clear message for a bad
bundle or setting, and `python -m service` serving with one or several workers."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from service_helpers import children, free_port, metric, running_service, service_env
from test_signing import write_keys
from uploads import noise_png

from service import settings as settings_module
from service.reload import defer_sighup, reload_on_sighup
from service.settings import DEFAULT_BUNDLE, DEFAULT_BUNDLE_NAME, REPO_ROOT, Settings
from training.signing import SIGNATURE_FILE, sign_bundle


def start_fails(tmp_path: Path, **env) -> str:
    """Run `python -m service` expecting it to stop at once; return its stderr."""
    result = subprocess.run([sys.executable, "-m", "service"], check=False, cwd=tmp_path,
                            env=service_env(**env), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr  # one clear message, not a stack
    return result.stderr


def test_settings_from_env_and_dotenv(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("OODSERVE_MAX_BATCH_SIZE=7\nOODSERVE_DEVICE=cpu\nOODSERVE_PORT=9001\n")
    monkeypatch.setenv("OODSERVE_PORT", "9100")  # the environment wins over .env
    s = Settings(_env_file=dotenv)
    assert (s.max_batch_size, s.device, s.port) == (7, "cpu", 9100)
    assert Settings(_env_file=None).bundle == DEFAULT_BUNDLE
    assert DEFAULT_BUNDLE == REPO_ROOT / "models" / DEFAULT_BUNDLE_NAME  # the checkout's


def test_workers_share_out_the_cores(monkeypatch):
    monkeypatch.setattr(settings_module, "available_cores", lambda: 8)
    one, four, many = (Settings(_env_file=None, workers=n) for n in (1, 4, 16))
    assert (one.resolved_torch_threads(), one.resolved_decode_workers()) == (8, 4)
    assert (four.resolved_torch_threads(), four.resolved_decode_workers()) == (2, 2)
    assert (many.resolved_torch_threads(), many.resolved_decode_workers()) == (1, 1)
    chosen = Settings(_env_file=None, workers=4, torch_threads=3, decode_workers=5)
    assert (chosen.resolved_torch_threads(), chosen.resolved_decode_workers()) == (3, 5)


@pytest.mark.parametrize("workers", ["1", "auto"])  # checked here / in a child process
def test_missing_bundle_stops_the_start(tmp_path, workers):
    err = start_fails(tmp_path, OODSERVE_BUNDLE=tmp_path / "nowhere", OODSERVE_WORKERS=workers)
    assert "cannot serve the bundle" in err and "bundle directory not found" in err


@pytest.mark.parametrize("workers", ["1", "2"])  # checked here / in a child process
def test_an_unsigned_bundle_stops_the_start_when_a_key_is_set(tiny_bundle, tmp_path, workers):
    _, public = write_keys(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    err = start_fails(tmp_path, OODSERVE_BUNDLE=bundle, OODSERVE_BUNDLE_PUBLIC_KEY=public,
                      OODSERVE_WORKERS=workers)
    assert "cannot serve the bundle" in err and f"not signed (no {SIGNATURE_FILE})" in err
    other, _ = write_keys(tmp_path, "other")
    sign_bundle(bundle, other)
    err = start_fails(tmp_path, OODSERVE_BUNDLE=bundle, OODSERVE_BUNDLE_PUBLIC_KEY=public,
                      OODSERVE_WORKERS=workers)
    assert "cannot serve the bundle" in err and "another key signed it" in err


def test_an_unusable_public_key_is_a_settings_error(tiny_bundle, tmp_path):
    err = start_fails(tmp_path, OODSERVE_BUNDLE=tiny_bundle,
                      OODSERVE_BUNDLE_PUBLIC_KEY=tmp_path / "absent.pem")
    assert "--bundle-public-key / OODSERVE_BUNDLE_PUBLIC_KEY" in err
    assert "cannot read the public key" in err


def test_cuda_without_a_gpu_stops_a_multi_worker_start(tiny_bundle, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = start_fails(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_DEVICE="cuda",
                      OODSERVE_WORKERS="2")
    assert "OODSERVE_DEVICE" in err and "no CUDA device" in err


def test_available_cores_follows_a_cgroup_quota(tmp_path):
    cores = settings_module.available_cores(tmp_path / "absent")
    assert cores == len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert settings_module.available_cores(cpu_max) == cores
    cpu_max.write_text("50000 100000\n")  # half a core: still one
    assert settings_module.available_cores(cpu_max) == 1
    cpu_max.write_text(f"{cores * 300000} 100000\n")  # more quota than cores
    assert settings_module.available_cores(cpu_max) == cores
    if cores >= 2:
        cpu_max.write_text("150000 100000\n")  # 1.5 cores: rounded up
        assert settings_module.available_cores(cpu_max) == 2


def test_auto_workers(monkeypatch):
    monkeypatch.setattr(settings_module, "available_cores", lambda: 6)
    auto = Settings(_env_file=None)
    assert auto.workers == "auto"
    # The CPU replicates the model in every worker; a GPU gets the engine and 5 workers.
    assert (auto.resolved_layout(cuda=False), auto.resolved_layout(cuda=True)) == (
        "replicated", "engine")
    assert (auto.resolved_workers(cuda=False), auto.resolved_workers(cuda=True)) == (6, 5)
    assert Settings(_env_file=None, layout="engine").resolved_workers(cuda=False) == 5
    assert Settings(_env_file=None, workers=3).resolved_workers(cuda=True) == 3
    assert (auto.resolved_max_batch_size(cuda=False), auto.resolved_max_batch_size(cuda=True)
            ) == (32, 1024)
    assert Settings(_env_file=None, max_batch_size=8).resolved_max_batch_size(cuda=True) == 8
    monkeypatch.setenv("OODSERVE_WORKERS", "2")
    assert Settings(_env_file=None).workers == 2
    monkeypatch.setenv("OODSERVE_WORKERS", "0")
    with pytest.raises(ValueError):
        Settings(_env_file=None)


def test_corrupt_bundle_stops_the_start(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    err = start_fails(tmp_path, OODSERVE_BUNDLE=bad)
    assert "sha256" in err and "does not match" in err


def test_invalid_setting_stops_the_start(tmp_path):
    err = start_fails(tmp_path, OODSERVE_DEVICE="gpu", OODSERVE_MAX_BATCH_SIZE="0")
    assert "OODSERVE_DEVICE" in err and "OODSERVE_MAX_BATCH_SIZE" in err


@pytest.mark.parametrize("setting", ["1", "2", "auto"])
def test_python_m_service_serves_and_counts_across_workers(tiny_bundle, tmp_path, setting):
    if setting == "auto" and torch.cuda.is_available():
        pytest.skip("auto is the engine layout on a GPU (test_service_layouts.py)")
    workers = settings_module.available_cores() if setting == "auto" else int(setting)
    port = free_port()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale garbage from an earlier run")
    log = tmp_path / "service.log"
    env = service_env(OODSERVE_BUNDLE=tiny_bundle, OODSERVE_PORT=port,
                      OODSERVE_WORKERS=setting, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while log.read_text().count("Application startup complete") < workers:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        requests = 12
        for i in range(requests):  # a new connection each time, so both workers answer
            with httpx.Client(base_url=base) as client:
                response = client.post("/predict", files={"image": ("x.png",
                                                                    noise_png(i))})
                assert response.status_code == 200, response.text
        for _ in range(4):  # whichever worker answers, the totals are the same
            text = httpx.get(f"{base}/metrics").text
            assert metric(text, "oodserve_predictions_total") == requests
            assert metric(text, "oodserve_requests_total", endpoint="/predict",
                          status="200") == requests
            assert text.count("oodserve_model_info{") == 1
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then may re-raise the SIGTERM it caught.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
    assert log.read_text().count("Application shutdown complete") == workers


def established_connections(pid: int, port: int) -> int:
    """TCP connections to ``port`` that process ``pid`` holds open (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_workers_share_connections_and_are_replaced(tiny_bundle, tmp_path):
    """Keep-alive connections opened all at once land on both workers (each has its own
    SO_REUSEPORT socket), and a worker that dies is replaced while the other serves on."""
    import service.workers

    port, log, metrics_dir = free_port(), tmp_path / "service.log", tmp_path / "prometheus"
    env = service_env(OODSERVE_BUNDLE=tiny_bundle, OODSERVE_PORT=port, OODSERVE_WORKERS=2,
                      PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: log.read_text().count("Application startup complete") == 2, 120,
                 "two workers")
        started = time.monotonic()  # the workers were started before this
        workers = children(proc.pid)
        connections = []
        for _ in range(24):  # opened together, before any of them sends a request
            connections.append(socket.create_connection(("127.0.0.1", port)))
        for conn in connections:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for conn in connections:
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        held = {pid: established_connections(pid, port) for pid in workers}
        assert sum(held.values()) == 24 and min(held.values()) > 0, held
        for conn in connections:
            conn.close()

        # Past the early-death window, a killed worker is replaced, not the service stopped.
        time.sleep(max(0.0, service.workers.EARLY_DEATH_S + 0.5 - (time.monotonic() - started)))
        live_gauge = metrics_dir / f"gauge_livemax_{workers[0]}.db"  # its model_info
        assert live_gauge.exists()
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: workers[0] not in children(proc.pid)
                 and len(children(proc.pid)) == 2, 30, "a replacement worker")
        # While the replacement starts (forked from the preloaded server: under a second,
        # the bundle and the app), new connections go to the worker that is serving; none
        # waits in the queue of one that is not.
        answered = 0
        while answered < 5 or log.read_text().count("Application startup complete") < 3:
            with httpx.Client(base_url=base, timeout=1.0) as client:
                assert client.get("/healthz").status_code == 200
            answered += 1


        def all_ready() -> bool:  # new connections hash to either worker
            for _ in range(8):
                with httpx.Client(base_url=base) as client:
                    if client.get("/readyz").status_code != 200:
                        return False
            return True

        wait_for(all_ready, 60, "both workers ready")
        assert proc.poll() is None
        assert not live_gauge.exists()  # the supervisor marked the killed worker dead
        text = httpx.get(f"{base}/metrics").text
        assert text.count("oodserve_model_info{") == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert "exited with -9" in log.read_text()


def test_a_worker_that_cannot_start_stops_the_service(tiny_bundle, tmp_path):
    with socket.socket() as taken:  # bound without SO_REUSEPORT: nobody else may bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service"], check=False, cwd=tmp_path, capture_output=True,
            text=True, timeout=120, env=service_env(OODSERVE_BUNDLE=tiny_bundle, OODSERVE_PORT=port,
                                         OODSERVE_WORKERS=2))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def _catches_sighup(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGHUP - 1) & 1)


def test_workers_start_with_sighup_deferred(tiny_bundle, tmp_path):
    """The supervisor sends SIGHUP (a reload) on to every worker, one still starting
    included; until a worker has set up its reload handler, SIGHUP must not kill it (its
    default action). Workers are forked by the fork server, so the fork server must catch
    it; and the workers, once started, reload on it rather than die."""
    with running_service(tmp_path, OODSERVE_BUNDLE=tiny_bundle, OODSERVE_WORKERS=2,
                         OODSERVE_LAYOUT="replicated") as (proc, base, log):
        servers = [int(c) for c in
                   Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                   if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(servers) == 1 and _catches_sighup(servers[0])
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGHUP)
        time.sleep(1)
        assert children(proc.pid) == workers and proc.poll() is None, log.read_text()
        assert httpx.get(f"{base}/readyz").status_code == 200


@pytest.mark.anyio
async def test_a_sighup_before_the_reload_handler_reloads_once_it_is_set_up():
    """A SIGHUP that comes while the process starts is remembered, not lost: the files it
    announces may have been completed after the start read the repository."""
    calls = []

    class Registry:
        async def reload(self):
            calls.append("reload")
            return []

    previous = signal.getsignal(signal.SIGHUP)
    try:
        defer_sighup()
        os.kill(os.getpid(), signal.SIGHUP)  # handled at once, in this (the main) thread
        remove = reload_on_sighup(Registry())
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        remove()
        assert calls == ["reload"]
    finally:
        signal.signal(signal.SIGHUP, previous)

