"""``POST /predict`` (one image) and ``POST /predict/batch`` (several, one result each).

Per-request parameters (:class:`~service.schemas.PredictParams`) are query parameters or
text fields of the multipart form, one parameter set with the same validation: a parameter
given both ways must have the same value, and any other form field (an unknown text field, a
file part named otherwise than ``image``/``images``, a second ``image`` on ``/predict``) is a
422, never ignored. Responses are serialised once, straight from the pydantic models,
instead of being validated a second time by FastAPI.

The parameters are validated by :func:`params_dependency` with pydantic directly rather
than declared as ``Annotated[PredictParams, Query()]``: for a query model, FastAPI inspects
every field's annotation again on each request, which took about a quarter of this route's
own time (cProfile, forward pass stubbed out), for a query string that is nearly always
empty. They are documented from the same model (:data:`QUERY_PARAMETERS`), errors are the
same 422s, and the OpenAPI-driven tests (schemathesis) exercise them.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from service.decoding import RequestTooLarge
from service.engine import Engine
from service.errors import ERROR_RESPONSES, ServiceError
from service.middleware import START_KEY
from service.routers.deps import engine_for
from service.schemas import (
    BatchItem,
    BatchResponse,
    ErrorBody,
    PredictParams,
    PredictResponse,
)
from service.security import PredictRoute
from service.shedding import head_reservation

# PredictRoute: the API key and the body's content type are checked before it is parsed.
router = APIRouter(tags=["predict"], route_class=PredictRoute)


NO_PARAMS = PredictParams()

# PredictParams' fields as OpenAPI query parameters, the way FastAPI writes a query model.
QUERY_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": schema,
     "description": schema.get("description")}
    for name, schema in PredictParams.model_json_schema()["properties"].items()
]


def _invalid(errors: list[tuple[tuple, str]]) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg,
                                    "input": None} for loc, msg in errors])


def params_dependency(file_field: str, single: bool):
    """The dependency that reads a predict route's parameters: the query string and the
    form's text fields (FastAPI has already parsed the body, so ``request.form()`` is the
    cached form), with ``file_field`` the route's only file field."""

    async def predict_params(request: Request) -> PredictParams:
        """422 (``invalid_request``) for a bad or unknown parameter, a parameter given twice
        with different values (in the query and the form, or twice in the form), a file
        part under another name, or (``single``) more than one file. A parameter repeated
        in the query string counts with its last value, as FastAPI reads scalar
        parameters."""
        query = dict(request.query_params)
        form = await request.form()  # parsed already, with the limits: FastAPI's cache
        if not form:
            if not query:
                return NO_PARAMS
            return _validate(query, {}, [])
        fields: dict[str, str] = {}
        problems: list[tuple[tuple, str]] = []
        files = texts = 0
        for name, value in form.multi_items():
            if name == file_field:
                files += not isinstance(value, str)
                texts += isinstance(value, str)
            elif not isinstance(value, str):
                problems.append((("form", name), (f"unexpected file field; the image goes "
                                                  f"in `{file_field}`")))
            elif name in fields and fields[name] != value:
                problems.append((("form", name), "given twice with different values"))
            elif name in query and query[name] != value:
                problems.append((("form", name), ("given in the query and the form with "
                                                  "different values")))
            else:
                fields[name] = value
        if not files:  # said here, as FastAPI would, so that it is not hidden by the rest
            problems.append((("body", file_field), ("Expected UploadFile, received a text "
                                                    "field") if texts else "Field required"))
        if single and files > 1:
            problems.append((("form", file_field), (f"{files} files; /predict takes one "
                                                    "image, send several to /predict/batch")))
        return _validate(query, fields, problems)

    return predict_params


def _validate(query: dict[str, str], fields: dict[str, str],
              problems: list[tuple[tuple, str]]) -> PredictParams:
    try:
        params = PredictParams.model_validate({**query, **fields})
    except ValidationError as exc:
        problems += [((("form" if e["loc"] and e["loc"][0] in fields else "query"),
                       *e["loc"]), e["msg"]) for e in exc.errors()]
        params = None
    if problems:
        raise _invalid(problems)
    return params


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
    params: Annotated[PredictParams, Depends(params_dependency("image", single=True))],
) -> Response:
    engine = await engine_for(request, params.model)
    prediction = await engine.predict(await image.read(), engine.policy_for(params),
                                      _top_k(engine, params), head=head_reservation(request))
    return _json(PredictResponse(**dict(prediction), model=engine.model_ref,
                                 server_time_ms=_elapsed_ms(request)))


@router.post("/predict/batch", response_model=BatchResponse, responses=ERROR_RESPONSES,
             openapi_extra={"parameters": QUERY_PARAMETERS},
             summary="Classify several images; a bad image gets an error entry of its own")
async def predict_batch(
    request: Request,
    images: Annotated[list[UploadFile], File(description="one part per image, in order")],
    params: Annotated[PredictParams, Depends(params_dependency("images", single=False))],
) -> Response:
    engine = await engine_for(request, params.model)
    # More than OODSERVE_MAX_BATCH_IMAGES parts never get here: the multipart parser stops
    # at FastAPI's form_limits (see create_app) and the error handlers answer 413.
    policy, top_k = engine.policy_for(params), _top_k(engine, params)
    # Admitted as a whole, or refused (413 over the pixel budget by the headers, 503) before
    # any image is decoded; one pixel budget and pool share for them all.
    datas = [await upload.read() for upload in images]
    decoding = engine.request_decoding(datas, head_reservation(request))

    async def one(index: int, upload: UploadFile, data: bytes) -> BatchItem:
        try:
            prediction = await engine.predict(data, policy, top_k, decoding)
        except ServiceError as exc:
            # The server (5xx: a failed pass, overload), not the image, or the request as a
            # whole (its pixel budget): fail the whole request.
            if exc.status >= 500 or isinstance(exc, RequestTooLarge):
                raise
            return BatchItem(index=index, filename=upload.filename,
                             error=ErrorBody(code=exc.code, message=exc.message))
        return BatchItem(index=index, filename=upload.filename, prediction=prediction)

    results = await decoding.gather([one(i, f, d) for i, (f, d) in enumerate(zip(images, datas))])
    return _json(BatchResponse(model=engine.model_ref, results=list(results),
                               server_time_ms=_elapsed_ms(request)))
