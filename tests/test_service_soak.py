"""The short soak: bench/soak.py for 20 s at concurrency 64 (the full run is 5 minutes; its
figures are in docs/benchmarks.md), with the same pass conditions."""

import json
import os
import subprocess
import sys
from pathlib import Path

from service_helpers import free_port

REPO = Path(__file__).resolve().parents[1]


def test_short_soak(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODSERVE_")}
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--bundle", str(tiny_bundle), "--duration", "20",
         "--warmup", "5", "--window", "5", "--concurrency", "64", "--synthetic",
         "--threads", "1", "--port", str(free_port()), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["passed"] and all(report["checks"].values())
    assert report["sent"] == report["answered"] > 500
    assert report["server_errors"] == 0 and report["unexpected_count"] == 0
    assert report["bad_requests"] > 50  # the corpus really was in the mix
    assert {"200", "400", "413", "415", "422"} <= set(report["statuses"])
    assert len(report["windows"]) == 4 and all(w["answered"] > 0 for w in report["windows"])
    assert report["rss_growth"] <= 0.10
    assert report["clean_shutdown"] and report["ready_failures"] == 0
