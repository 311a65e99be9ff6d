"""The deployment files, checked without a Docker engine: Prometheus's configuration and rules
(promtool, with unit tests of the alerts), the compose files against the Compose
Specification's JSON schema and against each other, the Dockerfile, and the Grafana dashboard
(valid, every query parses, every metric it reads is one the service exports)."""

import base64
import json
import re
import subprocess
import sys
from fnmatch import fnmatch

import jsonschema
import pytest
from deploy_helpers import (
    COMPOSE,
    COMPOSE_GPU,
    DASHBOARD,
    DATASOURCES,
    DEPLOY_TOOLS,
    DOCKERFILE,
    GRAFANA_DIR,
    MODEL_VARIABLE,
    OOD_RATE_PANEL,
    PROMETHEUS_BUILTINS,
    PROMETHEUS_CONFIG,
    ROOT,
    RULE_FILES,
    RULE_TESTS,
    alerts,
    compose,
    dashboard,
    dashboard_queries,
    grafana_variables,
    interpolate,
    load_yaml,
    metric_names,
    ood_rate_query,
    promtool,
    recorded,
    rules,
    tool,
    without_grafana_macros,
)
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import metrics_text, predict_ok, serve, settings
from uploads import noise_png

from service.settings import DEFAULT_BUNDLE, REPO_ROOT, Settings

# --- Prometheus --------------------------------------------------------------------------


def test_promtool_check_config():
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


def test_promtool_check_rules():
    assert RULE_FILES
    result = promtool("check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests():
    assert RULE_TESTS
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_a_user_wants_exist_and_are_unit_tested():
    wanted = {"OODServeOODRateHigh", "OODServeErrorRateHigh", "OODServeLatencyHigh",
              "OODServeTargetDown", "OODServeNoTargets"}
    found = alerts()
    assert wanted <= set(found)
    tested = {case["alertname"] for path in RULE_TESTS for t in load_yaml(path)["tests"]
              for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    for name, alert in found.items():
        assert name in tested, f"{name} has no unit test in which it fires"
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"] and alert["for"], name
    # The OOD-rate level is a setting of its own, not a number inside the alert.
    assert "oodserve:ood_rate:alert_level" in recorded()
    assert "oodserve:ood_rate:alert_level" in found["OODServeOODRateHigh"]["expr"]


def test_scrape_job_finds_every_replica_of_the_compose_service():
    job = next(j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
               if j["job_name"] == "oodserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["port"] == 8000
    assert sd["names"] == ["oodserve"] and "oodserve" in compose()["services"]
    # The rules' `up{job="oodserve"}` names this job.
    assert 'job="oodserve"' in alerts()["OODServeTargetDown"]["expr"]


def prediction_endpoints(expr: str) -> str:
    """The one ``endpoint=~"..."`` pattern of a rule."""
    (pattern,) = set(re.findall(r'endpoint=~"([^"]+)"', expr))
    return pattern


@pytest.mark.anyio
async def test_the_rules_count_every_route_that_scores_images(tiny_bundle):
    """The error-rate and latency rules select the prediction requests by their `endpoint`
    label, the route template: the pattern names exactly the labels that requests to /predict,
    /predict/batch and the Open Inference Protocol's infer (with and without a version) get,
    matched anchored as PromQL's =~ does, and no other route's."""
    (pattern,) = {prediction_endpoints(recorded()[name]) for name in (
        "oodserve:request_errors:ratio_rate5m", "oodserve:request_duration_seconds:p99_rate5m")}
    async with serve(settings(tiny_bundle, max_batch_delay_ms=0)) as client:
        name = (await client.get("/v1/model")).json()["name"]
        version = (await client.get(f"/v2/models/{name}")).json()["versions"][-1]
        image = noise_png(1)
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(image).decode()]}]}
        for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer"):
            assert (await client.post(path, json=body)).status_code == 200, path
        await predict_ok(client, image)
        batch = await client.post("/predict/batch", files=[("images", ("a.png", image))])
        assert batch.status_code == 200, batch.text
        assert (await client.get(f"/v2/models/{name}/ready")).status_code == 200
        text = await metrics_text(client)
    labels = {s.labels["endpoint"] for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "oodserve_requests_total"}
    scoring = {"/predict", "/predict/batch", "/v2/models/{name}/infer",
               "/v2/models/{name}/versions/{version}/infer"}
    assert scoring <= labels and len(labels - scoring) >= 3, labels  # readiness, metadata, ...
    assert {e for e in labels if re.fullmatch(pattern, e)} == scoring
    assert set(pattern.split("|")) == scoring
    # The latency alert compares the routes of single requests and OIP's, not /predict/batch.
    latency = prediction_endpoints(alerts()["OODServeLatencyHigh"]["expr"])
    assert set(latency.split("|")) == scoring - {"/predict/batch"}


# --- compose -----------------------------------------------------------------------------

SCHEMA = ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_follows_the_compose_specification(path):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose(path))]
    assert not errors, errors


def test_the_schema_check_catches_mistakes():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = compose()
    doc["services"]["oodserve"]["restart"] = ["always"]
    doc["services"]["grafana"]["port"] = ["3000:3000"]
    assert len(list(validator.iter_errors(doc))) == 2


def test_interpolation_takes_defaults_and_values():
    text = "a: ${A:-1}\nb: ${B-2}\nc: ${C}\n"
    assert interpolate(text) == "a: 1\nb: 2\nc: \n"
    assert interpolate(text, {"A": "", "B": "", "C": "x"}) == "a: 1\nb: \nc: x\n"


def test_compose_services_and_wiring():
    services = compose()["services"]
    assert set(services) == {"oodserve", "gateway", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always"), name
    oodserve = services["oodserve"]
    assert oodserve["build"]["dockerfile"] == "docker/Dockerfile"
    assert oodserve["build"]["args"]["VARIANT"] == "cpu"
    assert "ports" not in oodserve, "replicas publish no host port (--scale); the gateway does"
    assert services["gateway"]["depends_on"]["oodserve"]["condition"] == "service_healthy"
    assert "HEALTHCHECK" in DOCKERFILE.read_text()  # what service_healthy waits for
    # Bind mounts of the repository's files exist (./models is the bundle, checked below).
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./docker"):
                assert (ROOT / source).exists(), volume
    # Prometheus reads the mounted directory; Grafana's provider path is the mounted folder.
    prometheus = services["prometheus"]
    assert "./docker/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "oodserve.yml")
    path = provider["providers"][0]["options"]["path"]
    assert f"./docker/grafana/dashboards:{path}:ro" in services["grafana"]["volumes"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    gateway = (ROOT / "docker" / "gateway" / "nginx.conf").read_text()
    assert "http://oodserve:8000" in gateway and "listen 8000;" in gateway


def test_every_service_setting_can_be_set_from_compose():
    """Every OODSERVE_* setting except the address (fixed by the image: 0.0.0.0:8000, which
    the healthcheck, the gateway and Prometheus rely on) passes through from the shell or
    .env, unset unless the user sets it."""
    environment = compose()["services"]["oodserve"]["environment"]
    expected = {f"OODSERVE_{name.upper()}" for name in Settings.model_fields} - {
        "OODSERVE_HOST", "OODSERVE_PORT"}
    assert set(environment) == expected
    # The defaults come from the image and the service, so no value is given here.
    assert all("=" not in item for item in environment)


def test_gpu_override_requests_a_gpu_the_compose_way():
    oodserve = compose(COMPOSE_GPU)["services"]["oodserve"]
    assert oodserve["build"]["args"]["VARIANT"] == "cuda"
    assert oodserve["image"] == "oodserve:cuda"
    (device,) = oodserve["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "OODSERVE_DEVICE=cuda" in oodserve["environment"]


# --- the image ---------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, args = (buffer + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        buffer = ""
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = path.strip("/").split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        for i in range(1, len(parts) + 1):
            if fnmatch("/".join(parts[:i]), pattern) or (
                    pattern.startswith("**/") and fnmatch(parts[i - 1], pattern[3:])):
                return True
    return False


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_builds_a_small_non_root_image_with_a_healthcheck():
    steps = instructions(DOCKERFILE.read_text())
    froms = [args for kw, args in steps if kw == "FROM"]
    assert len(froms) >= 3 and any(f.startswith("deps-${VARIANT}") for f in froms)
    stages = {f.split(" AS ")[1] for f in froms if " AS " in f}
    assert {"deps-cpu", "deps-cuda"} <= stages
    final = steps[max(i for i, (kw, _) in enumerate(steps) if kw == "FROM"):]
    kinds = [kw for kw, _ in final]
    user = next(args for kw, args in final if kw == "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    healthcheck = next(args for kw, args in final if kw == "HEALTHCHECK")
    assert '"/app/healthcheck.py"' in healthcheck
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
    assert ("EXPOSE", "8000") in final
    assert ("CMD", '["python", "-m", "service"]') in final
    env = " ".join(args for kw, args in final if kw == "ENV")
    assert "OODSERVE_HOST=0.0.0.0" in env and "OODSERVE_PORT=8000" in env
    # The image's bundle is the service's default one: /app is laid out as the checkout is
    # (service/ beside models/), so settings.DEFAULT_BUNDLE finds it; no second name for it.
    assert "OODSERVE_BUNDLE" not in env and "PYTHONPATH=/app" in env
    assert {("COPY", "service/ /app/service/"), ("COPY", "models/ /app/models/")} <= set(final)
    assert DEFAULT_BUNDLE.relative_to(REPO_ROOT).parts[0] == "models"
    # Only the virtual environment comes from the build stages: no compilers, no caches.
    copies_from = [args for kw, args in final if kw == "COPY" and args.startswith("--from")]
    assert copies_from == ["--from=venv /opt/venv /opt/venv"]


def test_image_installs_the_tested_torch_and_the_project_dependencies():
    text = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch, torchvision = re.search(r"TORCH := torch==(\S+) torchvision==(\S+)", makefile).groups()
    assert f"ARG TORCH_VERSION={torch}\n" in text
    assert f"ARG TORCHVISION_VERSION={torchvision}\n" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "pypi.org" not in text  # the CUDA build comes from pip's default index, unnamed
    # The RUN line that turns pyproject.toml into requirements.txt, run here for real.
    line = next(args for kw, args in instructions(text)
                if kw == "RUN" and "requirements.txt" in args and "tomllib" in args)
    command = (line.replace("/tmp/pyproject.toml", str(ROOT / "pyproject.toml"))
               .replace("> /tmp/requirements.txt", "")
               .replace("python ", f"{sys.executable} ", 1))
    result = subprocess.run(["sh", "-c", command], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    requirements = result.stdout.split()
    names = {re.split(r"[<>=!~\[; ]", r)[0] for r in requirements}
    assert {"fastapi", "uvicorn", "prometheus-client", "safetensors", "pillow"} <= names
    assert not names & {"torch", "torchvision"}


def test_make_test_installs_no_system_package():
    """`make test` unpacks Debian's prometheus package into a folder instead of installing it
    (installing it enables and starts a Prometheus server on the machine), and the tests
    use what it unpacked."""
    makefile = (ROOT / "Makefile").read_text()
    assert "apt-get install" not in makefile and "dpkg -i" not in makefile
    assert "apt-get download" in makefile and "dpkg-deb -x" in makefile
    assert re.search(r"^test: .*deploy-tools", makefile, re.MULTILINE)
    if (DEPLOY_TOOLS / "promtool").exists():
        assert tool("promtool") == str(DEPLOY_TOOLS / "promtool")


def test_build_context_holds_what_the_image_copies():
    patterns = dockerignore()
    for excluded in (".venv", "runs", ".git", ".pytest_cache", "training/__pycache__",
                     "service/routers/__pycache__", ".env"):
        assert dockerignored(excluded, patterns), excluded
    sources = [args.split()[:-1] for kw, args in instructions(DOCKERFILE.read_text())
               if kw == "COPY" and not args.startswith("--from")]
    for source in (s for group in sources for s in group):
        assert not dockerignored(source, patterns), source
        if source.startswith("models"):
            continue  # the bundle: next test
        assert (ROOT / source).exists(), source


@pytest.mark.skipif(not DEFAULT_BUNDLE.exists(),
                    reason=f"the default bundle {DEFAULT_BUNDLE} is not there yet: the image "
                           "(COPY models/) cannot be built until it is")
def test_default_bundle_is_there_for_the_image():
    from training.bundle import load_bundle

    assert load_bundle(DEFAULT_BUNDLE).manifest.name


# --- Grafana -----------------------------------------------------------------------------

PANEL_TYPES = {"timeseries", "stat", "table", "heatmap"}


def test_dashboard_json_is_valid():
    d = dashboard()
    assert d["uid"] == "oodserve" and d["title"] and isinstance(d["schemaVersion"], int)
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    ids, cells = set(), set()
    for panel in d["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["type"] in PANEL_TYPES, panel["title"]
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
        if panel["type"] == "heatmap":
            assert all(t["format"] == "heatmap" and "_bucket" in t["expr"]
                       for t in panel["targets"])


def test_dashboard_shows_what_the_issue_asks_for():
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for wanted in ("ood rate per detector", "requests", "errors", "latency percentiles",
                   "batch sizes", "energy score distribution",
                   "featurenorm score distribution", "model"):
        assert wanted in titles, wanted
    assert OOD_RATE_PANEL.lower() in titles
    # The OOD rate is the recorded series the OODServeOODRateHigh alert watches.
    assert metric_names(ood_rate_query()) == {"oodserve:ood_rate:ratio_rate5m"}
    assert "oodserve:ood_rate:ratio_rate5m" in recorded()


# Series that mean something only per model: each model's score buckets are its own (quantiles
# of its own calibration ID scores), and its OOD decisions are taken at its own thresholds.
PER_MODEL = re.compile(r"\b(?:oodserve_\w+_score_bucket|oodserve_ood_decisions_total"
                       r"|oodserve:ood_rate:ratio_rate5m)\b")
AGGREGATION = re.compile(r"\b(?:sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile)"
                         r"\s*(?:(by|without)\s*\(([^)]*)\))?\s*\(")


def test_per_model_series_are_never_added_up_across_models():
    """Adding up the score buckets of models whose bounds differ gives a meaningless
    histogram, and one model's OOD rate diluted by another model's traffic hides its drift:
    every aggregation in a rule or panel that reads a per-model series keeps `model`; every
    such panel follows the dashboard's model selector and names the model, in its legend or
    by being repeated once per model."""
    expressions = [(f"rule {r.get('record') or r.get('alert')}", r["expr"], None, None)
                   for r in rules()]
    expressions += [(f"panel {p['title']!r}", t["expr"], p, t) for p in dashboard()["panels"]
                    for t in p["targets"]]
    per_model = [e for e in expressions if PER_MODEL.search(e[1])]
    for where, expr, panel, target in per_model:
        for m in AGGREGATION.finditer(expr):
            mode, labels = m.groups()
            assert mode == "by" and "model" in {x.strip() for x in labels.split(",")}, (
                where, m.group())
        if panel is not None:
            assert f'model=~"${MODEL_VARIABLE}"' in expr, where
            assert ("{{model}}" in target["legendFormat"]
                    or panel.get("repeat") == MODEL_VARIABLE), where
    panels = {where for where, _, panel, _ in per_model if panel is not None}
    assert {"panel 'OOD rate per detector'", "panel 'Energy quantiles'",
            "panel 'FeatureNorm quantiles'"} <= panels
    # The heatmaps show one model each: one panel per model.
    heatmaps = [p for p in dashboard()["panels"] if p["type"] == "heatmap"
                and any(PER_MODEL.search(t["expr"]) for t in p["targets"])]
    assert len(heatmaps) == 2
    assert all(p["repeat"] == MODEL_VARIABLE and f"${MODEL_VARIABLE}" in p["title"]
               for p in heatmaps)
    variable = grafana_variables()[MODEL_VARIABLE]
    assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"


def test_the_per_model_check_catches_a_sum_across_models():
    summed = "histogram_quantile(0.5, sum by (le) (rate(oodserve_energy_score_bucket[5m])))"
    bare = "sum(rate(oodserve_ood_decisions_total[5m]))"
    kept = "sum by (model, le) (rate(oodserve_energy_score_bucket[5m]))"
    found = {e: [m.groups() for m in AGGREGATION.finditer(e)] for e in (summed, bare, kept)}
    assert found == {summed: [("by", "le")], bare: [(None, None)], kept: [("by", "model, le")]}


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query (Grafana's $__rate_interval replaced by a duration)."""
    queries = dashboard_queries()
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": without_grafana_macros(expr)}
        for i, (_, expr) in enumerate(queries)]}]}))
    result = promtool("check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_metric_names_are_read_out_of_promql():
    expr = ('sum by (le, endpoint) (rate(oodserve_x_bucket{endpoint=~"/a|b", status!="5"}'
            '[$__rate_interval])) / ignoring (detector) group_left () scalar(b:c:d) '
            'and on () up > bool 0.5')
    assert metric_names(expr) == {"oodserve_x_bucket", "b:c:d", "up"}


@pytest.mark.anyio
async def test_every_metric_the_dashboard_and_rules_read_is_exported(tiny_bundle):
    """Each series name in a dashboard query or a rule is a sample name of the running
    service's /metrics (after one prediction, so labelled series exist), a recording rule
    defined in docker/prometheus/rules, or one of Prometheus's own (up, ALERTS)."""
    async with serve(settings(tiny_bundle, max_batch_delay_ms=0)) as client:
        await predict_ok(client, noise_png(1))
        text = await metrics_text(client)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    exported = {s.name for s in samples}
    # The model selector's values: a label of a series the service exports from the start.
    query = grafana_variables()[MODEL_VARIABLE]["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
    assert label == "model"
    assert {s.labels.get(label) for s in samples if s.name == metric} == {
        json.loads((tiny_bundle / "manifest.json").read_text())["name"]}
    record = recorded()
    expressions = [(f"dashboard panel {title!r}", e) for title, e in dashboard_queries()]
    expressions += [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in rules()]
    used = set()
    for where, expr in expressions:
        names = metric_names(expr)
        assert names or re.fullmatch(r"vector\([0-9.]+\)", expr.strip()), where  # a level
        for name in names:
            used.add(name)
            assert (name in exported or name in record or name in PROMETHEUS_BUILTINS), (
                f"{where} reads {name}, which the service does not export")
    # The dashboard reads the service's own series, not only recorded ones.
    assert {"oodserve_requests_total", "oodserve_batch_size_bucket",
            "oodserve_energy_score_bucket", "oodserve_featurenorm_score_bucket",
            "oodserve_model_info", "oodserve_predictions_total",
            "oodserve_ood_decisions_total"} <= used
