"""The models one process serves, by name, and their replacement without downtime.

Which bundles: ``OODSERVE_BUNDLE`` alone, or, with ``OODSERVE_MODEL_REPOSITORY``, every
immediate subdirectory of the repository that holds a ``manifest.json`` (names starting
with a dot are skipped: ``export_bundle`` stages its output there). A model is addressed by
its manifest's ``name``; when several directories hold one name, the highest ``version``
that loads serves, versions compared as dotted integers (``1.10.0`` > ``1.9.2``): one that
fails its checks (half copied, corrupt, unsigned) is logged and the next one down serves.
Versions of one name that are not all dotted integers, or two directories at the same
version, cannot be ordered. At a start, a name with no version that loads (or that cannot
be ordered) and a directory whose manifest cannot be read are logged and not served: the
start goes on without them, as a running process reloading the same repository would, and
fails only when the default model cannot be served (:func:`check_models`). Not alike: a
version that passes those checks but fails to warm up is refused by a reload, while a start
serves it, not ready, since it falls back only on the checks.

Reload (:meth:`ModelRegistry.reload`; SIGHUP or ``POST /admin/reload``): the repository is
scanned again; for each name, the versions above the one serving now whose directory or
manifest (so its version or weights' sha256) changed are tried, highest first, until one
loads: checked by :func:`~training.bundle.load_bundle`, given a new
:class:`~service.engine.Engine` (built off the event loop), warmed up, and only then
swapped in for the old engine, in one assignment on the event loop, so that each request
sees one or the other. (A version below the one serving is tried only once the serving
one's directory is gone: what a start would serve.) Requests hold a lease on the engine
they were given (:meth:`ModelRegistry.acquire`, released by :class:`LeaseMiddleware` when
the request ends), so those in flight finish on the old engine; it is stopped when its last
lease ends, and lets go of its model, graphs and buffers, which reference counting frees. A
bundle that fails its checks or its warm-up is refused: logged, reported, counted in
``oodserve_model_reloads_total``, and the old version keeps serving; so does a model whose
served directory's manifest cannot be read (it may be being rewritten). New names start
serving, unless the default model could then not be told or would change (a process
starting on the repository would fail, or serve another default); names gone from the
repository stop, except the default model, whose removal is refused (clients that name no
model would suddenly get another one, or none).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.engine import Engine
from service.errors import ServiceError
from service.metrics import ServiceMetrics
from service.schemas import ModelReload
from service.settings import Settings
from service.shedding import close_head_reservation
from training.bundle import MANIFEST_FILE, Bundle, BundleError, Manifest, load_bundle
from training.signing import SIGNATURE_FILE

log = logging.getLogger("oodserve")

LEASES_KEY = "oodserve.leases"
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


class Problem(NamedTuple):
    """Why a name, or a directory, cannot be served."""

    name: str | None  # None: a directory whose manifest is unreadable (its model unknown)
    message: str
    path: Path | None = None  # that directory


@dataclass
class Scan:
    """The bundles a repository (or OODSERVE_BUNDLE) asks to serve."""

    # name -> its (directory, manifest)s, highest version first: the first one that loads
    # serves (the others are there to fall back on when it does not)
    versions: dict[str, list[tuple[Path, Manifest]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def scan(settings: Settings) -> Scan:
    """Which directory serves each name. Raises :class:`BundleError` when there is nothing
    to scan (no repository directory); problems with single bundles are in the result."""
    result = Scan()
    if settings.model_repository is None:
        try:
            manifest = _read_manifest(settings.bundle)
        except BundleError as exc:
            result.problems.append(Problem(None, str(exc), settings.bundle))
        else:
            result.versions[manifest.name] = [(settings.bundle, manifest)]
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
            result.problems.append(Problem(None, str(exc), path))
            continue
        candidates.setdefault(manifest.name, []).append((path, manifest))
    for name, found in candidates.items():
        keys = [version_key(m.version) for _, m in found]
        if len(found) > 1 and None in keys:
            result.problems.append(Problem(name, (
                f"model {name!r}: cannot order its versions "
                f"{', '.join(repr(m.version) for _, m in found)} (dotted integers, e.g. "
                "1.2.0, are ordered)")))
            continue
        ranked = sorted(zip(keys, found), key=lambda kf: kf[0] or ())
        if len(ranked) > 1 and ranked[-1][0] == ranked[-2][0]:
            result.problems.append(Problem(name, (
                f"model {name!r}: version {ranked[-1][1][1].version} is in two directories "
                f"({ranked[-2][1][0].name}, {ranked[-1][1][0].name})")))
            continue
        result.versions[name] = [found for _, found in reversed(ranked)]
    if not candidates and not result.problems:
        empty = (f"{repository}: no bundle in it, no subdirectory holds {MANIFEST_FILE} "
                 "(OODSERVE_MODEL_REPOSITORY)")
        result.problems.append(Problem(None, empty))
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
    """Load and check the bundles to serve, as a start does: per name, the highest version
    that loads (the ones above it are logged as refused). A name with no version that loads,
    and a directory whose manifest cannot be read, are logged and not served, as a reload
    would leave them; :class:`BundleError` (one message, every problem) when no model, or
    not the default model, can be served."""
    if settings.model_repository is None:
        return [load_bundle(settings.bundle, settings.bundle_public_key)]
    found = scan(settings)
    refused = [problem.message for problem in found.problems]
    bundles = []
    for name, versions in found.versions.items():
        for path, manifest in versions:
            try:
                bundle = load_bundle(path, settings.bundle_public_key)
                if bundle.manifest.name != name:
                    raise BundleError(f"{path}: its manifest changed while being loaded")
            except BundleError as exc:
                refused.append(str(exc))
                continue
            if (path, manifest) != versions[0]:
                log.warning("model %s: serving version %s, the newest that loads",
                            name, manifest.version)
            bundles.append(bundle)
            break
        else:
            refused.append(f"model {name!r}: no version of it loads, it is not served")
    try:
        if not bundles:
            raise BundleError("no model can be served")
        choose_default(settings, [b.manifest.name for b in bundles])
    except BundleError as exc:
        raise BundleError("; ".join([str(exc), *refused])) from None
    for message in refused:
        log.error("not served: %s", message)
    return bundles


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    """What changes with a file: its contents (size, mtime), its replacement (inode), and
    its permissions or owner (ctime: a bundle refused as unreadable is tried again once
    they are fixed)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _info(engine: Engine) -> tuple[str, ...]:
    """The labels of ``engine``'s ``oodserve_model_info`` series."""
    m = engine.manifest
    return (m.name, m.version, m.architecture.name, m.featurenorm.selected_block,
            engine.scorer.device, engine.scorer.dtype_name)


class Served:
    """An engine in service and the requests using it."""

    def __init__(self, engine: Engine):
        self.engine: Engine | None = engine
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
        # Bundles refused by their checks, by their files' identity, so that the next reload
        # (each worker reloads again on the SIGHUP its own POST /admin/reload sent on) does
        # not load, log and count the same bundle again, until its files change. Failures
        # after the checks (building, warming up: out of memory, say) may pass: not kept.
        self._refusals: dict[tuple, ModelReload] = {}

    def _engine(self, bundle: Bundle) -> Engine:
        return Engine(self.settings, bundle, self.engine_address,
                      self.metrics.for_model(bundle.manifest))

    def _describe(self, engine: Engine, served: bool) -> None:
        """``oodserve_model_info`` is 1 for what is served now: not 0 while another engine
        (a bundle replaced in place at the same version) serves the same series."""
        if not served and any(s.engine is not None and _info(s.engine) == _info(engine)
                              for s in self.models.values()):
            return
        engine.metrics.describe_model(engine.scorer.device, engine.scorer.dtype_name,
                                      served=served)

    async def start(self, bundles: list[Bundle]) -> None:
        """Serve ``bundles`` (checked already: :func:`check_models`); warm-up goes on in
        the background, and :meth:`not_ready_reason` says when it is done."""
        names = [b.manifest.name for b in bundles]
        self.default = choose_default(self.settings, names)
        for bundle in bundles:
            engine = self._engine(bundle)
            await engine.start()
            self.models[bundle.manifest.name] = Served(engine)
            self._describe(engine, True)
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
        # The registry with the lease: the app's may be gone by the time the request ends.
        scope.setdefault(LEASES_KEY, []).append((self, served))
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
        if engine is None:
            return
        self._describe(engine, False)
        # The engine lets go of its model and buffers itself (Engine.stop): they are freed
        # at once, whoever still holds the engine, with no collection of the frozen
        # generation that warm-up left (which would un-share a forked worker's memory).
        await engine.stop()
        log.info("stopped %s %s: its last request has been answered", engine.manifest.name,
                 engine.manifest.version)

    async def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` should answer 503 (None: every model is ready). The engines are
        taken first: a reload may swap one while another is asked; a reason given by an
        engine swapped out meanwhile does not count."""
        engines = sorted((name, s.engine) for name, s in self.models.items()
                         if s.engine is not None)
        for name, engine in engines:
            reason = await engine.not_ready_reason()
            current = self.models.get(name)
            if reason is not None and current is not None and current.engine is engine:
                return reason if len(self.models) == 1 else f"model {name}: {reason}"
        return None

    async def reload(self) -> list[ModelReload]:
        """Scan again and swap in what changed (module docstring); one reload at a time."""
        async with self._reloading:
            if self.engine_address is not None:
                message = ("reloading is not supported in the engine layout (the engine "
                           "process hosts the model); restart the service")
                return [self._refused(self.default, message)]
            if self._warm_up is not None:
                # The start's warm-up first: its engines are not to be swapped out (and
                # stopped) while they warm up. Waited for, not cancelled with this reload.
                await asyncio.wait([self._warm_up])
            try:
                found = await asyncio.to_thread(scan, self.settings)
            except BundleError as exc:
                self.metrics.model_reloads.labels("refused").inc()
                log.error("reload refused: %s", exc)
                return [ModelReload(name=None, result="refused", version=None,
                                    message=str(exc))]
            report: list[ModelReload] = []
            # A problem in the directory a model is served from is that model's: it keeps
            # serving (the directory may be being rewritten), and is not reloaded.
            served_from = {s.engine.bundle.path: name for name, s in self.models.items()}
            failed = set()
            for problem in found.problems:
                name = problem.name or served_from.get(problem.path)
                failed.add(name)
                report.append(self._refused(name, problem.message))
            for name in sorted(set(found.versions) - failed):
                report.extend(await self._reload_name(name, found.versions[name]))
            if self.settings.model_repository is None:
                # One bundle: whatever its name now, it is the model and the default.
                loaded = [e.name for e in report if e.result == "loaded"]
                if loaded and loaded[0] != self.default:
                    self._retire(self.models.pop(self.default))
                    self.default = loaded[0]
                gone = []
            else:
                gone = sorted(set(self.models) - set(found.versions) - failed)
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

    def _default_problem(self, name: str) -> str | None:
        """Why new model ``name`` may not be served: with it, the default model could not be
        told, or would change (as it would for a process starting now)."""
        try:
            default = choose_default(self.settings, [*self.models, name])
        except BundleError as exc:
            return f"{exc} (a process starting now would not start either)"
        if default != self.default:
            return (f"serving it would make it the default model instead of "
                    f"{self.default!r}; set OODSERVE_DEFAULT_MODEL")
        return None

    async def _reload_name(self, name: str,
                           versions: list[tuple[Path, Manifest]]) -> list[ModelReload]:
        """Serve the highest of ``versions`` that loads, as a start would, but never one
        below the version serving now while its directory is there."""
        current = self.models.get(name)
        old = current.engine if current else None
        if old is None and self.settings.model_repository is not None:
            problem = self._default_problem(name)
            if problem is not None:
                return [self._refused(name, f"model {name!r} is not served: {problem}")]
        refused: list[ModelReload] = []
        for path, manifest in versions:
            if old is not None and old.bundle.path == path and old.manifest == manifest:
                ref = old.model_ref
                return refused or [ModelReload(name=name, result="unchanged",
                                               version=ref.version,
                                               previous_version=ref.version)]
            engine = await self._load(name, path, manifest)
            if isinstance(engine, ModelReload):
                refused.append(engine)
                if old is not None and path == old.bundle.path:
                    break  # the serving directory, changed in place: it serves on
                continue
            self.models[name] = Served(engine)  # the swap: requests from now on get it
            self._describe(engine, True)
            self.metrics.model_reloads.labels("loaded").inc()
            if current is not None:
                self._retire(current)
            previous = old.model_ref.version if old else None
            log.info("model %s now serves version %s from %s%s", name,
                     engine.manifest.version, path, f" (was {previous})" if old else " (new)")
            return [*refused, ModelReload(name=name, result="loaded",
                                          version=engine.manifest.version,
                                          previous_version=previous)]
        return refused

    async def _load(self, name: str, path: Path, manifest: Manifest) -> Engine | ModelReload:
        """A new engine for the bundle in ``path``, warmed up; or why it is refused."""
        key = self.settings.bundle_public_key
        identity = (name, path, manifest.model_dump_json(), _stat(path / MANIFEST_FILE),
                    _stat(path / manifest.weights.file), _stat(path / SIGNATURE_FILE),
                    key, key and _stat(key))
        if identity in self._refusals:
            return self._refusals[identity]
        try:
            bundle = await asyncio.to_thread(load_bundle, path, key)
            if self.settings.model_repository is not None and bundle.manifest.name != name:
                raise BundleError(f"{path}: its manifest changed while being loaded")
        except BundleError as exc:
            self._refusals[identity] = self._refused(name, str(exc))
            return self._refusals[identity]
        except Exception as exc:  # noqa: BLE001 - a refused bundle must never stop serving
            return self._refused(name, f"{path}: {type(exc).__name__}: {exc}")
        engine = None
        try:
            # Off the event loop: building moves the model to its device and allocates
            # the batch buffers, while requests go on being served.
            engine = await asyncio.to_thread(self._engine, bundle)
            await engine.start()
            await engine.warm_up()
            failure = None if engine.ready else engine.failure
        except Exception as exc:  # noqa: BLE001 - as above
            failure = f"{type(exc).__name__}: {exc}"
        except BaseException:  # cancelled: the new engine must not be left running
            if engine is not None:
                await engine.stop()
            raise
        if failure is None:
            return engine
        if engine is not None:
            await engine.stop()
        return self._refused(name, f"{path}: {failure}")

    async def stop(self) -> None:
        if self._warm_up is not None:
            self._warm_up.cancel()
        served, self.models = list(self.models.values()), {}
        for s in served:
            engine, s.engine = s.engine, None
            if engine is not None:
                await engine.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LeaseMiddleware:
    """Ends the leases a request took on engines (:meth:`ModelRegistry.acquire`) once the
    request is over, however it ended, and gives back the queue place its head took
    (:mod:`service.shedding`) if nothing used it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            close_head_reservation(scope)
            for registry, served in scope.pop(LEASES_KEY, ()):
                registry.release(served)
