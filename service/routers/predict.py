"""``POST /predict`` (one image) and ``POST /predict/batch`` (several, one result each).

Per-request parameters are query parameters (:class:`~service.schemas.PredictParams`): the
body is the multipart upload alone. Responses are serialised once, straight from the
pydantic models, instead of being validated a second time by FastAPI.

The query parameters are validated by :func:`predict_params` with pydantic directly rather
than declared as ``Annotated[PredictParams, Query()]``: for a query model, FastAPI inspects
every field's annotation again on each request, which took about a quarter of this route's
own time (cProfile, forward pass stubbed out), for a query string that is nearly always
empty. They are documented from the same model (:data:`QUERY_PARAMETERS`), errors are the
same 422s, and the OpenAPI-driven tests (schemathesis) exercise them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from service.engine import Engine
from service.errors import ERROR_RESPONSES, ServiceError
from service.middleware import START_KEY
from service.routers.deps import get_engine
from service.schemas import (
    BatchItem,
    BatchResponse,
    ErrorBody,
    PredictParams,
    PredictResponse,
)
from service.security import PredictRoute
from service.thresholds import Policy, resolve_policy

# PredictRoute: the API key and the body's content type are checked before it is parsed.
router = APIRouter(tags=["predict"], route_class=PredictRoute)


NO_PARAMS = PredictParams()

# PredictParams' fields as OpenAPI query parameters, the way FastAPI writes a query model.
QUERY_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": schema,
     "description": schema.get("description")}
    for name, schema in PredictParams.model_json_schema()["properties"].items()
]


async def predict_params(request: Request) -> PredictParams:
    """The request's query parameters; 422 (``invalid_request``) for a bad or unknown one.
    A repeated parameter counts with its last value, as FastAPI reads scalar parameters."""
    if not request.query_params:
        return NO_PARAMS
    try:
        return PredictParams.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]) from None


def _policy(engine: Engine, params: PredictParams) -> Policy:
    if (params.energy_threshold, params.featurenorm_threshold, params.tpr,
            params.decision) == (None, None, None, None):
        return engine.default_policy
    return resolve_policy(engine.manifest, energy_threshold=params.energy_threshold,
                          featurenorm_threshold=params.featurenorm_threshold,
                          tpr=params.tpr, decision=params.decision)


def _top_k(engine: Engine, params: PredictParams) -> int:
    return min(params.top_k or engine.settings.top_k, len(engine.manifest.classes))


def _elapsed_ms(request: Request) -> float:
    return (time.perf_counter() - request.scope[START_KEY]) * 1000.0


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
             openapi_extra={"parameters": QUERY_PARAMETERS},
             summary="Classify one image and say whether it is out of distribution")
async def predict(
    request: Request,
    image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP or GIF")],
    params: Annotated[PredictParams, Depends(predict_params)],
    engine: Annotated[Engine, Depends(get_engine)],
) -> Response:
    prediction = await engine.predict(await image.read(), _policy(engine, params),
                                      _top_k(engine, params))
    return _json(PredictResponse(**dict(prediction), model=engine.model_ref,
                                 server_time_ms=_elapsed_ms(request)))


@router.post("/predict/batch", response_model=BatchResponse, responses=ERROR_RESPONSES,
             openapi_extra={"parameters": QUERY_PARAMETERS},
             summary="Classify several images; a bad image gets an error entry of its own")
async def predict_batch(
    request: Request,
    images: Annotated[list[UploadFile], File(description="one part per image, in order")],
    params: Annotated[PredictParams, Depends(predict_params)],
    engine: Annotated[Engine, Depends(get_engine)],
) -> Response:
    # More than OODSERVE_MAX_BATCH_IMAGES parts never get here: the multipart parser stops
    # at FastAPI's form_limits (see create_app) and the error handlers answer 413.
    policy, top_k = _policy(engine, params), _top_k(engine, params)

    async def one(index: int, upload: UploadFile) -> BatchItem:
        try:
            prediction = await engine.predict(await upload.read(), policy, top_k)
        except ServiceError as exc:
            if exc.status >= 500:  # the server, not the image: fail the whole request
                raise
            return BatchItem(index=index, filename=upload.filename,
                             error=ErrorBody(code=exc.code, message=exc.message))
        return BatchItem(index=index, filename=upload.filename, prediction=prediction)

    results = await asyncio.gather(*(one(i, f) for i, f in enumerate(images)))
    return _json(BatchResponse(model=engine.model_ref, results=list(results),
                               server_time_ms=_elapsed_ms(request)))
