"""The FastAPI application: ``create_app(settings)`` builds it, its lifespan runs the model.

Start-up loads and checks the bundle (a bad one stops the start with
:class:`training.bundle.BundleError`, logged with the reason), starts the batcher and warms
the model up in the background; ``/readyz`` turns 200 once that is done, and 503 again if
the bundle on disk stops being the one served (:mod:`service.bundle_check`).

Shut-down (SIGTERM, SIGINT): uvicorn first stops accepting connections and waits for the
requests in flight to be answered, while the batcher keeps running them; only then does the
lifespan below end, stopping the batcher with nothing left in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Security

from service import http_protocol
from service.docs_ui import install_docs
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import (
    BodyLimitMiddleware,
    EarlyAnswerMiddleware,
    RequestMetricsMiddleware,
)
from service.model_registry import LeaseMiddleware, ModelRegistry, check_models
from service.reload import reload_on_sighup
from service.routers import admin, health, metrics, predict, v2
from service.security import BEARER
from service.settings import Settings
from service.shedding import STATE_KEY, Shedder
from training.bundle import Bundle, BundleError

log = logging.getLogger("oodserve")

# Internal, not a setting: the engine process's socket, for the workers of the engine layout.
ENGINE_ADDRESS_ENV = "OODSERVE_ENGINE_ADDRESS"

DESCRIPTION = """
Image classification with two out-of-distribution (OOD) detectors computed from the same
forward pass: **energy** `-logsumexp(logits)` (lower = more in-distribution; OOD when
`energy > threshold`) and **FeatureNorm** of one block (higher = more in-distribution; OOD
when `featurenorm < threshold`). A score equal to its threshold is in-distribution.

Thresholds default to the bundle's calibration; override them per request with the query
parameters `energy_threshold`, `featurenorm_threshold` or `tpr`, and choose how the two
decisions combine with `decision`. Every response says which thresholds it used and where
they came from. Errors are `{"error": {"code": ..., "message": ...}}`.
"""


def create_app(settings: Settings | None = None, bundle: Bundle | list[Bundle] | None = None,
               engine_address: Path | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment). The bundles to
    serve may be given already loaded (``python -m service`` checks them before starting
    uvicorn: :func:`~service.model_registry.check_models`). With
    ``engine_address`` (default: :data:`ENGINE_ADDRESS_ENV`, which :mod:`service.workers`
    sets for its workers in the engine layout), images are scored by the engine process
    listening there instead of a model in this process."""
    settings = settings or Settings()
    if engine_address is None and os.environ.get(ENGINE_ADDRESS_ENV):
        engine_address = Path(os.environ[ENGINE_ADDRESS_ENV])

    # Handed over to the registry, not kept here: a model reloaded away must not stay
    # referenced by the app (its memory would never be released).
    preloaded = [bundle] if isinstance(bundle, Bundle) else list(bundle or ())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            registry = ModelRegistry(settings, app.state.metrics, engine_address)
            loaded = preloaded[:] or await asyncio.to_thread(check_models, settings)
            preloaded.clear()
        except BundleError as exc:
            if settings.model_repository is None:
                log.error("cannot serve the bundle %s (OODSERVE_BUNDLE): %s",
                          settings.bundle, exc)
            else:
                log.error("cannot serve the model repository %s (OODSERVE_MODEL_REPOSITORY): "
                          "%s", settings.model_repository, exc)
            raise
        await registry.start(loaded)
        del loaded
        app.state.models = registry
        hangup = reload_on_sighup(registry)
        try:
            # uvicorn hands the lifespan's state to each connection: the shedder answers
            # what admission would refuse from the request's head (service/shedding.py).
            yield {STATE_KEY: Shedder(settings, registry, app.state.metrics)}
        finally:
            hangup()
            app.state.models = None
            await registry.stop()
            app.state.metrics.mark_process_dead()

    app = FastAPI(title="oodserve", version="1", description=DESCRIPTION, lifespan=lifespan,
                  form_limits={"max_files": settings.max_batch_images, "max_fields": 16},
                  docs_url=None, redoc_url=None)  # /docs from local files: install_docs
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.models = None
    http_protocol.configure(settings)  # the server's head limits, in this process
    # python-multipart logs parser warnings that quote the body: not in our logs.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes,
                       read_timeout_s=settings.read_timeout_s)
    app.add_middleware(EarlyAnswerMiddleware, max_drain_bytes=settings.max_drain_bytes,
                       timeout_s=settings.read_timeout_s)
    app.add_middleware(LeaseMiddleware)
    app.add_middleware(RequestMetricsMiddleware)  # added last: outermost, sees every status
    # With a key, the predict routes declare the bearer scheme in the OpenAPI schema (the
    # check itself is PredictRoute's, before the body is read).
    app.include_router(predict.router,
                       dependencies=[Security(BEARER)] if settings.api_key else None)
    # /admin/reload needs the key (403 while none is configured): declared with one, so
    # that /docs can send it; the check is the route's own.
    app.include_router(admin.router,
                       dependencies=[Security(BEARER)] if settings.api_key else None)
    # The Open Inference Protocol's routes check the key themselves (infer only).
    for router in (health.router, metrics.router, v2.router):
        app.include_router(router)
    install_docs(app)
    return app
