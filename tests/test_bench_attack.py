"""bench/attack.py, briefly and small: both scenarios against the tiny bundle (the full run
and its figures are in docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import free_port, service_env

REPO = Path(__file__).resolve().parents[1]


def test_attack_bench_reports_both_scenarios(tiny_bundle, tmp_path):
    out = tmp_path / "attack.json"
    run = subprocess.run(
        [sys.executable, "bench/attack.py", "--bundle", str(tiny_bundle), "--synthetic",
         "--images", "8", "--duration", "2", "--baseline", "1", "--settle", "1",
         "--attack-concurrency", "2", "--attack-images", "2", "--attack-side", "64",
         "--concurrency", "50", "--overload-duration", "2", "--window", "1",
         "--port", str(free_port()), "--json", str(out)],
        cwd=REPO, env=service_env(), capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert {"date", "machine", "command", "load_average_start", "load_average_end"} <= set(
        report)

    attack = report["attack"]
    # Two small zero images are valid input: every attack and probe request is scored.
    assert attack["attack"]["count"] > 0 and set(attack["attack"]["statuses"]) == {"200"}
    assert attack["attack"]["images_in_200_answers"] == {"scored": 2 * attack["attack"]["count"]}
    for probe in ("probe_alone", "probe_under_attack"):
        assert attack[probe]["count"] > 0 and set(attack[probe]["statuses"]) == {"200"}
        assert 0 < attack[probe]["p50_ms"] <= attack[probe]["p99_ms"] <= attack[probe]["max_ms"]
    assert 0 < attack["rss_before_mib"] <= attack["rss_peak_mib"]
    assert attack["rss_after_ratio"] == pytest.approx(
        attack["rss_after_mib"] / attack["rss_before_mib"])

    overload = report["overload"]
    assert overload["lost"] == 0 and overload["sent"] == overload["answered"] > 50
    assert overload["statuses"] == {"200": overload["answered"]}  # 50 clients: none shed
    # /metrics counted exactly the images answered 200.
    assert overload["images_scored"] == overload["images_answered_200"] == overload["sent"]
    assert overload["scored_beyond_200"] == 0
    windows = overload["windows"]  # 1 s each
    assert len(windows) == 2 and all(w["sent"] == w["ok"] > 0 for w in windows)
    for scenario in (attack, overload):
        assert scenario["exit_code"] in (0, -15) and not scenario["server_log_errors"]

    assert set(report["checks"]) == {
        "attack: probe p99 <= 1 s", "attack: probe p99 of its 200 answers <= 1 s",
        "attack: every probe request answered 200",
        "attack: RSS after <= 1.1 x before", "overload: zero lost",
        "overload: p99 of admitted <= 3 s", "overload: no image scored for a refused request"}
    for name, ok in report["checks"].items():
        assert f"{'PASS' if ok else 'FAIL'}  {name}" in run.stdout
