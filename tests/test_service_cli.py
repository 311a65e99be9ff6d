"""`python -m service` on the command line: --help, flags that win over the environment and
.env and reach every process, clear errors for unknown flags and bad values, and Ctrl-C
(SIGINT to the whole process group, as a terminal sends it) without a traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import children, free_port, service_env
from uploads import noise_png

from service.__main__ import _settings
from service.settings import Settings


def run_service(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], check=False,
                          cwd=tmp_path, env=service_env(**env), capture_output=True, text=True,
                          timeout=60)


def test_help_documents_every_setting_and_starts_nothing(tmp_path):
    result = run_service(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert text.startswith("usage: python -m service")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in text or f"{flag}," in text, flag
        assert f"OODSERVE_{name.upper()}" in text, name
        assert field.description, f"{name} has no description for --help"
    assert "--no-tune-malloc" in text and "--no-access-log" in text
    assert "Uvicorn running" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--nope"], "unrecognized arguments: --nope"),
    (["--port"], "argument --port: expected one argument"),
    (["8000"], "unrecognized arguments: 8000"),
    (["--wor", "2"], "unrecognized arguments: --wor"),  # no abbreviations
])
def test_unknown_flags_exit_2_with_one_clear_error(tmp_path, args, message):
    result = run_service(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_win_over_the_environment_and_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OODSERVE_PORT=9001\nOODSERVE_MAX_BATCH_SIZE=7\n"
                                   "OODSERVE_TOP_K=3\n")
    monkeypatch.setenv("OODSERVE_PORT", "9100")
    monkeypatch.setenv("OODSERVE_TOP_K", "4")
    monkeypatch.setenv("OODSERVE_TUNE_MALLOC", "true")
    s = _settings(["--port", "9300", "--no-tune-malloc", "--workers", "auto",
                   "--bundle", "elsewhere", "--layout", "engine"])
    assert (s.port, s.top_k, s.max_batch_size) == (9300, 4, 7)  # flag, env, .env
    assert (s.tune_malloc, s.workers, s.bundle, s.layout) == (
        False, "auto", Path("elsewhere"), "engine")
    assert _settings(["--workers", "3", "--access-log"]).workers == 3
    assert _settings([]).port == 9100  # no flags: the environment, as before


def test_a_bad_flag_value_names_the_flag_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        _settings(["--port", "eighty", "--workers", "0", "--device", "gpu"])
    message = str(stop.value)
    for flag, env in [("--port", "OODSERVE_PORT"), ("--workers", "OODSERVE_WORKERS"),
                      ("--device", "OODSERVE_DEVICE")]:
        assert f"{flag} / {env}:" in message
    result = run_service(tmp_path, "--max-batch-size", "0")
    assert result.returncode == 1
    assert "--max-batch-size / OODSERVE_MAX_BATCH_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_request_larger_than_the_queue_is_refused_at_start(tmp_path, monkeypatch):
    """A request is admitted whole: with more images per batch request than the queue
    holds, a full batch request would get 503 for ever, so the settings are refused."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        _settings(["--max-queue-size", "8", "--max-batch-images", "9"])
    assert "max_batch_images (9) is more than max_queue_size (8)" in str(stop.value)
    assert _settings(["--max-queue-size", "8", "--max-batch-images", "8"]).max_queue_size == 8


def _as_from_a_terminal() -> None:
    # A shell starts background jobs (CI's runner may be one) with SIGINT ignored, and the
    # ignore is inherited; Python then installs no handler of its own, as it should not. A
    # command typed at a terminal starts with the default disposition: so does this one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp_path: Path, *args: str, **env) -> tuple[subprocess.Popen, Path]:
    """`python -m service` in a session of its own (its process group is what a terminal's
    Ctrl-C reaches), logging to a file."""
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", *args], cwd=tmp_path,
                                env=service_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                # one signal call between fork and exec: no lock involved
                                start_new_session=True,
                                preexec_fn=_as_from_a_terminal)  # noqa: PLW1509
    return proc, log


def ctrl_c(proc: subprocess.Popen, log: Path) -> str:
    """SIGINT to the whole process group, as a terminal sends it; the log once it exits."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("still running 60 s after SIGINT:\n" + log.read_text()) from None
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    proc.returncode = status
    return text


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(log.read_text())
        time.sleep(0.05)


@pytest.mark.parametrize("layout, workers", [("replicated", "2"), ("engine", "1"),
                                             ("replicated", "1")])
def test_flags_reach_every_process_and_ctrl_c_stops_cleanly(tiny_bundle, tmp_path, layout,
                                                            workers):
    """The environment says otherwise; the flags win in every worker and in the engine
    (which decides the batch size in the engine layout). Then Ctrl-C: every process stops
    after a graceful shut-down, exit status 0, no traceback."""
    port = free_port()
    proc, log = start(tmp_path, "--bundle", str(tiny_bundle), "--port", str(port),
                      "--workers", workers, "--layout", layout, "--device", "cpu",
                      "--max-batch-size", "3", "--max-batch-delay-ms", "7.5", "--top-k", "2",
                      OODSERVE_BUNDLE=tmp_path / "nowhere", OODSERVE_PORT=1,
                      OODSERVE_WORKERS=5, OODSERVE_MAX_BATCH_SIZE=9,
                      OODSERVE_MAX_BATCH_DELAY_MS=1, OODSERVE_TOP_K=4)
    base = f"http://127.0.0.1:{port}"
    try:
        count = int(workers)
        wait_until(lambda: log.read_text().count("Application startup complete") >= count,
                   proc, log)
        for i in range(6):  # a new connection each time: every worker answers some
            with httpx.Client(base_url=base, timeout=30) as client:
                for _ in range(100):
                    if client.get("/readyz").status_code == 200:
                        break
                    time.sleep(0.1)
                model = client.get("/v1/model").json()
                assert (model["max_batch_size"], model["max_batch_delay_ms"]) == (3, 7.5)
                answer = client.post("/predict", files={"image": ("x.png",
                                                                  noise_png(i))})
                assert answer.status_code == 200, answer.text
                assert len(answer.json()["top_k"]) == 2
        if layout == "engine":
            assert "batches of up to 3" in log.read_text()
        pids = children(proc.pid)
        assert len(pids) == count + (layout == "engine") - (workers == "1"
                                                            and layout == "replicated")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = ctrl_c(proc, log)
    assert proc.returncode == 0, text
    assert text.count("Application shutdown complete") == count, text
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()


def test_ctrl_c_while_checking_the_bundle_stops_with_one_line(tiny_bundle, tmp_path):
    """Ctrl-C while the start-up check runs in its child process: the child is stopped,
    nobody prints a traceback, one line says why, exit status 130."""
    proc, log = start(tmp_path, "--bundle", str(tiny_bundle), "--workers", "2",
                      "--port", str(free_port()))
    wait_until(lambda: children(proc.pid), proc, log)  # the start-up check's process
    text = ctrl_c(proc, log)
    assert proc.returncode == 130, text
    assert text.strip().splitlines()[-1] == "oodserve: interrupted", text


@pytest.mark.parametrize("layout, when", [("engine", "started the engine process"),
                                          ("replicated", "started worker process")])
def test_ctrl_c_while_the_processes_start_is_a_clean_stop(tiny_bundle, tmp_path, layout,
                                                          when):
    """Ctrl-C as the engine or the first worker starts: everything started stops (a worker
    that started after the signal as well), exit status 0, no traceback."""
    proc, log = start(tmp_path, "--bundle", str(tiny_bundle), "--workers", "2",
                      "--layout", layout, "--port", str(free_port()))
    wait_until(lambda: when in log.read_text(), proc, log)
    text = ctrl_c(proc, log)
    assert proc.returncode == 0, text
