"""A non-editable install (`pip install .` into a fresh virtual environment) serves the
default bundle from any working directory: the wheel carries models/ (setup.py)."""

import os
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

import httpx
from service_helpers import free_port, wait_ready

from service.settings import DEFAULT_BUNDLE, DEFAULT_BUNDLE_NAME, REPO_ROOT
from training.bundle import load_bundle

# What `pip install .` reads; copied so that the build writes nothing into the checkout.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "service", "training", "models")


def test_a_wheel_install_serves_the_default_bundle_from_elsewhere(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_models"))
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
        capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, FastAPI, ...) from this environment, after the venv's own
    # packages; --system-site-packages would not do: they are not in the base interpreter's.
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-build-isolation", "--no-index", "--quiet", str(source)],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(source)  # nothing may be read from the source tree any more

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OODSERVE_") and k not in ("PYTHONPATH",
                                                          "PROMETHEUS_MULTIPROC_DIR")}
    script = ("import service, service.settings as s\n"
              "from training.bundle import load_bundle\n"
              "print(service.__file__); print(s.DEFAULT_BUNDLE)\n"
              "print(load_bundle(s.DEFAULT_BUNDLE).manifest.name)")
    check = subprocess.run(
        [python, "-c", script], check=False, cwd=elsewhere, env=env, capture_output=True,
        text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    module, bundle, name = check.stdout.split()
    assert Path(module).is_relative_to(purelib), module  # the installed copy, not the checkout
    assert Path(bundle) == purelib / "service" / "_models" / DEFAULT_BUNDLE_NAME
    assert name == load_bundle(DEFAULT_BUNDLE).manifest.name  # the checkout's default model

    port = free_port()
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [python, "-m", "service", "--port", str(port), "--workers", "1",
             "--layout", "replicated", "--device", "cpu", "--torch-threads", "1"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_ready(proc, port, log, timeout=60)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()
        assert model["name"] == name
        assert str(purelib / "service" / "_models" / DEFAULT_BUNDLE_NAME) in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
