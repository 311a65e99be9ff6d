"""The Kubernetes and KServe manifests (deploy/), checked without a cluster or a network.

- Built-in kinds are validated with ``kubernetes-validate`` (the Kubernetes OpenAPI schemas
  it ships, strict: an unknown field is an error) for the oldest and the newest Kubernetes
  version it knows.
- Custom resources (ServiceMonitor, PodMonitor, PrometheusRule, InferenceService) are
  validated against
  their CRDs' OpenAPI schemas, vendored in tests/data/crds/ (see its README), closed the way
  ``kubectl apply``'s strict field validation closes them; their metadata as Kubernetes
  metadata.
- The kustomizations are rendered here. No kustomize installs from this project's package
  sources (Debian bookworm has none, npm neither, PyPI's bindings need Python 3.14), so the
  test renders them itself, and the overlay is written to make that trivial and exact: a
  JSON patch (RFC 6902, which kustomize applies as it is) instead of a strategic merge
  patch, whose merge rules per field would have to be re-implemented. The renderer knows
  only the fields the kustomizations use and refuses any other. Where a ``kustomize`` or
  ``kubectl`` binary is on PATH, its rendering must be the same.
- The PrometheusRule carries exactly compose's rules (docker/prometheus/rules) and passes
  their unit tests (docker/prometheus/tests) under promtool.
- The wiring: ports, probes, labels and selectors agree; every OODSERVE_* variable is a
  setting with a valid value; workers and threads match the CPU request; the pods run as the
  image's user; the probes' and the scrape's paths answer on the real service.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    COMPOSE_GPU,
    DOCKERFILE,
    ROOT,
    RULE_FILES,
    RULE_TESTS,
    alerts,
    compose,
    load_yaml,
    promtool,
)
from kubernetes_validate.utils import latest_version
from service_helpers import serve, settings

from service.settings import DEFAULT_BUNDLE, Settings

DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
GPU = DEPLOY / "kubernetes" / "overlays" / "gpu"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
PODMONITOR = DEPLOY / "kserve" / "podmonitor.yaml"
CRDS = ROOT / "tests" / "data" / "crds"
CRD_FILES = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
             "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
             "InferenceService": "serving.kserve.io_inferenceservices.yaml"}
# The oldest Kubernetes kubernetes-validate has schemas for, and the newest.
K8S_VERSIONS = ("1.25", latest_version())
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}


# --- rendering ---------------------------------------------------------------------------


def documents(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(doc: dict, operations: list[dict]) -> None:
    """RFC 6902's add, replace, remove and test, in place; a failed test or a missing path
    raises, as kustomize fails the build."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
                continue
            current = node[index]
        else:
            index = last
            if kind == "add":
                node[index] = copy.deepcopy(op["value"])
                continue
            current = node[index]  # KeyError: replace, remove and test need the path
        if kind == "test":
            if current != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {current!r} != {op['value']!r}")
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise ValueError(f"unsupported operation {kind!r}")


def _targets(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"],
              "name": doc["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def pod_containers(doc: dict) -> list[dict]:
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]["containers"]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def _set_image(container: dict, image: dict) -> None:
    name, _, tag = container["image"].partition(":")
    if name == image["name"]:
        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def kustomize(directory) -> list[dict]:
    """``kustomize build directory`` for what these kustomizations use: resources (files and
    directories), JSON patches with a target, and images (new name, new tag)."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not implement {unknown}"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs += kustomize(path) if path.is_dir() else documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, "only JSON patches with a target"
        targets = [d for d in docs if _targets(d, patch["target"])]
        assert targets, f"{patch['path']} matches no resource"
        for doc in targets:
            json_patch(doc, load_yaml(directory / patch["path"]))
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for doc in docs:
            for container in pod_containers(doc):
                _set_image(container, image)
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


BUILDS = {"base": BASE, "gpu": GPU}
KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
         "ServiceMonitor", "PrometheusRule"}


def all_manifests() -> list[tuple[str, dict]]:
    out = [(f"{name}/{d['kind']}", d) for name, path in BUILDS.items() for d in kustomize(path)]
    return out + [(f"kserve/{d['kind']}", d) for path in sorted(KSERVE.parent.glob("*.yaml"))
                  for d in documents(path)]


def test_kustomizations_render_the_expected_resources():
    for name, path in BUILDS.items():
        docs = kustomize(path)
        assert set(by_kind(docs)) == KINDS, name
        assert {d["metadata"]["name"] for d in docs} == {"oodserve"}
    # Every file of the base is one of its resources (none forgotten in kustomization.yaml).
    listed = set(load_yaml(BASE / "kustomization.yaml")["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}


def test_json_patch_tests_fail_when_the_base_changes():
    doc = {"env": [{"name": "A", "value": "1"}]}
    json_patch(doc, [{"op": "test", "path": "/env/0/name", "value": "A"},
                     {"op": "replace", "path": "/env/0/value", "value": "2"},
                     {"op": "add", "path": "/env/-", "value": {"name": "B"}},
                     {"op": "add", "path": "/x~1y", "value": 1}])
    assert doc == {"env": [{"name": "A", "value": "2"}, {"name": "B"}], "x/y": 1}
    with pytest.raises(ValueError, match="test failed"):
        json_patch(doc, [{"op": "test", "path": "/env/0/name", "value": "B"}])
    with pytest.raises(KeyError):
        json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])


KUSTOMIZE = shutil.which("kustomize") or shutil.which("kubectl")


@pytest.mark.skipif(KUSTOMIZE is None, reason="no kustomize or kubectl on PATH to compare with")
@pytest.mark.parametrize("name", BUILDS)
def test_rendering_is_kustomizes(name):
    command = [KUSTOMIZE, "build" if KUSTOMIZE.endswith("kustomize") else "kustomize",
               str(BUILDS[name])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    ours = kustomize(BUILDS[name])
    assert len(theirs) == len(ours)
    assert by_kind(theirs) == by_kind(ours)


# --- schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_follow_the_kubernetes_schemas(version):
    checked = set()
    for where, doc in all_manifests():
        if doc["kind"] in CRD_FILES:
            # Custom resources: their metadata is Kubernetes metadata (the rest: below).
            doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        checked.add(where)
    assert len(checked) == 2 * len(KINDS) + 2  # and the InferenceService and its PodMonitor


def crd_schema(kind: str, api_version: str) -> dict:
    crd = load_yaml(CRDS / CRD_FILES[kind])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return closed(served["schema"]["openAPIV3Schema"])


def closed(schema: dict) -> dict:
    """The schema with every object that lists its properties closed to others, as the API
    server's strict field validation treats them (unless the CRD preserves unknown fields)."""
    schema = dict(schema)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    if "properties" in schema:
        schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    return schema


def list_map_duplicates(schema: dict, value, path: str = "") -> list[str]:
    """Items of an ``x-kubernetes-list-type: map`` list that share their keys (defaults
    applied), which the API server refuses."""
    found = []
    if isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            item = schema["items"]["properties"]
            keys = [tuple(v.get(k, item[k].get("default")) for k in
                          schema["x-kubernetes-list-map-keys"]) for v in value]
            found += [f"{path}: duplicate {k}" for k in set(keys) if keys.count(k) > 1]
        for i, v in enumerate(value):
            found += list_map_duplicates(schema["items"], v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if k in schema.get("properties", {}):
                found += list_map_duplicates(schema["properties"][k], v, f"{path}.{k}")
    return found


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schema(doc["kind"], doc["apiVersion"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + list_map_duplicates(schema, doc)


def test_custom_resources_follow_their_crds():
    custom = [(where, d) for where, d in all_manifests() if d["kind"] in CRD_FILES]
    assert {d["kind"] for _, d in custom} == set(CRD_FILES)
    for where, doc in custom:
        assert not crd_errors(doc), (where, crd_errors(doc))


def test_the_schema_checks_catch_mistakes():
    docs = by_kind(kustomize(BASE))
    monitor = copy.deepcopy(docs["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"  # a typo
    del monitor["spec"]["selector"]
    assert len(crd_errors(monitor)) == 2
    rule = copy.deepcopy(docs["PrometheusRule"])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    rule["spec"]["groups"].append(rule["spec"]["groups"][1])  # a group name twice
    assert len(crd_errors(rule)) == 2
    (isvc,) = documents(KSERVE)
    isvc["spec"]["predictor"]["containers"][0]["env"].append({"name": "PROTOCOL"})
    isvc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert len(crd_errors(isvc)) == 2
    (podmonitor,) = documents(PODMONITOR)
    podmonitor["spec"]["podMetricsEndpoints"][0]["portNumber"] = 80000
    podmonitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    del podmonitor["spec"]["selector"]
    assert len(crd_errors(podmonitor)) == 3
    deployment = docs["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# --- monitoring --------------------------------------------------------------------------


def compose_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in load_yaml(path)["groups"]]


def test_prometheusrule_carries_compose_rules_unchanged():
    """The same groups (Prometheus evaluates groups independently, so their order is
    free), each identical: name, rules, every field of every rule."""
    ours = {g["name"]: g for g in by_kind(kustomize(BASE))["PrometheusRule"]["spec"]["groups"]}
    theirs = {g["name"]: g for g in compose_groups()}
    assert len(ours) == len(compose_groups()) and set(ours) == set(theirs)
    for name, group in ours.items():
        assert group == theirs[name], name


def test_prometheusrule_passes_compose_rule_tests(tmp_path):
    """promtool checks the PrometheusRule's groups as a rule file and runs compose's unit
    tests against them instead of compose's files."""
    rules = tmp_path / "rules" / "prometheusrule.yml"
    rules.parent.mkdir()
    groups = by_kind(kustomize(BASE))["PrometheusRule"]["spec"]["groups"]
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = promtool("check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert RULE_TESTS
    tests = []
    for path in RULE_TESTS:
        suite = load_yaml(path)
        assert {(path.parent / f).resolve() for f in suite["rule_files"]} == set(RULE_FILES)
        suite["rule_files"] = [str(rules)]
        tests.append(tmp_path / path.name)
        tests[-1].write_text(yaml.safe_dump(suite, sort_keys=False))
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_servicemonitor_scrapes_the_job_the_alerts_watch():
    docs = by_kind(kustomize(BASE))
    monitor, service = docs["ServiceMonitor"]["spec"], docs["Service"]
    jobs = {job for alert in alerts().values()
            for job in re.findall(r'\bjob="([^"]+)"', alert["expr"])}
    assert jobs == {"oodserve"}
    # The Prometheus Operator names the job after the Service's label named by jobLabel.
    assert service["metadata"]["labels"][monitor["jobLabel"]] in jobs
    labels = monitor["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    compose_interval = load_yaml(ROOT / "docker" / "prometheus" / "prometheus.yml")["global"]
    assert endpoint["interval"] == compose_interval["scrape_interval"]


def relabel(labels: dict[str, str], config: dict) -> dict[str, str]:
    """Prometheus's `replace` relabeling (the Operator's default action) of a target's
    labels; any other action is refused, as the test does not implement it."""
    assert config.get("action", "replace").lower() == "replace", config
    value = config.get("separator", ";").join(labels.get(name, "")
                                              for name in config.get("sourceLabels", []))
    match = re.fullmatch(config.get("regex", "(.*)"), value)
    if match:
        value = re.sub(r"\$\{?(\d+)\}?", lambda g: match.group(int(g.group(1))) or "",
                       config.get("replacement", "$1"))
        labels = {**labels, config["targetLabel"]: value}
    return labels


def test_relabel_replaces_as_prometheus_does():
    target = {"job": "ns/oodserve", "__meta_pod": "a-1"}
    assert relabel(target, {"targetLabel": "job", "replacement": "x"})["job"] == "x"
    assert relabel(target, {"sourceLabels": ["__meta_pod"], "regex": "(.*)-(\\d+)",
                            "targetLabel": "n", "replacement": "${2}$1"})["n"] == "1a"
    assert relabel(target, {"sourceLabels": ["__meta_pod"], "regex": "b.*",
                            "targetLabel": "job"}) == target


def test_podmonitor_scrapes_the_predictor_as_the_job_the_alerts_watch():
    """The InferenceService's pods are scraped on the container's port and path, with the
    job the rules name; KServe labels its predictor pods with the InferenceService's name and
    component=predictor, and both objects are in the same namespace (neither names one)."""
    (isvc,) = documents(KSERVE)
    (podmonitor,) = documents(PODMONITOR)
    assert "namespace" not in isvc["metadata"] and "namespace" not in podmonitor["metadata"]
    spec = podmonitor["spec"]
    assert spec["selector"] == {"matchLabels": {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
        "component": "predictor"}}
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = pod_containers(isvc)
    (port,) = container["ports"]
    assert endpoint["portNumber"] == port["containerPort"] == image_port()
    assert endpoint["path"] == "/metrics"
    compose_interval = load_yaml(ROOT / "docker" / "prometheus" / "prometheus.yml")["global"]
    assert endpoint["interval"] == compose_interval["scrape_interval"]
    # The Operator names the job <namespace>/<name> (no jobLabel); the relabeling makes it
    # the job of the rules' up{job="oodserve"}.
    assert "jobLabel" not in spec
    labels = {"job": f"default/{podmonitor['metadata']['name']}",
              "__meta_kubernetes_pod_name": "oodserve-predictor-00001-deployment-x"}
    for config in endpoint["relabelings"]:
        labels = relabel(labels, config)
    jobs = {job for alert in alerts().values()
            for job in re.findall(r'\bjob="([^"]+)"', alert["expr"])}
    assert {labels["job"]} == jobs
    # KServe's own annotations name the same port and path (for its metrics aggregation).
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.kserve.io/path"] == endpoint["path"]


# --- wiring ------------------------------------------------------------------------------


def image_user() -> int:
    uid, gid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.MULTILINE).groups()
    assert uid == gid
    return int(uid)


def image_port() -> int:
    return int(re.search(r"\bOODSERVE_PORT=(\d+)", DOCKERFILE.read_text()).group(1))


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_every_oodserve_variable_is_a_setting_with_a_valid_value():
    names = {f"OODSERVE_{name.upper()}": name for name in Settings.model_fields}
    for where, doc in all_manifests():
        for container in pod_containers(doc):
            values = {}
            for name, value in env(container).items():
                if name.startswith("OODSERVE_"):
                    assert name in names, f"{where}: {name} is not a setting"
                    if value is not None:  # valueFrom: a Secret's value
                        values[names[name]] = value
            Settings(_env_file=None, **values)  # raises when a value does not validate


def test_pod_runs_as_the_image_user_with_a_read_only_root():
    for name, path in BUILDS.items():
        pod = by_kind(kustomize(path))["Deployment"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == security["runAsGroup"] == image_user()
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}
        # The one writable place is /tmp, where `python -m service` makes the workers'
        # metrics directory (tempfile; PROMETHEUS_MULTIPROC_DIR and TMPDIR are not set).
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == "/tmp"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume
        assert not {"PROMETHEUS_MULTIPROC_DIR", "TMPDIR"} & set(env(container)), name
        assert pod["automountServiceAccountToken"] is False


def test_ports_probes_and_selectors_agree():
    for name, path in BUILDS.items():
        docs = by_kind(kustomize(path))
        deployment, service = docs["Deployment"], docs["Service"]
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        (port,) = container["ports"]
        assert port == {"name": "http", "containerPort": image_port(), "protocol": "TCP"}
        (service_port,) = service["spec"]["ports"]
        assert service_port["name"] == "http" and service_port["targetPort"] == port["name"]
        probes = {kind: container[f"{kind}Probe"]["httpGet"]
                  for kind in ("startup", "liveness", "readiness")}
        assert {k: p["path"] for k, p in probes.items()} == {
            "startup": "/healthz", "liveness": "/healthz", "readiness": "/readyz"}
        assert all(p["port"] == port["name"] for p in probes.values())
        labels = pod["metadata"]["labels"]
        for selector in (deployment["spec"]["selector"]["matchLabels"],
                         service["spec"]["selector"],
                         docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
            assert selector.items() <= labels.items(), name
        hpa = docs["HorizontalPodAutoscaler"]["spec"]
        target = hpa["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
        # The autoscaler owns the replica count; a budget of one pod leaves one to evict.
        assert "replicas" not in deployment["spec"]
        assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["minReplicas"]
        (metric,) = hpa["metrics"]
        assert metric["resource"]["name"] == "cpu" and "cpu" in container["resources"][
            "requests"]


def test_shutdown_leaves_time_for_the_drain():
    """Kubernetes kills the pod terminationGracePeriodSeconds after it starts stopping it
    (preStop included); the service's drain answers what it has received, and a request may
    wait up to the read timeout for its next part."""
    pod = by_kind(kustomize(BASE))["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    read_timeout = Settings.model_fields["read_timeout_s"].default
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + read_timeout


def cpu_request(container: dict) -> int:
    return int(container["resources"]["requests"]["cpu"])


def test_workers_and_threads_match_the_cpu_request():
    (base,) = by_kind(kustomize(BASE))["Deployment"]["spec"]["template"]["spec"]["containers"]
    e = env(base)
    assert "OODSERVE_DEVICE" not in e and "OODSERVE_LAYOUT" not in e  # replicated on a CPU
    assert int(e["OODSERVE_WORKERS"]) * int(e["OODSERVE_TORCH_THREADS"]) == cpu_request(base)
    assert int(e["OODSERVE_DECODE_WORKERS"]) == int(e["OODSERVE_TORCH_THREADS"])
    assert "cpu" not in base["resources"]["limits"]  # hence the explicit sizes
    (gpu,) = by_kind(kustomize(GPU))["Deployment"]["spec"]["template"]["spec"]["containers"]
    g = env(gpu)
    layout = Settings(_env_file=None, device=g["OODSERVE_DEVICE"]).resolved_layout(cuda=True)
    assert layout == "engine"  # one core for the engine, the others for the workers
    assert int(g["OODSERVE_WORKERS"]) + 1 == cpu_request(gpu)
    (isvc,) = documents(KSERVE)
    (container,) = pod_containers(isvc)
    k = env(container)
    assert int(k["OODSERVE_WORKERS"]) * int(k["OODSERVE_TORCH_THREADS"]) == cpu_request(
        container)
    # KServe fills a missing request or limit from its defaults: both are set.
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]


def startup_budget(container: dict) -> int:
    probe = container["startupProbe"]
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_gpu_overlay_asks_for_a_gpu_as_compose_does():
    docs = by_kind(kustomize(GPU))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == compose(COMPOSE_GPU)["services"]["oodserve"]["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "OODSERVE_DEVICE=cuda" in compose(COMPOSE_GPU)["services"]["oodserve"]["environment"]
    assert env(container)["OODSERVE_DEVICE"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    # Longer to start (graph capture), nothing else different but what the patch says.
    (base,) = by_kind(kustomize(BASE))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert startup_budget(container) > startup_budget(base)
    for kind in KINDS - {"Deployment"}:
        assert docs[kind] == by_kind(kustomize(BASE))[kind], kind


def test_inferenceservice_runs_the_image_with_protocol_v2():
    (isvc,) = documents(KSERVE)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = pod_containers(isvc)
    # KServe reads the protocol of a custom container from its PROTOCOL variable.
    assert container["name"] == "kserve-container"
    assert env(container)["PROTOCOL"] == "v2"
    assert container["image"].split(":")[0] == "oodserve"
    (port,) = container["ports"]
    assert port["containerPort"] == image_port()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": image_port()}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": image_port()}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_user()
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.skipif(not DEFAULT_BUNDLE.exists(), reason=f"{DEFAULT_BUNDLE} is not there yet")
def test_inferenceservice_names_the_model_the_image_serves():
    name = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())["name"]
    assert f"/v2/models/{name}/infer" in KSERVE.read_text()


@pytest.mark.anyio
async def test_probe_and_scrape_paths_answer_on_the_service(tiny_bundle):
    paths = set()
    for _, doc in all_manifests():
        for container in pod_containers(doc):
            paths |= {container[p]["httpGet"]["path"] for p in
                      ("startupProbe", "livenessProbe", "readinessProbe") if p in container}
    paths |= {e["path"] for e in by_kind(kustomize(BASE))["ServiceMonitor"]["spec"]["endpoints"]}
    paths |= {e["path"] for d in documents(PODMONITOR) for e in d["spec"]["podMetricsEndpoints"]}
    assert paths == {"/healthz", "/readyz", "/metrics"}
    async with serve(settings(tiny_bundle)) as client:
        for path in sorted(paths):
            assert (await client.get(path)).status_code == 200, path
