"""Helpers for the deployment tests: paths, the Prometheus tools, the rules and the dashboard's
queries, and the metric names a PromQL expression reads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
GRAFANA_DIR = DOCKER / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "oodserve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = DOCKER / "Dockerfile"
# Where `make deploy-tools` unpacks promtool and prometheus.
DEPLOY_TOOLS = ROOT / ".deploy-tools" / "usr" / "bin"

# The panel whose query is "the OOD rate per detector" (the integration test asks Prometheus
# for exactly this query).
OOD_RATE_PANEL = "OOD rate per detector"
# Series Prometheus makes itself, not the service.
PROMETHEUS_BUILTINS = {"up", "ALERTS"}
# Grafana's macros, replaced by a duration when a query is checked outside Grafana.
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# The dashboard's own template variable (its models), in the queries as $model.
MODEL_VARIABLE = "model"


def tool(name: str) -> str:
    """Path of a Prometheus binary: the one `make deploy-tools` unpacked into
    :data:`DEPLOY_TOOLS`, else one on PATH. Fails (not skips) when there is none, as CI has
    them (`make test`)."""
    unpacked = DEPLOY_TOOLS / name
    path = str(unpacked) if unpacked.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found in {DEPLOY_TOOLS} or on PATH: `make deploy-tools` "
                    "unpacks Debian's prometheus package there (without installing it)")
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=60)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    """Every rule of every rule file (recording rules and alerts)."""
    return [rule for path in RULE_FILES for group in load_yaml(path)["groups"]
            for rule in group["rules"]]


def recorded() -> dict[str, str]:
    """Recording rule name -> its expression."""
    return {r["record"]: r["expr"] for r in rules() if "record" in r}


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def ood_rate_query() -> str:
    """The dashboard's OOD-rate-per-detector query (the one with a series per detector)."""
    panel = next(p for p in dashboard()["panels"] if p["title"] == OOD_RATE_PANEL)
    return next(t["expr"] for t in panel["targets"] if "{{detector}}" in t["legendFormat"])


def grafana_variables() -> dict[str, dict]:
    """The dashboard's template variables by name."""
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def without_grafana_macros(expr: str) -> str:
    """The query as Grafana sends it to Prometheus with every template variable at "All"
    (its ``allValue``), the range macros replaced by durations."""
    for macro, value in GRAFANA_RANGES.items():
        expr = expr.replace(macro, value)
    for name, variable in grafana_variables().items():
        for form in (f"${{{name}}}", f"${name}"):
            expr = expr.replace(form, variable["allValue"])
    return expr


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression reads (function and aggregation names,
    keywords, label names, strings and durations left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery durations
    s = _GROUPING.sub("", s)  # label lists of by/on/...
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m.group())
    return names


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    with ``env`` (default: nothing set, so the defaults)."""
    env = env or {}

    def value(m: re.Match) -> str:
        name, sep, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] != "" or sep != ":-"):
            return env[name]
        return default if sep else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", value, text)


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(interpolate(path.read_text()))
