"""The optional API key of the predict endpoints, and the checks that run before a predict
request's body is read.

With ``OODSERVE_API_KEY`` set, ``POST /predict`` and ``POST /predict/batch`` need
``Authorization: Bearer <key>``; everything else (health, readiness, metrics, the model
summary, the OpenAPI document) stays open, for probes and Prometheus. The key is compared
in constant time: both sides are hashed first, so :func:`hmac.compare_digest` compares two
32-byte digests and not even the key's length leaks through timing.

:class:`PredictRoute` runs these checks when the route has matched but before FastAPI reads
and parses the multipart body, so a client without the key, or one sending something that
is not multipart/form-data, costs no parsing at all (FastAPI's own dependencies run only
after the body has been parsed).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import SecretStr

from service.errors import ServiceError

# Documents the scheme in the OpenAPI schema (added to the predict routes by create_app
# when a key is set); auto_error=False because PredictRoute does the actual check.
BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="OODSERVE_API_KEY, as `Authorization: Bearer <key>`")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def authorized(key: SecretStr | None, authorization: bytes) -> bool:
    """Whether an ``Authorization`` header value (as sent) carries ``key`` (None: no key
    is needed)."""
    if key is None:
        return True
    scheme, _, token = authorization.partition(b" ")
    given = _digest(token.strip())
    expected = _digest(key.get_secret_value().encode("ascii"))
    return hmac.compare_digest(given, expected) and scheme.lower() == b"bearer"


def authorize(request: Request) -> None:
    """Raise 401 unless the request carries the configured API key (if any)."""
    # Header values are decoded as latin-1, so encoding back gives the bytes that were sent.
    if not authorized(request.app.state.settings.api_key,
                      request.headers.get("authorization", "").encode("latin-1")):
        raise ServiceError(401, "unauthorized", "missing or wrong API key: send "
                           "`Authorization: Bearer <key>` (OODSERVE_API_KEY)",
                           headers={"WWW-Authenticate": 'Bearer realm="oodserve"'})


def require_multipart(request: Request) -> None:
    """415 for a body that is not multipart/form-data (a JPEG posted raw, JSON, a URL-encoded
    form). A request without any body goes on, to be told which field is missing."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers)
    if media_type or has_body:
        raise ServiceError(415, "not_multipart", "the body must be multipart/form-data "
                           "with the image in a file field (curl -F image=@photo.jpg)")


class PredictRoute(APIRoute):
    """A route whose requests pass :func:`authorize` and :func:`require_multipart` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            authorize(request)
            require_multipart(request)
            return await handler(request)

        return checked
