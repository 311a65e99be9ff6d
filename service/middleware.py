"""Two pure ASGI middlewares: the request body limit, and request metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: they see the status of responses made
by the exception handlers (413, 422, ...), they add no task per request, and the body limit
can act on each chunk as it arrives.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

START_KEY = "oodserve.start"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes "
                              "(OODSERVE_MAX_UPLOAD_BYTES)")


class BodyLimitMiddleware:
    """Refuse a body over ``limit`` bytes: at once when ``Content-Length`` says so, and
    otherwise as soon as the bytes received so far pass it, so that nothing larger is ever
    read, let alone spooled. The refusal is raised from ``receive`` as an HTTPException,
    which FastAPI hands to the exception handlers: the client gets the usual JSON error and
    the request is counted under its route. (Starlette's RequestBodyLimitMiddleware would
    replace that response with plain text whenever Content-Length is over the limit.)
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.limit
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if too_large:
                raise BodyTooLarge(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class RequestMetricsMiddleware:
    """Count and time every HTTP request, labelled by route template and status, and stamp
    the start time into the scope for the predict routes' ``server_time_ms``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[START_KEY] = start = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            engine = getattr(scope["app"].state, "engine", None)
            if engine is not None:
                route = scope.get("route")
                # The template (/predict), never the raw path: label values stay bounded.
                endpoint = getattr(route, "path", None) or "unmatched"
                engine.metrics.requests.labels(endpoint, str(status)).inc()
                engine.metrics.request_duration.labels(endpoint).observe(
                    time.perf_counter() - start)
