"""``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.engine import Engine
from service.routers.deps import get_engine

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(engine: Annotated[Engine, Depends(get_engine)]) -> Response:
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
