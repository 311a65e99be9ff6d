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
