"""Starting the service: settings from the environment and .env, a clear message for a bad
bundle or setting, and `python -m service` serving with one or several workers."""

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
from service_helpers import metric, noise_image, png

from service.settings import DEFAULT_BUNDLE, REPO_ROOT, Settings


def service_env(**overrides) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OODSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(OMP_NUM_THREADS="1", OODSERVE_TORCH_THREADS="1", OODSERVE_DECODE_WORKERS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


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
    assert DEFAULT_BUNDLE == REPO_ROOT / "models" / "cifar10-resnet20-gregplus"


def test_missing_bundle_stops_the_start(tmp_path):
    err = start_fails(tmp_path, OODSERVE_BUNDLE=tmp_path / "nowhere")
    assert "cannot serve the bundle" in err and "bundle directory not found" in err


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_python_m_service_serves_and_counts_across_workers(tiny_bundle, tmp_path, workers):
    port = free_port()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale garbage from an earlier run")
    log = tmp_path / "service.log"
    env = service_env(OODSERVE_BUNDLE=tiny_bundle, OODSERVE_PORT=port,
                      OODSERVE_WORKERS=workers, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
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
                                                                    png(noise_image(i)))})
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
