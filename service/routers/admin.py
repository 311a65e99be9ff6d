"""``POST /admin/reload``: load what changed in the model repository (or OODSERVE_BUNDLE),
without a restart and without failing a request (:mod:`service.model_registry`).

It needs the API key as a bearer token, and is refused (403) when no key is configured:
an open endpoint that makes the service read and load files is not something to expose by
default, and SIGHUP remains for those who run without a key. The answer reports this
process's reload, done before answering; with several workers, the supervisor is then
asked to reload the others, which happens after the answer (``other_workers``).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import ServiceError
from service.reload import ask_supervisor, summary
from service.routers.deps import get_registry
from service.schemas import ErrorResponse, ReloadReport
from service.security import authorize

log = logging.getLogger("oodserve")
router = APIRouter(tags=["admin"])

RESPONSES = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        401: "missing or wrong API key",
        403: "no API key is configured (OODSERVE_API_KEY): the endpoint is off",
        503: "the models are not loaded yet",
    }.items()
}


@router.post("/admin/reload", response_model=ReloadReport, responses=RESPONSES,
             summary="Load new or changed bundles, warm them up and swap them in; requests "
                     "in flight finish on the old ones")
async def reload(request: Request) -> Response:
    if request.app.state.settings.api_key is None:
        raise ServiceError(403, "admin_disabled", "POST /admin/reload needs an API key: set "
                           "OODSERVE_API_KEY and send `Authorization: Bearer <key>`; without "
                           "one, reload with SIGHUP to the service's main process")
    authorize(request)
    registry = get_registry(request)
    report = await registry.reload()
    log.info("POST /admin/reload: %s", summary(report))
    body = ReloadReport(ok=all(e.result != "refused" for e in report),
                        default_model=registry.default, models=report,
                        other_workers=ask_supervisor())
    return Response(body.model_dump_json(), media_type="application/json")
