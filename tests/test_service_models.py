"""Several models at once (OODSERVE_MODEL_REPOSITORY), addressed by name, and their reload
without downtime (POST /admin/reload, SIGHUP)."""

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
from conftest import make_bundle
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import (
    metric,
    metrics_text,
    predict,
    predict_ok,
    running_service,
    serve,
    settings,
)
from test_signing import write_keys
from uploads import noise_png

import service.engine
from service.model_registry import check_models, choose_default, scan, version_key
from training.bundle import BundleError, load_bundle
from training.data.archives import file_sha256
from training.signing import sign_bundle

pytestmark = pytest.mark.anyio

KEY = "reload-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def copy_bundle(source: Path, dest: Path, name: str | None = None,
                version: str | None = None) -> Path:
    """``source`` copied to ``dest`` under another name or version (the manifest edited)."""
    shutil.copytree(source, dest)
    manifest = dest / "manifest.json"
    fields = json.loads(manifest.read_text())
    fields.update({k: v for k, v in (("name", name), ("version", version)) if v is not None})
    manifest.write_text(json.dumps(fields))
    return dest


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    """Another small bundle: other weights (other scores), other calibration, version 0.0.1."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "other", seed=1)


@pytest.fixture
def repository(tmp_path, tiny_bundle, other_bundle) -> Path:
    """Two models: alpha (the tiny bundle) and beta (the other one)."""
    repo = tmp_path / "repository"
    repo.mkdir()
    copy_bundle(tiny_bundle, repo / "alpha", name="alpha", version="1.0.0")
    copy_bundle(other_bundle, repo / "beta", name="beta", version="2.0.0")
    return repo


def corrupt(bundle: Path) -> None:
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


# -- which bundles, and which is the default ------------------------------------------------

def test_versions_are_ordered_as_dotted_integers():
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9")
    assert version_key("1.0.0-rc1") is None and version_key("latest") is None


def test_the_highest_version_of_a_name_serves(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    repo.mkdir()
    for directory, version in (("v9", "1.9.0"), ("v10", "1.10.0"), ("v2", "1.2.0")):
        copy_bundle(tiny_bundle, repo / directory, version=version)
    shutil.copytree(tiny_bundle, repo / ".v11.staging")  # export_bundle's staging: skipped
    (repo / "notes").mkdir()  # no manifest: not a bundle
    found = scan(settings(tiny_bundle, model_repository=repo))
    assert list(found.versions) == ["test-resnet20"] and not found.problems
    # The highest first, and the others, highest first, to fall back on.
    assert [path for path, _ in found.versions["test-resnet20"]] == [
        repo / "v10", repo / "v9", repo / "v2"]


def test_a_start_serves_the_highest_version_that_loads(tmp_path, tiny_bundle, other_bundle,
                                                       caplog):
    """A half-copied newest version (refused by a reload, the old one serving on) must not
    stop the next start: it serves what the running processes serve."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_bundle(tiny_bundle, repo / "alpha-1.0", name="alpha", version="1.0.0")
    copy_bundle(other_bundle, repo / "alpha-1.1", name="alpha", version="1.1.0")
    (repo / "alpha-1.1" / "model.safetensors").unlink()  # still being copied
    copy_bundle(tiny_bundle, repo / "broken", name="beta", version="1.0.0")
    corrupt(repo / "broken")  # no version of beta loads: beta is not served
    (repo / "unreadable").mkdir()
    (repo / "unreadable" / "manifest.json").write_text("{half")
    with caplog.at_level(logging.WARNING, logger="oodserve"):
        bundles = check_models(settings(tiny_bundle, model_repository=repo,
                                        default_model="alpha"))
    assert [(b.manifest.name, b.manifest.version) for b in bundles] == [("alpha", "1.0.0")]
    for logged in ("alpha-1.1", "model 'beta': no version of it loads", "unreadable"):
        assert logged in caplog.text
    # The default model must be served.
    with pytest.raises(BundleError, match="'beta' is not served.*does not match"):
        check_models(settings(tiny_bundle, model_repository=repo, default_model="beta"))
    (repo / "alpha-1.0" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="no model can be served"):
        check_models(settings(tiny_bundle, model_repository=repo))


def test_versions_that_cannot_be_ordered_are_a_problem(tmp_path, tiny_bundle):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_bundle(tiny_bundle, repo / "a", version="1.0.0")
    copy_bundle(tiny_bundle, repo / "b", version="latest")
    copy_bundle(tiny_bundle, repo / "c", name="twice", version="1.0.0")
    copy_bundle(tiny_bundle, repo / "d", name="twice", version="1.0.0")
    (repo / "e").mkdir()
    (repo / "e" / "manifest.json").write_text("{not json")
    found = scan(settings(tiny_bundle, model_repository=repo))
    assert found.versions == {}
    problems = {name: message for name, message, _ in found.problems}
    assert "cannot order" in problems["test-resnet20"]
    assert "in two directories" in problems["twice"]
    assert "not a valid manifest" in problems[None]


def test_default_model_rules(tmp_path, repository, tiny_bundle):
    names = ["alpha", "beta"]
    assert choose_default(settings(tiny_bundle, model_repository=repository,
                                   default_model="beta"), names) == "beta"
    with pytest.raises(BundleError, match="'gamma' is not served"):
        choose_default(settings(tiny_bundle, default_model="gamma"), names)
    # OODSERVE_BUNDLE's model, when the repository serves its name.
    assert choose_default(settings(repository / "beta"), names) == "beta"
    assert choose_default(settings(tiny_bundle), ["alpha"]) == "alpha"  # the only one
    with pytest.raises(BundleError, match="set OODSERVE_DEFAULT_MODEL"):
        choose_default(settings(tiny_bundle), names)


async def test_a_repository_without_a_default_does_not_start(repository, tiny_bundle):
    app_settings = settings(tiny_bundle, model_repository=repository)
    with pytest.raises(BundleError, match="OODSERVE_DEFAULT_MODEL"):
        async with serve(app_settings):
            pass


# -- addressing ------------------------------------------------------------------------------

@pytest.fixture
async def two_models(repository, tiny_bundle):
    async with serve(settings(tiny_bundle, model_repository=repository,
                              default_model="alpha", api_key=KEY)) as client:
        client.headers.update(AUTH)
        yield client


async def test_models_are_addressed_by_name(two_models, repository):
    image = noise_png(1)
    headers = AUTH
    default = (await two_models.post("/predict", files={"image": ("x", image)},
                                     headers=headers)).json()
    alpha = (await two_models.post("/predict", params={"model": "alpha"},
                                   files={"image": ("x", image)}, headers=headers)).json()
    beta = (await two_models.post("/predict", params={"model": "beta"},
                                  files={"image": ("x", image)}, headers=headers)).json()
    assert default["model"] == alpha["model"] == {"name": "alpha", "version": "1.0.0"}
    assert beta["model"] == {"name": "beta", "version": "2.0.0"}
    assert default["energy"] == alpha["energy"] != beta["energy"]  # other weights
    # The parameter as a form field too; and on the batch route.
    form = await two_models.post("/predict", data={"model": "beta"},
                                 files={"image": ("x", image)}, headers=headers)
    assert form.json()["energy"] == beta["energy"]
    batch = await two_models.post("/predict/batch", params={"model": "beta"},
                                  files=[("images", ("a", image)), ("images", ("b", image))],
                                  headers=headers)
    assert batch.json()["model"]["name"] == "beta"
    assert [r["prediction"]["energy"]["score"] for r in batch.json()["results"]] == [
        beta["energy"]["score"]] * 2
    summary = (await two_models.get("/v1/model", params={"model": "beta"})).json()
    assert (summary["name"], summary["version"]) == ("beta", "2.0.0")
    assert summary["weights_sha256"] == file_sha256(repository / "beta" / "model.safetensors")
    assert (await two_models.get("/v1/model")).json()["name"] == "alpha"


async def test_an_unknown_model_is_a_404(two_models):
    response = await two_models.post("/predict", params={"model": "gamma"}, headers=AUTH,
                                     files={"image": ("x", noise_png(1))})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "'alpha'" in error["message"]
    assert (await two_models.get("/v1/model", params={"model": "gamma"})).status_code == 404
    empty = await two_models.post("/predict", params={"model": ""}, headers=AUTH,
                                  files={"image": ("x", noise_png(1))})
    assert empty.status_code == 422


async def test_metrics_are_labelled_per_model_in_one_valid_exposition(two_models,
                                                                      repository):
    for model, count in (("alpha", 2), ("beta", 3)):
        for i in range(count):
            response = await two_models.post("/predict", params={"model": model},
                                             files={"image": ("x", noise_png(i))},
                                             headers=AUTH)
            assert response.status_code == 200
    text = await metrics_text(two_models)
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # each family once, the models' series merged
    assert text.count("# TYPE oodserve_energy_score histogram") == 1
    assert metric(text, "oodserve_predictions_total", model="alpha", version="1.0.0") == 2
    assert metric(text, "oodserve_predictions_total", model="beta", version="2.0.0") == 3
    assert metric(text, "oodserve_predictions_total") == 5  # summed over the models
    assert metric(text, "oodserve_energy_score_count", model="beta", version="2.0.0") == 3
    # Each model's score buckets are its own calibration's quantiles.
    energy = next(f for f in families if f.name == "oodserve_energy_score")
    bounds = {model: [s.labels["le"] for s in energy.samples
                      if s.name.endswith("_bucket") and s.labels["model"] == model]
              for model in ("alpha", "beta")}
    assert bounds["alpha"] != bounds["beta"] and all(b[-1] == "+Inf" for b in bounds.values())
    for model in ("alpha", "beta"):
        counts = [s.value for s in energy.samples
                  if s.name.endswith("_bucket") and s.labels["model"] == model]
        assert counts == sorted(counts)  # cumulative within each model's own buckets
    for model, version in (("alpha", "1.0.0"), ("beta", "2.0.0")):
        assert [s.labels["version"] for f in families if f.name == "oodserve_model_info"
                for s in f.samples if s.labels["name"] == model] == [version]


# -- reload, in process ----------------------------------------------------------------------

async def test_admin_reload_needs_a_configured_key(repository, tiny_bundle):
    async with serve(settings(tiny_bundle, model_repository=repository,
                              default_model="alpha")) as client:
        refused = await client.post("/admin/reload")
        assert refused.status_code == 403
        assert "OODSERVE_API_KEY" in refused.json()["error"]["message"]


def hold(scorer, entered: asyncio.Event, release: asyncio.Event) -> None:
    """Hold each image submitted to ``scorer`` until ``release`` (``entered`` once one is)."""
    submit = scorer.submit

    async def held(image):
        entered.set()
        await release.wait()
        return await submit(image)

    scorer.submit = held


async def test_reload_swaps_in_a_new_version_after_the_requests_in_flight(
        two_models, repository, other_bundle):
    registry = two_models.app.state.models
    model = weakref.ref(registry.served("alpha").engine.bundle.model)
    image = noise_png(5)
    before = (await two_models.post("/predict", files={"image": ("x", image)},
                                    headers=AUTH)).json()
    wrong = {"Authorization": "Bearer not-the-key-0123456789"}
    assert (await two_models.post("/admin/reload", headers=wrong)).status_code == 401

    # A request held inside the old engine while the reload happens.
    entered, release = asyncio.Event(), asyncio.Event()
    hold(registry.served("alpha").engine.scorer, entered, release)
    in_flight = asyncio.create_task(two_models.post("/predict", files={"image": ("x", image)},
                                                    headers=AUTH))
    await entered.wait()
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
    reload = await two_models.post("/admin/reload", headers=AUTH)
    assert reload.status_code == 200
    report = reload.json()
    assert report["ok"] is True and report["default_model"] == "alpha"
    assert report["other_workers"] == "none"
    by_name = {m["name"]: m for m in report["models"]}
    assert by_name["alpha"] == {"name": "alpha", "result": "loaded", "version": "1.1.0",
                                "previous_version": "1.0.0", "message": None}
    assert by_name["beta"]["result"] == "unchanged"

    after = (await two_models.post("/predict", files={"image": ("x", image)},
                                   headers=AUTH)).json()
    assert after["model"] == {"name": "alpha", "version": "1.1.0"}
    assert after["energy"]["score"] != before["energy"]["score"]
    assert model() is not None  # still answering the request in flight
    release.set()
    finished = (await in_flight).json()
    assert finished["model"]["version"] == "1.0.0"
    assert finished["energy"] == before["energy"]
    for _ in range(200):  # the old engine stops once its last request has ended
        if model() is None:
            break
        await asyncio.sleep(0.02)
    assert model() is None, "the old model is still referenced"
    text = await metrics_text(two_models)
    assert metric(text, "oodserve_model_reloads_total", result="loaded") == 1
    assert metric(text, "oodserve_model_info", name="alpha", version="1.0.0",
                  architecture="resnet20", selected_block="layer2.2", device="cpu",
                  dtype="float32") == 0


async def test_a_bad_new_version_is_refused_and_the_old_keeps_serving(
        two_models, repository, other_bundle):
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
    corrupt(repository / "alpha-1.1")
    report = (await two_models.post("/admin/reload", headers=AUTH)).json()
    assert report["ok"] is False
    [alpha] = [m for m in report["models"] if m["name"] == "alpha"]
    assert alpha["result"] == "refused" and alpha["version"] == "1.0.0"
    assert "does not match" in alpha["message"]
    body = await predict_ok(two_models, noise_png(1))
    assert body["model"] == {"name": "alpha", "version": "1.0.0"}
    assert (await two_models.get("/readyz")).status_code == 200
    text = await metrics_text(two_models)
    assert metric(text, "oodserve_model_reloads_total", result="refused") == 1


async def test_new_names_appear_removed_ones_go_but_not_the_default(
        two_models, repository, tiny_bundle):
    copy_bundle(tiny_bundle, repository / "gamma", name="gamma", version="1.0.0")
    shutil.rmtree(repository / "beta")
    shutil.rmtree(repository / "alpha")
    report = (await two_models.post("/admin/reload", headers=AUTH)).json()
    results = {m["name"]: m["result"] for m in report["models"]}
    assert results == {"gamma": "loaded", "beta": "removed", "alpha": "refused"}
    assert report["ok"] is False
    assert (await predict(two_models, noise_png(1), model="beta")).status_code == 404
    for name in ("alpha", "gamma"):
        body = await predict_ok(two_models, noise_png(1), model=name)
        assert body["model"]["name"] == name


async def test_a_new_version_directory_leaves_readiness_alone(two_models, repository,
                                                               other_bundle):
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
    ready = await two_models.get("/readyz")
    assert ready.status_code == 200 and ready.json()["reason"] is None


def model_info(text: str, name: str, version: str) -> list[float]:
    """The values of ``oodserve_model_info`` for (name, version), whatever its other labels."""
    return [s.value for f in text_string_to_metric_families(text)
            if f.name == "oodserve_model_info" for s in f.samples
            if (s.labels["name"], s.labels["version"]) == (name, version)]


async def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_second_model_without_a_default_is_refused_at_reload(tmp_path, tiny_bundle,
                                                                    other_bundle):
    """Served, it would leave a repository that no process can start on (which model is
    the default?): refused, saying so."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_bundle(tiny_bundle, repo / "alpha", name="alpha", version="1.0.0")
    async with serve(settings(tiny_bundle, model_repository=repo)) as client:
        registry = client.app.state.models
        copy_bundle(other_bundle, repo / "beta", name="beta", version="1.0.0")
        [beta] = [e for e in await registry.reload() if e.name == "beta"]
        assert beta.result == "refused" and "OODSERVE_DEFAULT_MODEL" in beta.message
        assert registry.names() == ["alpha"]
        assert (await predict(client, noise_png(1), model="beta")).status_code == 404
    async with serve(settings(tiny_bundle, model_repository=repo,
                              default_model="alpha")) as client:
        assert client.app.state.models.names() == ["alpha", "beta"]


async def test_an_unreadable_manifest_in_a_served_directory_keeps_its_model(two_models,
                                                                           repository):
    (repository / "beta" / "manifest.json").write_text("{being rewritten")
    report = await two_models.app.state.models.reload()
    [beta] = [e for e in report if e.name == "beta"]
    assert beta.result == "refused" and beta.version == "2.0.0"
    assert "not a valid manifest" in beta.message
    body = await predict_ok(two_models, noise_png(1), model="beta")
    assert body["model"] == {"name": "beta", "version": "2.0.0"}


async def test_a_served_directory_broken_in_place_serves_on_not_an_older_version(
        two_models, repository, tiny_bundle):
    registry = two_models.app.state.models
    copy_bundle(tiny_bundle, repository / "alpha-0.9", name="alpha", version="0.9.0")
    assert [e.result for e in await registry.reload() if e.name == "alpha"] == ["unchanged"]
    manifest = repository / "alpha" / "manifest.json"
    fields = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**fields, "version": "1.0.1"}))  # changed in place...
    corrupt(repository / "alpha")  # ...and its weights not there yet
    [alpha] = [e for e in await registry.reload() if e.name == "alpha"]
    assert (alpha.result, alpha.version) == ("refused", "1.0.0")
    shutil.rmtree(repository / "alpha")
    shutil.copytree(repository / "alpha-0.9", repository / "alpha")
    manifest.write_text(json.dumps({**fields, "version": "1.0.1"}))  # now complete
    [alpha] = [e for e in await registry.reload() if e.name == "alpha"]
    assert (alpha.result, alpha.version) == ("loaded", "1.0.1")


async def test_a_half_copied_version_is_refused_then_loaded_once_complete(
        two_models, repository, other_bundle, monkeypatch):
    registry = two_models.app.state.models
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
    weights = repository / "alpha-1.1" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])  # still being copied
    [refused] = [e for e in await registry.reload() if e.name == "alpha"]
    assert refused.result == "refused" and refused.version == "1.0.0"
    assert [e.result for e in await registry.reload() if e.name == "alpha"] == ["refused"]
    text = await metrics_text(two_models)
    assert metric(text, "oodserve_model_reloads_total", result="refused") == 1  # not again

    built_in = []
    predictor = service.engine.Predictor.for_settings

    def record(*args, **kwargs):
        built_in.append(threading.current_thread())
        return predictor(*args, **kwargs)

    monkeypatch.setattr(service.engine.Predictor, "for_settings", record)
    weights.write_bytes(data)  # the copy is complete: its files changed, tried again
    [loaded] = [e for e in await registry.reload() if e.name == "alpha"]
    assert (loaded.result, loaded.version) == ("loaded", "1.1.0")
    assert built_in and threading.main_thread() not in built_in  # built off the event loop


async def test_a_bundle_replaced_in_place_at_its_version_stays_described(
        two_models, repository, other_bundle):
    """One (name, version), two engines one after the other: the old one's stop must not
    turn off the series the new one serves under."""
    registry = two_models.app.state.models
    old_model = weakref.ref(registry.served("beta").engine.bundle.model)
    before = await predict_ok(two_models, noise_png(1), model="beta")
    fields = json.loads((repository / "beta" / "manifest.json").read_text())
    shutil.rmtree(repository / "beta")
    copy_bundle(other_bundle, repository / "beta", name="beta", version="2.0.0")
    manifest = repository / "beta" / "manifest.json"
    replaced = json.loads(manifest.read_text())
    replaced["classes"] = [f"x{c}" for c in fields["classes"]]  # the manifest changed
    manifest.write_text(json.dumps(replaced))
    [beta] = [e for e in await registry.reload() if e.name == "beta"]
    assert (beta.result, beta.version) == ("loaded", "2.0.0")
    await wait_for(lambda: old_model() is None, "the old engine was not stopped")
    after = await predict_ok(two_models, noise_png(1), model="beta")
    assert after["label"] != before["label"]
    text = await metrics_text(two_models)
    assert model_info(text, "beta", "2.0.0") == [1]


async def test_a_warm_up_failure_is_refused_undescribed_and_tried_again(
        two_models, repository, other_bundle, monkeypatch):
    """A failure after the bundle's checks (out of memory, say) may pass: the next reload
    tries the same files again."""
    registry = two_models.app.state.models
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")

    async def failing(self):
        raise RuntimeError("CUDA out of memory (as it were)")

    with monkeypatch.context() as patch:
        patch.setattr(service.engine.LocalScorer, "warm_up", failing)
        [alpha] = [e for e in await registry.reload() if e.name == "alpha"]
    assert alpha.result == "refused" and "out of memory" in alpha.message
    text = await metrics_text(two_models)
    assert model_info(text, "alpha", "1.1.0") in ([], [0])
    assert model_info(text, "alpha", "1.0.0") == [1]
    [alpha] = [e for e in await registry.reload() if e.name == "alpha"]
    assert (alpha.result, alpha.version) == ("loaded", "1.1.0")
    text = await metrics_text(two_models)
    assert model_info(text, "alpha", "1.1.0") == [1]


async def test_a_late_signature_is_noticed(tmp_path, tiny_bundle, other_bundle):
    private, public = write_keys(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    sign_bundle(copy_bundle(tiny_bundle, repo / "alpha", name="alpha", version="1.0.0"),
                private)
    async with serve(settings(tiny_bundle, model_repository=repo,
                              bundle_public_key=public)) as client:
        registry = client.app.state.models
        new = copy_bundle(other_bundle, repo / "alpha-1.1", name="alpha", version="1.1.0")
        [alpha] = await registry.reload()
        assert alpha.result == "refused" and "not signed" in alpha.message
        sign_bundle(new, private)  # the signature arrives after the files
        [alpha] = await registry.reload()
        assert (alpha.result, alpha.version) == ("loaded", "1.1.0")


def held_warm_up(monkeypatch) -> tuple[asyncio.Event, asyncio.Event, list]:
    """Warm-ups wait for ``release`` (``entered`` once one does); the engines warmed."""
    entered, release, engines = asyncio.Event(), asyncio.Event(), []
    warm_up = service.engine.Engine.warm_up

    async def held(self):
        engines.append(self)
        entered.set()
        await release.wait()
        await warm_up(self)

    monkeypatch.setattr(service.engine.Engine, "warm_up", held)
    return entered, release, engines


async def test_a_reload_waits_for_the_start_warm_up(repository, tiny_bundle, other_bundle,
                                                    monkeypatch):
    entered, release, engines = held_warm_up(monkeypatch)
    async with serve(settings(tiny_bundle, model_repository=repository,
                              default_model="alpha"), wait_ready=False) as client:
        registry = client.app.state.models
        await entered.wait()
        copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
        reload = asyncio.create_task(registry.reload())
        await asyncio.sleep(0.2)
        assert not reload.done() and registry.served("alpha").engine is engines[0]
        release.set()
        [alpha] = [e for e in await reload if e.name == "alpha"]
        assert (alpha.result, alpha.version) == ("loaded", "1.1.0")
        assert engines[0].failure is None  # warmed up, not stopped under its warm-up
        assert (await client.get("/readyz")).status_code == 200


async def test_a_cancelled_reload_stops_its_new_engine(two_models, repository, other_bundle,
                                                       monkeypatch):
    registry = two_models.app.state.models
    entered, _, engines = held_warm_up(monkeypatch)
    copy_bundle(other_bundle, repository / "alpha-1.1", name="alpha", version="1.1.0")
    reload = asyncio.create_task(registry.reload())
    await entered.wait()
    reload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reload
    [new] = engines
    assert new.scorer.batcher.stopped and new.bundle.model is None  # stopped, let go
    assert registry.served("alpha").engine.model_ref.version == "1.0.0"


async def test_a_lease_ends_after_the_app_let_go_of_the_registry(two_models):
    """A request that ends during shutdown (the app's registry already gone) still gives
    its lease back."""
    registry = two_models.app.state.models
    served = registry.served("alpha")
    entered, release = asyncio.Event(), asyncio.Event()
    hold(served.engine.scorer, entered, release)
    request = asyncio.create_task(predict(two_models, noise_png(1)))
    await entered.wait()
    assert served.leases == 1
    two_models.app.state.models = None
    release.set()
    assert (await request).status_code == 200
    two_models.app.state.models = registry
    assert served.leases == 0


# -- reload of a running service -------------------------------------------------------------

def test_sighup_reloads_a_single_process_service(tmp_path, tiny_bundle, other_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    with running_service(tmp_path, OODSERVE_BUNDLE=bundle) as (proc, base, log):
        assert httpx.get(f"{base}/v1/model").json()["version"] == "0.0.0"
        replacement = copy_bundle(other_bundle, tmp_path / ".staging")
        shutil.rmtree(bundle)
        os.replace(replacement, bundle)  # published in place, atomically
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/v1/model").json()["version"] != "0.0.1":
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert httpx.get(f"{base}/readyz").status_code == 200
        # Without a key, the admin endpoint says how to turn it on.
        assert httpx.post(f"{base}/admin/reload").status_code == 403


CLIENTS = 32


async def _load(base: str, stop: asyncio.Event, seen: list[list[str]],
                failures: list[str]) -> None:
    """CLIENTS clients, each on its own connection, sending /predict until ``stop``."""
    image = noise_png(7)

    async def client(index: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=AUTH,
                                     limits=httpx.Limits(max_connections=1)) as http:
            while not stop.is_set():
                try:
                    response = await http.post("/predict", files={"image": ("x", image)})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                    continue
                seen[index].append(response.json()["model"]["version"])

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def test_reload_under_load_with_two_workers(tmp_path, tiny_bundle, other_bundle):
    repo = tmp_path / "repository"
    repo.mkdir()
    copy_bundle(tiny_bundle, repo / "alpha-1.0", name="alpha", version="1.0.0")
    seen: list[list[str]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []

    async def scenario(base: str, log: Path) -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(base, stop, seen, failures))

        async def until(condition, what: str) -> None:
            deadline = time.monotonic() + 120
            while not condition():
                assert time.monotonic() < deadline, f"{what}\n{log.read_text()}"
                assert not failures, failures[:3]
                assert not load.done(), load
                await asyncio.sleep(0.1)

        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=120) as admin:
            await until(lambda: all(len(s) >= 3 for s in seen), "the clients never got going")
            copy_bundle(other_bundle, repo / "alpha-1.1", name="alpha", version="1.1.0")
            report = (await admin.post("/admin/reload")).json()
            assert report["ok"] and report["other_workers"] == "signalled", report
            marks = [len(s) for s in seen]
            # Every client sees the new version (both workers have reloaded).
            await until(lambda: all(s[-1:] == ["1.1.0"] for s in seen), "no switch")
            switched = [len(s) for s in seen]

            copy_bundle(other_bundle, repo / "alpha-1.2", name="alpha", version="1.2.0")
            corrupt(repo / "alpha-1.2")
            report = (await admin.post("/admin/reload")).json()
            assert not report["ok"], report
            assert report["models"][0]["result"] == "refused", report
            await until(lambda: all(len(s) >= n + 3 for s, n in zip(seen, switched)),
                        "too few answers after the refused reload")
            # The other worker refuses it just after the answer: both refusals counted.
            deadline = time.monotonic() + 60
            while metric(text := (await admin.get("/metrics")).text,
                         "oodserve_model_reloads_total", result="refused") < 2:
                assert time.monotonic() < deadline, f"one refusal only\n{log.read_text()}"
                await asyncio.sleep(0.1)
        stop.set()
        await load
        assert all(len(s) > n for s, n in zip(seen, marks))
        assert metric(text, "oodserve_model_reloads_total", result="loaded") == 2
        assert metric(text, "oodserve_model_reloads_total", result="refused") == 2
        assert metric(text, "oodserve_predictions_total", model="alpha",
                      version="1.1.0") > 0

    with running_service(tmp_path, OODSERVE_MODEL_REPOSITORY=repo, OODSERVE_WORKERS=2,
                         OODSERVE_LAYOUT="replicated", OODSERVE_API_KEY=KEY) as (_, base, log):
        asyncio.run(scenario(base, log))
    assert failures == []
    for versions in seen:
        switch = versions.index("1.1.0")  # never back to the old one once switched
        assert set(versions[:switch]) == {"1.0.0"} and set(versions[switch:]) == {"1.1.0"}
    assert "1.2.0" not in {v for s in seen for v in s}
    assert load_bundle(repo / "alpha-1.1").manifest.version == "1.1.0"
