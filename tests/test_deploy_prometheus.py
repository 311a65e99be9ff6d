"""The monitoring stack end to end, without Docker: two real service processes (two replicas),
a real Prometheus server with the repository's configuration and rules (only the targets and
the intervals rewritten), a known mix of in-distribution images (CIFAR-10 test) and OOD images
(Gaussian noise, iSUN); Prometheus's answer to the dashboard's OOD-rate query must be the OOD
share the clients were told, per detector, for the model that scored them."""

import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import CIFAR10, ISUN
from deploy_helpers import (
    DOCKER,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    ood_rate_query,
    promtool,
    recorded,
    tool,
    without_grafana_macros,
)
from PIL import Image
from service_helpers import free_port

from service.settings import DEFAULT_BUNDLE
from training.data.archives import extract_archive

ID_PER_CLASS, NOISE, ISUN_IMAGES = 5, 25, 25  # 50 ID + 50 OOD images
REPLICAS = 2
# Scrape and rule evaluation interval of the test's Prometheus: short, so that the test's
# half minute of samples is many intervals long (see the tolerance below).
INTERVAL = "250ms"
DETECTORS = ("energy", "featurenorm", "combined")


def wait_for(condition, what: str, timeout: float, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prometheus_config(targets: list[str], out_dir: Path) -> Path:
    """The repository's configuration with the oodserve job's service discovery replaced by
    the test's targets and the intervals shortened; the rule files are copied beside it, so
    its relative rule_files still find them."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = INTERVAL
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "oodserve")
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    shutil.copytree(PROMETHEUS_DIR / "rules", out_dir / "rules")
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def images(cache_dir: Path) -> list[tuple[str, str, bytes]]:
    """(kind, file name, bytes): CIFAR-10 test images, iSUN patches and Gaussian noise."""
    cifar = extract_archive(CIFAR10, cache_dir) / "cifar10" / "test"
    out = [("id", f.name, f.read_bytes()) for class_dir in sorted(cifar.iterdir())
           for f in sorted(class_dir.iterdir())[:ID_PER_CLASS]]
    isun = extract_archive(ISUN, cache_dir) / "iSUN" / "iSUN_patches"
    out += [("isun", f.name, f.read_bytes()) for f in sorted(isun.iterdir())[:ISUN_IMAGES]]
    rng = np.random.default_rng(0)
    for i in range(NOISE):
        pixels = np.clip(rng.normal(127.5, 64.0, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(("noise", f"noise-{i}.png", buf.getvalue()))
    random.Random(0).shuffle(out)
    return out


@pytest.fixture
def stack(tiny_bundle, tmp_path):
    """REPLICAS service processes and a Prometheus scraping them; yields their addresses."""
    bundle = DEFAULT_BUNDLE if DEFAULT_BUNDLE.exists() else tiny_bundle
    prometheus = tool("prometheus")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OODSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(OMP_NUM_THREADS="1", OODSERVE_TORCH_THREADS="1", OODSERVE_DECODE_WORKERS="1",
               OODSERVE_WORKERS="1", OODSERVE_BUNDLE=str(bundle),
               OODSERVE_MAX_BATCH_DELAY_MS="5")
    ports = [free_port() for _ in range(REPLICAS)]
    logs, procs = [], []
    try:
        for i, port in enumerate(ports):
            logs.append(tmp_path / f"service-{i}.log")
            procs.append(start([sys.executable, "-m", "service"], logs[-1],
                               {**env, "OODSERVE_PORT": str(port)}, tmp_path))
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        config = prometheus_config([f"127.0.0.1:{p}" for p in ports], prom_dir)
        check = promtool("check", "config", config)
        assert check.returncode == 0, check.stdout + check.stderr
        prom_port = free_port()
        logs.append(tmp_path / "prometheus.log")
        procs.append(start([prometheus, f"--config.file={config}",
                            f"--storage.tsdb.path={prom_dir / 'data'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}"],
                           logs[-1], env, prom_dir))
        yield {"bundle": bundle, "services": [f"http://127.0.0.1:{p}" for p in ports],
               "ports": ports, "prometheus": f"http://127.0.0.1:{prom_port}", "logs": logs,
               "env": env}
    finally:
        for proc in procs:
            stop(proc)


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_reports_the_ood_rate_the_clients_saw(stack, cache_dir):
    prometheus, services, logs = stack["prometheus"], stack["services"], stack["logs"]
    mix = images(cache_dir)  # extracted while the services and Prometheus start

    # Every replica ready (the image's health check says so too), and scraped once before
    # any image is sent, so every series starts from 0 inside the rate window.
    for url in services:
        wait_for(lambda url=url: httpx.get(f"{url}/readyz").status_code == 200,
                 f"{url}/readyz", 120, logs)
    healthcheck = [sys.executable, str(DOCKER / "healthcheck.py")]
    ok = subprocess.run(healthcheck, check=False,
                        env={**stack["env"], "OODSERVE_PORT": str(stack["ports"][0])})
    assert ok.returncode == 0
    closed = subprocess.run(healthcheck, check=False, capture_output=True, text=True,
                            env={**stack["env"], "OODSERVE_PORT": str(free_port())})
    assert closed.returncode == 1 and "not ready" in closed.stderr

    def targets_up():
        active = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
        return len([t for t in active if t["labels"]["job"] == "oodserve"
                    and t["health"] == "up"]) == REPLICAS

    wait_for(targets_up, "Prometheus to scrape every replica", 60, logs)

    # The mix, spread over the replicas, in batches and single images; the clients count the
    # OOD decisions they get back (no threshold parameters: the bundle's defaults).
    ood = {d: {"id": 0, "isun": 0, "noise": 0} for d in DETECTORS}
    sent = {"id": 0, "isun": 0, "noise": 0}
    per_replica = [0] * REPLICAS
    clients = [httpx.Client(base_url=url, timeout=60) for url in services]
    try:
        for start_at in range(0, len(mix), 8):
            chunk, replica = mix[start_at:start_at + 8], (start_at // 8) % REPLICAS
            if start_at // 8 % 3 == 2:  # every third chunk one image at a time
                predictions = []
                for _, name, data in chunk:
                    r = clients[replica].post("/predict", files={"image": (name, data)})
                    assert r.status_code == 200, r.text
                    predictions.append(r.json())
            else:
                r = clients[replica].post("/predict/batch", files=[
                    ("images", (name, data)) for _, name, data in chunk])
                assert r.status_code == 200, r.text
                predictions = [item["prediction"] for item in r.json()["results"]]
            per_replica[replica] += len(chunk)
            for (kind, _, _), p in zip(chunk, predictions, strict=True):
                sent[kind] += 1
                ood["energy"][kind] += p["energy"]["is_ood"]
                ood["featurenorm"][kind] += p["featurenorm"]["is_ood"]
                ood["combined"][kind] += p["is_ood"]
    finally:
        for client in clients:
            client.close()
    total = sum(sent.values())
    expected = {d: sum(ood[d].values()) / total for d in DETECTORS}

    # Wait for a scrape that has seen every prediction, then for the rules to run on it.
    def scraped_all():
        result = query(prometheus, "sum(oodserve_predictions_total)")
        return result and float(result[0]["value"][1]) == total

    wait_for(scraped_all, f"Prometheus to count {total} predictions", 30, logs)
    time.sleep(1.5)  # several rule evaluations at INTERVAL

    per_instance = {r["metric"]["instance"]: float(r["value"][1]) for r in
                    query(prometheus, "sum by (instance) (oodserve_predictions_total)")}
    assert sorted(per_instance.values()) == sorted(per_replica)

    # The dashboard's query, as the dashboard sends it (all models), and the expression it
    # records: one series per detector, of the one model served.
    model = json.loads((stack["bundle"] / "manifest.json").read_text())["name"]
    dashboard_query = without_grafana_macros(ood_rate_query())
    for expr in (dashboard_query, recorded()["oodserve:ood_rate:ratio_rate5m"]):
        result = query(prometheus, expr)
        assert {r["metric"]["model"] for r in result} == {model}, (expr, result)
        got = {r["metric"]["detector"]: float(r["value"][1]) for r in result}
        assert set(got) == set(DETECTORS) and len(result) == len(DETECTORS), (expr, got)
        for detector in DETECTORS:
            # rate() extrapolates each replica's increase from its last sample to the
            # evaluation time (less than one interval, over samples that span the whole
            # test): the same factor for a replica's OOD and prediction counters, so the
            # ratio is exact when the replicas' OOD shares are equal, and off by at most
            # (difference of the replicas' shares) x (interval / test duration) otherwise.
            assert got[detector] == pytest.approx(expected[detector], abs=0.01), (
                expr, detector, got, expected, ood, sent)
    print(f"\nbundle {stack['bundle']}: sent {sent}, OOD decisions {ood}; Prometheus "
          f"{dashboard_query} = {got}, clients {expected}")

    if stack["bundle"] == DEFAULT_BUNDLE:  # a trained model: noise is clearly OOD
        assert ood["combined"]["noise"] / sent["noise"] >= 0.8, ood
        assert ood["combined"]["id"] / sent["id"] <= 0.3, ood
