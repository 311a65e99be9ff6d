"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

FastAPI and Starlette raise their own exceptions (validation errors, the body size limit,
the multipart parser's limits, unknown routes); the handlers here translate them into that
shape and the right status, so a client never has to parse two formats.

The Open Inference Protocol routes (``/v2``, :mod:`service.routers.v2`) answer in that
protocol's shape instead, ``{"error": "<message>"}``, which its clients (tritonclient, KServe's)
read: every handler here picks the shape by the request's path, so an error raised by shared
code (the body limit, the API key, overload, an image the decoder refuses) comes out right
on either API.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.middleware import NOSNIFF, BodyTooLarge
from service.schemas import ErrorResponse

log = logging.getLogger("oodserve")


class ServiceError(Exception):
    """A request the service refuses: HTTP status, stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class InternalError(ServiceError):
    """A failure of the service itself (500), under an id that is also in the log."""

    def __init__(self, what: str, error_id: str):
        super().__init__(500, "internal_error", f"{what}; error id {error_id} (it is in the "
                         "service's log)")
        self.error_id = error_id


def new_error_id() -> str:
    return uuid.uuid4().hex[:16]


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None,
                   error_id: str | None = None) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message,
                                                   "id": error_id}})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status,
                        headers=headers)


def is_oip(request: Request) -> bool:
    """Whether the request is one of the Open Inference Protocol's (its paths start /v2)."""
    path = request.scope.get("path", "")
    return path == "/v2" or path.startswith("/v2/")


def _respond(request: Request, status: int, code: str, message: str,
             headers: dict[str, str] | None = None,
             error_id: str | None = None) -> JSONResponse:
    return error_for(is_oip(request), status, code, message, headers, error_id)


def error_for(oip: bool, status: int, code: str, message: str,
              headers: dict[str, str] | None = None,
              error_id: str | None = None) -> JSONResponse:
    """The error in the shape of the API it is for, the Open Inference Protocol's or ours
    (the id of a 500 is in its message either way)."""
    if oip:
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(status, code, message, headers, error_id)


def error_bytes(oip: bool, status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> bytes:
    """:func:`error_for`'s response as the HTTP protocol writes it when it answers without the
    app (:mod:`service.http_protocol`, :mod:`service.shedding`): its headers, nosniff
    included as the app's middleware adds it, and its body; the status line and the
    server's own headers go before them."""
    response = error_for(oip, status, code, message, headers)
    return (b"".join(name + b": " + value + b"\r\n"
                     for name, value in [*response.raw_headers, NOSNIFF])
            + b"\r\n" + response.body)


# For the OpenAPI schema of the predict routes.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "malformed multipart body, or more form fields than allowed",
        401: "missing or wrong API key (only when OODSERVE_API_KEY is set)",
        404: "no model of that name is served (`model`)",
        413: "body, image or batch too large",
        415: "not a supported image, or a body that is not multipart/form-data",
        422: "missing field, invalid parameter, or an image that cannot be decoded",
        500: "the service failed (e.g. a forward pass); the error has an id, in the log too",
        503: "queue full; retry after the number of seconds in Retry-After",
    }.items()
}


def _code(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return _respond(request, exc.status, exc.code, exc.message, exc.headers,
                    getattr(exc, "error_id", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _respond(request, 422, "invalid_request", "; ".join(problems))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, BodyTooLarge):
        return _respond(request, 413, "body_too_large", exc.detail)
    if exc.status_code == 400 and str(exc.detail).startswith("Too many files"):
        # Starlette's multipart parser stopped at FastAPI's form_limits["max_files"].
        limit = request.app.state.settings.max_batch_images
        return _respond(request, 413, "too_many_images", f"at most {limit} images per "
                        "request (OODSERVE_MAX_BATCH_IMAGES)")
    if exc.status_code == 400 and str(exc.detail).startswith("Too many fields"):
        # ... and at form_limits["max_fields"]: no predict route takes any text field.
        return _respond(request, 400, "too_many_fields", f"{exc.detail} The predict "
                        "routes take file fields only (image, or images)")
    return _respond(request, exc.status_code, _code(exc.status_code), str(exc.detail),
                    getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    error_id = new_error_id()
    # The route template, not the raw path: nothing a client sent goes into the log.
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log.error("unhandled error on %s (error id %s)", route, error_id, exc_info=exc)
    return _respond(request, 500, "internal_error", f"internal server error; error id "
                    f"{error_id} (it is in the service's log)", error_id=error_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
