"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

FastAPI and Starlette raise their own exceptions (validation errors, the body size limit,
the multipart parser's limits, unknown routes); the handlers here translate them into that
shape and the right status, so a client never has to parse two formats.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.middleware import BodyTooLarge
from service.schemas import ErrorResponse

log = logging.getLogger("oodserve")


class ServiceError(Exception):
    """A request the service refuses: HTTP status, stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# For the OpenAPI schema of the predict routes.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "malformed multipart body",
        413: "body, image or batch too large",
        415: "not a supported image",
        422: "missing field, invalid parameter, or an image that cannot be decoded",
        503: "queue full; retry after the number of seconds in Retry-After",
    }.items()
}


def _code(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(422, "invalid_request", "; ".join(problems))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc, BodyTooLarge):
        return error_response(413, "body_too_large", exc.detail)
    if exc.status_code == 400 and str(exc.detail).startswith("Too many files"):
        # Starlette's multipart parser stopped at FastAPI's form_limits["max_files"].
        limit = request.app.state.settings.max_batch_images
        return error_response(413, "too_many_images", f"at most {limit} images per request "
                              "(OODSERVE_MAX_BATCH_IMAGES)")
    return error_response(exc.status_code, _code(exc.status_code), str(exc.detail),
                          getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
