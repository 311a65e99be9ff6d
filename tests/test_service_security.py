"""Security: the optional API key of the predict routes, no pickle at serving time, limits on
by default, nothing a client sent in the logs, metric labels a client cannot multiply, and a
container that runs as a non-root user with a read-only model directory."""

import ast
import hmac
import logging
import os
import pickle
import random
import re
import socket
import stat
import string
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from service_helpers import free_port, predict, serve, settings, wait_ready
from uploads import encode, noise_image, noise_png

import service.security
from service.app import create_app
from service.inference import Predictor
from service.settings import DEFAULT_BUNDLE, Settings

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[1]
KEY = "k3y-for-tests-0123456789"


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


# -- the API key --------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def keyed(tiny_bundle):
    async with serve(settings(tiny_bundle, api_key=KEY)) as client:
        yield client


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}",
    KEY, f"Bearer {KEY.upper()}", "Bearer \u00e9t\u00e9-non-ascii".encode(),
])
async def test_predict_routes_need_the_key(keyed, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    image = noise_png(1)
    assert_unauthorized(await keyed.post("/predict", files={"image": ("a.png", image)},
                                         headers=headers))
    assert_unauthorized(await keyed.post("/predict/batch", files=[("images", ("a.png", image))],
                                         headers=headers))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_right_key_is_let_in(keyed, scheme):
    response = await keyed.post("/predict", files={"image": ("a.png", noise_png(2))},
                                headers={"authorization": f"{scheme} {KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/model",
                                  "/openapi.json"])
async def test_probes_metrics_and_docs_stay_open(keyed, path):
    assert (await keyed.get(path)).status_code == 200


async def test_the_key_is_checked_before_the_body_is_read(tiny_bundle):
    """A client without the key costs no parsing: the refusal comes first, even for a
    body that is far too large and not even multipart. The rest of the body is then read
    and dropped (so that every client reads the answer), but no more than
    OODSERVE_MAX_DRAIN_BYTES of it."""
    sent = 0

    async def body():
        nonlocal sent
        for _ in range(1024):  # 64 MiB if it were all read
            sent += 1
            yield b"\0" * 65536

    app_settings = settings(tiny_bundle, api_key=KEY, max_drain_bytes=1024 * 1024)
    async with serve(app_settings) as keyed:
        response = await keyed.post("/predict", content=body(),
                                    headers={"content-type": "application/octet-stream"})
    assert_unauthorized(response)
    assert "close" in response.headers["connection"]  # not all of it was read
    assert sent <= 16 + 2


async def test_the_key_is_compared_in_constant_time(keyed, monkeypatch):
    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(service.security.hmac, "compare_digest", spy)
    await keyed.post("/predict", files={"image": ("a.png", noise_png(1))},
                     headers={"authorization": "Bearer short"})
    # Digests of both sides: equal lengths, so not even the key's length shows in the time.
    assert calls == [(32, 32)]


async def test_refusals_are_counted_under_their_route(keyed):
    await keyed.post("/predict", files={"image": ("a.png", noise_png(1))})
    text = (await keyed.get("/metrics")).text
    assert 'oodserve_requests_total{endpoint="/predict",status="401"}' in text


def test_openapi_declares_the_bearer_scheme_on_the_keyed_routes_only(tiny_bundle):
    spec = create_app(settings(tiny_bundle, api_key=KEY)).openapi()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"][
            "securitySchemes"]["apiKey"]["description"]}
    for path, item in spec["paths"].items():
        for operation in item.values():
            keyed = path.startswith(("/predict", "/admin/"))
            assert ("security" in operation) == keyed, path
            if keyed:
                assert "401" in operation["responses"]
    open_spec = create_app(settings(tiny_bundle)).openapi()
    assert "securitySchemes" not in open_spec.get("components", {})


def test_api_key_setting(monkeypatch):
    assert Settings(_env_file=None).api_key is None
    assert Settings(_env_file=None, api_key="").api_key is None
    monkeypatch.setenv("OODSERVE_API_KEY", KEY)
    s = Settings(_env_file=None)
    assert s.api_key.get_secret_value() == KEY
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    for bad in ("short", "has a space in it 0123", "tab\tseparated-0123456789"):
        with pytest.raises(ValidationError, match="at least 16 printable"):
            Settings(_env_file=None, api_key=bad)


def test_a_bad_key_stops_the_start_without_printing_it(monkeypatch, capsys):
    from service.__main__ import _settings

    secret = "not long enough"
    monkeypatch.setenv("OODSERVE_API_KEY", secret)
    with pytest.raises(SystemExit) as stop:
        _settings()
    assert "OODSERVE_API_KEY" in str(stop.value) and secret not in str(stop.value)


# -- no pickle ----------------------------------------------------------------------------

def _refuse(*args, **kwargs):
    raise AssertionError("pickle used at serving time")


async def test_no_pickle_is_loaded_while_loading_and_serving(tiny_bundle, monkeypatch):
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")]:
        monkeypatch.setattr(module, name, _refuse)
    async with serve(settings(tiny_bundle)) as client:  # loads the bundle, warms up
        assert (await predict(client, noise_png(3))).status_code == 200
        files = [("images", (f"{i}.png", noise_png(i))) for i in range(3)]
        assert (await client.post("/predict/batch", files=files)).status_code == 200
        for path in ("/v1/model", "/metrics", "/readyz"):
            assert (await client.get(path)).status_code == 200


def bundle_dirs(tiny_bundle: Path) -> list[Path]:
    return [tiny_bundle] + ([DEFAULT_BUNDLE] if DEFAULT_BUNDLE.is_dir() else [])


def test_bundles_hold_no_pickle(tiny_bundle):
    for bundle in bundle_dirs(tiny_bundle):
        for path in bundle.rglob("*"):
            if not path.is_file():
                continue
            head = path.read_bytes()[:8]
            assert path.suffix not in {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}, path
            assert not head.startswith(b"\x80"), f"{path} starts like a pickle"
            assert not head.startswith(b"PK\x03\x04"), f"{path} is a zip (torch.save?)"
        weights = bundle / "model.safetensors"
        header_len = int.from_bytes(weights.read_bytes()[:8], "little")
        assert 0 < header_len < weights.stat().st_size  # a safetensors header


def test_serving_code_never_unpickles():
    """Statically: nothing under service/, nor the bundle loader, calls torch.load or
    imports pickle, joblib or dill."""
    files = sorted((REPO / "service").rglob("*.py")) + [REPO / "training" / "bundle.py"]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "joblib", "dill"} & {
                    n.split(".")[0] for n in names}, path
            if isinstance(node, ast.Attribute) and node.attr == "load":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), path


# -- limits on by default -----------------------------------------------------------------

def test_limits_are_on_by_default_and_cannot_be_switched_off():
    s = Settings(_env_file=None)
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.max_image_pixels == 25_000_000
    assert s.max_batch_images == 64
    assert s.resolved_max_batch_size(cuda=False) == 32 and s.max_queue_size == 1024
    assert s.resolved_max_batch_size(cuda=True) == 1024
    for name, value in [("max_upload_bytes", 0), ("max_image_pixels", 0),
                        ("max_batch_images", 0), ("max_queue_size", 0),
                        ("max_upload_bytes", None), ("max_image_pixels", -1)]:
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **{name: value})
    # Pillow's own decompression-bomb check stays on as the second line of defence.
    assert Image.MAX_IMAGE_PIXELS is not None


# -- logs ---------------------------------------------------------------------------------

MARK = "zq7Xcanary"  # in everything the client sends below; must never reach a log


def png_with_text(text: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    return encode(noise_image(4), "PNG", pnginfo=info)


async def send_marked_requests(client: httpx.AsyncClient) -> list[int]:
    """Requests that carry MARK in every place a client controls."""
    image = noise_png(5)
    headers = {"user-agent": f"agent-{MARK}", "authorization": f"Bearer {MARK}-0123456789",
               "x-request-id": MARK, "cookie": f"session={MARK}"}
    requests = [
        ("POST", "/predict", {"files": {"image": (f"{MARK}.png", png_with_text(MARK))}}),
        ("POST", "/predict", {"files": {"image": (f"{MARK}.jpg", MARK.encode() * 10)}}),
        ("POST", "/predict", {"files": {"image": ("x.jpg", encode(noise_image(6), "JPEG")[:300]
                                                  + MARK.encode())}}),
        ("POST", "/predict", {"files": {MARK: ("x.png", image)}}),
        ("POST", "/predict", {"files": {"image": ("x.png", image)},
                              "params": {"decision": MARK}}),
        ("POST", "/predict", {"files": {"image": ("x.png", image)},
                              "params": {f"{MARK}_param": "1"}}),
        ("POST", "/predict", {"files": {"image": ("x.png", image)},
                              "params": {"tpr": MARK}}),
        ("POST", "/predict", {"content": f'{{"image": "{MARK}"}}',
                              "headers": {"content-type": "application/json"}}),
        ("POST", "/predict/batch", {"files": [("images", (f"{MARK}-1.png", image)),
                                              ("images", (f"{MARK}-2.txt", MARK.encode()))]}),
        ("GET", f"/{MARK}/secret", {}),
        ("GET", f"/v1/model?{MARK}=1", {}),
        (MARK.upper(), "/predict", {}),
    ]
    statuses = []
    for method, path, kwargs in requests:
        kwargs.setdefault("headers", {}).update(headers)
        statuses.append((await client.request(method, path, **kwargs)).status_code)
    return statuses


@pytest.fixture
def all_logs():
    """Every record of every logger, at DEBUG, except the test client's own (httpx)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if not record.name.startswith(("httpx", "httpcore")):
                records.append(record)

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    levels = {name: logging.getLogger(name).level for name in ("", "oodserve")}
    root.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield records
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def formatted(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in records)


async def test_no_request_data_in_the_logs(tiny_bundle, monkeypatch, all_logs):
    async with serve(settings(tiny_bundle, api_key=f"{MARK}-0123456789"[::-1])) as client:
        statuses = await send_marked_requests(client)
        assert set(statuses) == {200, 401, 404, 405}  # predict refused before reading
    async with serve(settings(tiny_bundle)) as client:
        statuses = await send_marked_requests(client)
        assert 200 in statuses and 422 in statuses and 415 in statuses
        # ... and when a forward pass fails, and when a bug raises.
        forward = Predictor.__call__

        def broken(self, images):
            raise RuntimeError("simulated device failure")

        monkeypatch.setattr(Predictor, "__call__", broken)
        statuses = await send_marked_requests(client)
        assert 500 in statuses
        monkeypatch.setattr(Predictor, "__call__", forward)
        monkeypatch.setattr(client.app.state.models.served().engine, "_prediction", broken)
        statuses = await send_marked_requests(client)
        assert 500 in statuses
    text = formatted(all_logs)
    assert "error id" in text  # the failures above were logged ...
    assert MARK not in text and MARK.lower() not in text.lower()  # ... without client data


def test_no_request_data_in_the_server_log(tiny_bundle, tmp_path):
    """The real server, uvicorn's own logging included, at log level debug."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODSERVE_")}
    env.update(OMP_NUM_THREADS="1", OODSERVE_TORCH_THREADS="1", OODSERVE_BUNDLE=str(tiny_bundle),
               OODSERVE_PORT=str(port), OODSERVE_LOG_LEVEL="debug")
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, port, log, timeout=120)

        async def drive():
            async with httpx.AsyncClient(base_url=base) as client:
                return await send_marked_requests(client)

        import asyncio

        statuses = asyncio.run(drive())
        assert 200 in statuses and 422 in statuses
        with socket.create_connection(("127.0.0.1", port)) as sock:  # not even HTTP
            sock.sendall(f"{MARK} / HTTP/9\r\n\r\n{MARK}".encode())
            sock.recv(1000)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    assert "Application startup complete" in text and "Invalid HTTP request" in text
    assert MARK not in text and MARK.lower() not in text.lower()


# -- metric labels ------------------------------------------------------------------------

def label_values(text: str) -> dict[str, set[tuple]]:
    """Metric family -> the set of label sets of its samples."""
    out: dict[str, set[tuple]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            out.setdefault(family.name, set()).add(labels)
    return out


async def test_clients_cannot_multiply_metric_series(tiny_bundle):
    """300 requests with random methods, paths, query strings and headers: no new metric
    family, no new label value but route templates, 'unmatched' and status codes, and no
    label value holding anything the client made up."""
    rng = random.Random(0)
    made_up: list[str] = []

    def word(n: int) -> str:
        made_up.append("".join(rng.choices(string.ascii_letters, k=n)))
        return made_up[-1]

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "FOO"]
    paths = ["/predict", "/predict/batch", "/healthz", "/readyz", "/metrics", "/v1/model",
             "/docs", "/openapi.json"]
    async with serve(settings(tiny_bundle)) as client:
        before = label_values((await client.get("/metrics")).text)
        for _ in range(300):
            path = rng.choice(paths + [f"/{word(8)}", f"/predict/{word(6)}",
                                       f"/v1/{word(5)}/{word(5)}", f"/predict%2F{word(6)}"])
            query = {word(6): word(7)} if rng.random() < 0.5 else None
            await client.request(word(6).upper() if rng.random() < 0.1 else rng.choice(methods),
                                 path, params=query, headers={"x-" + word(6).lower(): word(9)})
        after = label_values((await client.get("/metrics")).text)
    assert set(after) == set(before)  # no new metric families
    routes = set(paths) | {"/docs/oauth2-redirect", "/redoc", "unmatched"}
    for family, label_sets in after.items():
        assert len(label_sets) <= 64, (family, len(label_sets))  # bounded, whatever was sent
        for labels in label_sets:
            for name, value in labels:
                if name == "endpoint":
                    assert value in routes, value
                if name == "status":
                    assert re.fullmatch(r"[1-5]\d\d", value), value
                assert not any(w in value for w in made_up), (family, name, value)
    endpoints = {dict(labels)["endpoint"] for labels in after["oodserve_requests"]}
    assert "unmatched" in endpoints and endpoints <= routes


# -- the container ------------------------------------------------------------------------

DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def final_stage(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    steps = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
             for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#") and len(line.split()) > 1]
    last = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last:]


@pytest.mark.skipif(not DOCKERFILE.exists(), reason="no docker/Dockerfile")
def test_container_runs_as_non_root_with_a_read_only_model_directory():
    final = final_stage(DOCKERFILE.read_text())
    users = [args for kw, args in final if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    kinds = [kw for kw, _ in final]
    assert kinds.index("USER") < kinds.index("CMD")
    # The models are copied as root (no --chown) and never made writable: the service user
    # can read them, not change them.
    model_copies = [args for kw, args in final if kw == "COPY" and "models" in args]
    assert model_copies and not any("--chown" in a or "--chmod" in a for a in model_copies)
    for kw, args in final:
        if kw == "RUN":
            assert not re.search(r"(chown|chmod)[^&;]*(/app|models)", args), args
    # Other bundles are mounted read-only.
    if COMPOSE.exists():
        import yaml

        volumes = yaml.safe_load(COMPOSE.read_text())["services"]["oodserve"]["volumes"]
        bundle_mounts = [v for v in volumes if ":/bundles" in str(v)]
        assert bundle_mounts and all(str(v).endswith(":ro") for v in bundle_mounts)


def test_an_exported_bundle_is_readable_by_the_container_user(tiny_bundle):
    """Read-only for everybody but its owner, and readable by a non-root user other than
    the one that exported it."""
    for path in [tiny_bundle, *tiny_bundle.rglob("*")]:
        mode = path.stat().st_mode
        needed = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        assert mode & needed == needed, f"{path}: {stat.filemode(mode)}"
        assert not mode & stat.S_IWOTH, f"{path}: {stat.filemode(mode)}"
