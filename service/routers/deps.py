"""Dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request

from service.engine import Engine
from service.errors import ServiceError


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:  # the bundle is still loading, or shut-down has begun
        raise ServiceError(503, "not_ready", "the model is not loaded yet")
    return engine
