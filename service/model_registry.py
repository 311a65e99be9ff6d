"""The models one process serves, by name, and their replacement without downtime.

Which bundles: ``OODSERVE_BUNDLE`` alone, or, with ``OODSERVE_MODEL_REPOSITORY``, every
immediate subdirectory of the repository that holds a ``manifest.json`` (names starting
with a dot are skipped: ``export_bundle`` stages its output there). A model is addressed by
its manifest's ``name``; when several directories hold one name, the highest ``version``
serves, versions compared as dotted integers (``1.10.0`` > ``1.9.2``), and the others are
logged as ignored. Versions of one name that are not all dotted integers, or two
directories at the same version, cannot be ordered: that name is a start error (at a
reload: refused, the served version stays).

Reload (:meth:`ModelRegistry.reload`; SIGHUP or ``POST /admin/reload``): the repository is
scanned again; each model whose directory or manifest (so its version or weights' sha256)
changed is loaded and checked by :func:`~training.bundle.load_bundle`, gets a new
:class:`~service.engine.Engine`, is warmed up, and only then replaces the old engine in the
table, in one assignment on the event loop, so that each request sees one or the other.
Requests hold a lease on the engine they were given (:meth:`ModelRegistry.acquire`, released
by :class:`LeaseMiddleware` when the request ends), so those in flight finish on the old
engine; it is stopped when its last lease ends, and the garbage collector's frozen
generation (:meth:`~service.engine.Engine.warm_up` freezes what is alive) is thawed and
collected so that its model's memory is released. A bundle that fails its checks or its
warm-up is refused: logged, reported, counted in ``oodserve_model_reloads_total``, and the
old version keeps serving. New names start serving; names gone from the repository stop,
except the default model, whose removal is refused (clients that name no model would
suddenly get another one, or none).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.engine import Engine
from service.errors import ServiceError
from service.metrics import ServiceMetrics
from service.schemas import ModelReload
from service.settings import Settings
from training.bundle import MANIFEST_FILE, Bundle, BundleError, Manifest, load_bundle

log = logging.getLogger("oodserve")

LEASES_KEY = "oodserve.leases"
# How long after its last lease ends a retired engine's memory is collected (see _stop).
UNWIND_S = 1.0
_DOTTED = re.compile(r"\d+(\.\d+)*")


def version_key(version: str) -> tuple[int, ...] | None:
    """``1.10.0`` -> ``(1, 10, 0)``; None for a version that is not dotted integers."""
    return tuple(int(p) for p in version.split(".")) if _DOTTED.fullmatch(version) else None


def _read_manifest(path: Path) -> Manifest:
    """The manifest alone (the full check is load_bundle's, on the chosen directories)."""
    try:
        return Manifest.model_validate_json((path / MANIFEST_FILE).read_bytes())
    except OSError as exc:
        raise BundleError(f"{path}: {MANIFEST_FILE} cannot be read ({exc.strerror or exc})")
    except ValidationError as exc:
        raise BundleError(f"{path}: {MANIFEST_FILE} is not a valid manifest "
                          f"({exc.error_count()} errors)") from None


@dataclass
class Scan:
    """The bundles a repository (or OODSERVE_BUNDLE) asks to serve."""

    chosen: dict[str, Path] = field(default_factory=dict)  # name -> directory
    manifests: dict[str, Manifest] = field(default_factory=dict)
    # (name, why it cannot be served); name None: a directory whose manifest is unreadable
    problems: list[tuple[str | None, str]] = field(default_factory=list)


def scan(settings: Settings) -> Scan:
    """Which directory serves each name. Raises :class:`BundleError` when there is nothing
    to scan (no repository directory); problems with single bundles are in the result."""
    result = Scan()
    if settings.model_repository is None:
        try:
            manifest = _read_manifest(settings.bundle)
        except BundleError as exc:
            result.problems.append((None, str(exc)))
        else:
            result.chosen[manifest.name] = settings.bundle
            result.manifests[manifest.name] = manifest
        return result
    repository = settings.model_repository
    if not repository.is_dir():
        raise BundleError(f"model repository not found: {repository} "
                          "(OODSERVE_MODEL_REPOSITORY)")
    candidates: dict[str, list[tuple[Path, Manifest]]] = {}
    for path in sorted(repository.iterdir()):
        if path.name.startswith(".") or not (path / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = _read_manifest(path)
        except BundleError as exc:
            result.problems.append((None, str(exc)))
            continue
        candidates.setdefault(manifest.name, []).append((path, manifest))
    for name, found in candidates.items():
        keys = [version_key(m.version) for _, m in found]
        if len(found) > 1 and None in keys:
            result.problems.append((name, (
                f"model {name!r}: cannot order its versions "
                f"{', '.join(repr(m.version) for _, m in found)} (dotted integers, e.g. "
                "1.2.0, are ordered)")))
            continue
        ranked = sorted(zip(keys, found), key=lambda kf: kf[0] or ())
        if len(ranked) > 1 and ranked[-1][0] == ranked[-2][0]:
            result.problems.append((name, (
                f"model {name!r}: version {ranked[-1][1][1].version} is in two directories "
                f"({ranked[-2][1][0].name}, {ranked[-1][1][0].name})")))
            continue
        path, manifest = ranked[-1][1]
        for _, (other, older) in ranked[:-1]:
            log.info("model %s: %s (version %s) ignored, %s (version %s) is newer", name,
                     other, older.version, path.name, manifest.version)
        result.chosen[name], result.manifests[name] = path, manifest
    if not candidates and not result.problems:
        empty = (f"{repository}: no bundle in it, no subdirectory holds {MANIFEST_FILE} "
                 "(OODSERVE_MODEL_REPOSITORY)")
        result.problems.append((None, empty))
    return result


def choose_default(settings: Settings, names: list[str]) -> str:
    """The model of requests that name none; :class:`BundleError` when it cannot be told."""
    if settings.default_model is not None:
        if settings.default_model not in names:
            raise BundleError(f"OODSERVE_DEFAULT_MODEL {settings.default_model!r} is not "
                              f"served; the models are {', '.join(sorted(names))}")
        return settings.default_model
    if len(names) == 1:
        return names[0]
    try:
        bundle_name = _read_manifest(settings.bundle).name
    except BundleError:
        bundle_name = None
    if bundle_name in names:
        return bundle_name
    raise BundleError(f"which model answers requests without ?model=? The repository "
                      f"serves {', '.join(sorted(names))}: set OODSERVE_DEFAULT_MODEL")


def serving_what(settings: Settings) -> str:
    """What a start-up error is about, with the setting to change."""
    if settings.model_repository is None:
        return f"the bundle {settings.bundle} (--bundle, OODSERVE_BUNDLE)"
    return (f"the model repository {settings.model_repository} (--model-repository, "
            "OODSERVE_MODEL_REPOSITORY)")


def check_models(settings: Settings) -> list[Bundle]:
    """Load and check every bundle to serve, as a start does; :class:`BundleError` (one
    message, every problem) when the service cannot start on them."""
    found = scan(settings)
    if settings.model_repository is None:
        return [load_bundle(settings.bundle, settings.bundle_public_key)]
    if found.problems:
        raise BundleError("; ".join(message for _, message in found.problems))
    bundles = [load_bundle(path, settings.bundle_public_key)
               for path in found.chosen.values()]
    choose_default(settings, list(found.chosen))
    return bundles


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Served:
    """An engine in service and the requests using it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.leases = 0
        self.retired = False


class ModelRegistry:
    """Name -> engine, for the routers (:mod:`service.routers.deps`)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics,
                 engine_address: Path | None = None):
        if settings.model_repository is not None and engine_address is not None:
            raise BundleError("OODSERVE_MODEL_REPOSITORY is not supported in the engine "
                              "layout (its engine process hosts one model): set "
                              "OODSERVE_LAYOUT=replicated, or serve one OODSERVE_BUNDLE")
        self.settings, self.metrics, self.engine_address = settings, metrics, engine_address
        self.models: dict[str, Served] = {}
        self.default = ""
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._warm_up: asyncio.Task | None = None
        # Bundles refused, by their files' identity, so that the next reload (each worker
        # reloads again on the SIGHUP its own POST /admin/reload sent on) does not load,
        # log and count the same bundle again, until its files change.
        self._refusals: dict[tuple, ModelReload] = {}

    def _engine(self, bundle: Bundle) -> Engine:
        return Engine(self.settings, bundle, self.engine_address,
                      self.metrics.for_model(bundle.manifest))

    async def start(self, bundles: list[Bundle]) -> None:
        """Serve ``bundles`` (checked already: :func:`check_models`); warm-up goes on in
        the background, and :meth:`not_ready_reason` says when it is done."""
        names = [b.manifest.name for b in bundles]
        self.default = choose_default(self.settings, names)
        for bundle in bundles:
            engine = self._engine(bundle)
            await engine.start()
            self.models[bundle.manifest.name] = Served(engine)
        engines = [s.engine for s in self.models.values()]
        self._warm_up = asyncio.create_task(self._warm_all(engines))
        if len(names) > 1:
            log.info("serving %d models: %s; default %s", len(names),
                     ", ".join(sorted(names)), self.default)

    @staticmethod
    async def _warm_all(engines: list[Engine]) -> None:
        for engine in engines:
            await engine.warm_up()

    def names(self) -> list[str]:
        return sorted(self.models)

    def served(self, name: str | None = None) -> Served:
        """Model ``name`` (default: the default model) as it serves now; 404 if unknown."""
        served = self.models.get(self.default if name is None else name)
        if served is None:
            raise ServiceError(404, "model_not_found", f"unknown model {name[:200]!r}; "
                               f"this server serves {', '.join(map(repr, self.names()))}")
        return served

    def acquire(self, scope: Scope, name: str | None = None,
                version: str | None = None) -> Engine:
        """The engine of model ``name`` (default: the default model), leased until the
        request of ``scope`` ends; 404 for a model, or a version, not served."""
        served = self.served(name)
        ref = served.engine.model_ref
        if version is not None and version != ref.version:
            raise ServiceError(404, "version_not_found", f"model {ref.name!r} has no version "
                               f"{version[:200]!r}; it is served at version {ref.version!r}")
        served.leases += 1
        scope.setdefault(LEASES_KEY, []).append(served)
        return served.engine

    def release(self, served: Served) -> None:
        served.leases -= 1
        if served.retired and served.leases == 0:
            self._in_background(self._stop(served))

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retire(self, served: Served) -> None:
        served.retired = True
        if served.leases == 0:
            self._in_background(self._stop(served))

    async def _stop(self, served: Served) -> None:
        engine, served.engine = served.engine, None
        await engine.stop()
        engine.metrics.describe_model(engine.scorer.device, engine.scorer.dtype_name,
                                      served=False)
        log.info("stopped %s %s: its last request has been answered", engine.manifest.name,
                 engine.manifest.version)
        del engine
        # Warm-up froze what was alive, the old model with it: thaw, collect the old
        # model's reference cycles, and freeze the rest again. Not at once: the request
        # whose lease ended last is still unwinding in its own task (its frames hold the
        # old batcher), and what is frozen again with it would never be collected.
        await asyncio.sleep(UNWIND_S)
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` should answer 503 (None: every model is ready)."""
        for name, served in sorted(self.models.items()):
            reason = await served.engine.not_ready_reason()
            if reason is not None:
                return reason if len(self.models) == 1 else f"model {name}: {reason}"
        return None

    async def reload(self) -> list[ModelReload]:
        """Scan again and swap in what changed (module docstring); one reload at a time."""
        async with self._reloading:
            if self.engine_address is not None:
                message = ("reloading is not supported in the engine layout (the engine "
                           "process hosts the model); restart the service")
                return [self._refused(self.default, message)]
            try:
                found = await asyncio.to_thread(scan, self.settings)
            except BundleError as exc:
                self.metrics.model_reloads.labels("refused").inc()
                log.error("reload refused: %s", exc)
                return [ModelReload(name=None, result="refused", version=None,
                                    message=str(exc))]
            report: list[ModelReload] = []
            failed = set()
            for name, message in found.problems:
                failed.add(name)
                report.append(self._refused(name, message))
            for name in sorted(found.chosen):
                report.append(await self._reload_one(name, found.chosen[name],
                                                     found.manifests[name]))
            if self.settings.model_repository is None:
                # One bundle: whatever its name now, it is the model and the default.
                loaded = [e.name for e in report if e.result == "loaded"]
                if loaded and loaded[0] != self.default:
                    self._retire(self.models.pop(self.default))
                    self.default = loaded[0]
                gone = []
            else:
                gone = sorted(set(self.models) - set(found.chosen) - failed)
            for name in gone:
                if name == self.default:
                    report.append(self._refused(name, "the default model cannot be removed "
                                                "(set OODSERVE_DEFAULT_MODEL to another and "
                                                "restart); it keeps serving"))
                    continue
                served = self.models.pop(name)
                previous = served.engine.model_ref.version
                self._retire(served)
                self.metrics.model_reloads.labels("removed").inc()
                log.info("model %s removed: no longer in the repository", name)
                report.append(ModelReload(name=name, result="removed", version=None,
                                          previous_version=previous))
            return report

    def _refused(self, name: str | None, message: str) -> ModelReload:
        self.metrics.model_reloads.labels("refused").inc()
        log.error("reload of %s refused: %s", name or "a bundle", message)
        current = self.models.get(name) if name else None
        version = current.engine.model_ref.version if current else None
        return ModelReload(name=name, result="refused", version=version,
                           previous_version=version, message=message)

    async def _reload_one(self, name: str, path: Path, manifest: Manifest) -> ModelReload:
        current = self.models.get(name)
        old = current.engine if current else None
        if old is not None and old.bundle.path == path and old.manifest == manifest:
            ref = old.model_ref
            return ModelReload(name=name, result="unchanged", version=ref.version,
                               previous_version=ref.version)
        identity = (name, path, manifest.model_dump_json(), _stat(path / MANIFEST_FILE),
                    _stat(path / manifest.weights.file))
        if identity in self._refusals:
            return self._refusals[identity]
        try:
            bundle = await asyncio.to_thread(load_bundle, path, self.settings.bundle_public_key)
            if self.settings.model_repository is not None and bundle.manifest.name != name:
                raise BundleError(f"{path}: its manifest changed while being loaded")
            engine = self._engine(bundle)
        except Exception as exc:  # noqa: BLE001 - a refused bundle must never stop serving
            refused = self._refused(name, str(exc) if isinstance(exc, BundleError)
                                    else f"{path}: {type(exc).__name__}: {exc}")
            self._refusals[identity] = refused
            return refused
        await engine.start()
        await engine.warm_up()
        if not engine.ready:
            await engine.stop()
            self._refusals[identity] = self._refused(name, f"{path}: {engine.failure}")
            return self._refusals[identity]
        self.models[name] = Served(engine)  # the swap: requests from now on get the new one
        self.metrics.model_reloads.labels("loaded").inc()
        if current is not None:
            self._retire(current)
        previous = old.model_ref.version if old else None
        log.info("model %s now serves version %s from %s%s", name, engine.manifest.version,
                 path, f" (was {previous})" if old else " (new)")
        return ModelReload(name=name, result="loaded", version=engine.manifest.version,
                           previous_version=previous)

    async def stop(self) -> None:
        if self._warm_up is not None:
            self._warm_up.cancel()
        served, self.models = list(self.models.values()), {}
        for s in served:
            if s.engine is not None:
                await s.engine.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LeaseMiddleware:
    """Ends the leases a request took on engines (:meth:`ModelRegistry.acquire`) once the
    request is over, however it ended."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            leases = scope.pop(LEASES_KEY, ())
            if leases:
                registry: ModelRegistry = scope["app"].state.models
                for served in leases:
                    registry.release(served)
