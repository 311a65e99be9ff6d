"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.errors import ServiceError


async def get_engine(request: Request) -> Engine:
    """The loaded engine, or 503. ``async`` although it never awaits: FastAPI runs a plain
    ``def`` dependency in its thread pool, a thread hop per request (under load, one
    thread per request in flight, all fighting for the GIL), for what is an attribute read."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:  # the bundle is still loading, or shut-down has begun
        raise ServiceError(503, "not_ready", "the model is not loaded yet")
    return engine


# A route parameter ``engine: EngineDep`` gets the loaded engine (or the request gets 503).
EngineDep = Annotated[Engine, Depends(get_engine)]


async def readiness(request: Request) -> str | None:
    """Why the server is not ready to answer predictions (None: it is), for ``/readyz`` and
    the protocol's ``/v2/health/ready``."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    return "loading the bundle" if engine is None else await engine.not_ready_reason()


async def engine_for(request: Request, name: str, version: str | None = None) -> Engine:
    """The engine serving model ``name`` (at ``version``, when given), 404 for a model or
    version this server does not serve, 503 while none is loaded. The one place where a
    model name is resolved, so that serving several bundles changes only this function.
    Called by the routes themselves rather than declared as a dependency: as a dependency,
    a route without ``{version}`` in its path would take ``version`` from the query."""
    engine = await get_engine(request)
    served = engine.model_ref
    if name != served.name:
        raise ServiceError(404, "model_not_found", f"unknown model {name[:200]!r}; this "
                           f"server serves {served.name!r}")
    if version is not None and version != served.version:
        raise ServiceError(404, "version_not_found", f"model {served.name!r} has no version "
                           f"{version[:200]!r}; it is served at version {served.version!r}")
    return engine
