"""Dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request

from service.engine import Engine
from service.errors import ServiceError
from service.model_registry import ModelRegistry


def get_registry(request: Request) -> ModelRegistry:
    """The served models, or 503 while they are loading (or shut-down has begun)."""
    registry: ModelRegistry | None = getattr(request.app.state, "models", None)
    if registry is None:
        raise ServiceError(503, "not_ready", "the model is not loaded yet")
    return registry


async def readiness(request: Request) -> str | None:
    """Why the server is not ready to answer predictions (None: it is), for ``/readyz`` and
    the protocol's ``/v2/health/ready``: every served model must be."""
    registry: ModelRegistry | None = getattr(request.app.state, "models", None)
    return "loading the bundle" if registry is None else await registry.not_ready_reason()


async def engine_for(request: Request, name: str | None,
                     version: str | None = None) -> Engine:
    """The engine serving model ``name`` (None: the default model; at ``version``, when
    given), leased to the request until it ends; 404 for a model or version this server
    does not serve, 503 while none is loaded. The one place where a model name is resolved.
    Called by the routes themselves rather than declared as a dependency: as a dependency,
    a route without ``{version}`` in its path would take ``version`` from the query."""
    return get_registry(request).acquire(request.scope, name, version)
