"""Pure ASGI middlewares: the request body's limits (size, read timeout), early answers
that clients can read, and request metrics (with the response headers every answer gets).

Pure ASGI rather than Starlette's BaseHTTPMiddleware: they see the status of responses made
by the exception handlers (413, 422, ...), they add no task per request, and the body limit
can act on each chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

START_KEY = "oodserve.start"
NOSNIFF = (b"x-content-type-options", b"nosniff")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes "
                              "(OODSERVE_MAX_UPLOAD_BYTES)")


class BodyReadTimeout(HTTPException):
    def __init__(self, timeout_s: float):
        super().__init__(408, f"no part of the request body arrived for {timeout_s:g} s "
                              "(OODSERVE_READ_TIMEOUT_S)", headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuse a body over ``limit`` bytes: at once when ``Content-Length`` says so, and
    otherwise as soon as the bytes received so far pass it, so that nothing larger is ever
    read, let alone spooled. The refusal is raised from ``receive`` as an HTTPException,
    which FastAPI hands to the exception handlers: the client gets the usual JSON error and
    the request is counted under its route. (Starlette's RequestBodyLimitMiddleware would
    replace that response with plain text whenever Content-Length is over the limit.)
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout_s: float = 30.0):
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.limit
        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if too_large:
                raise BodyTooLarge(self.limit)
            if body_done:  # nothing more to read: no timeout (a wait for the disconnect)
                return await receive()
            try:
                # A client that stops sending (less body than its Content-Length said)
                # would otherwise hold its connection and this request forever.
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise BodyReadTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, limited_receive, send)


class EarlyAnswerMiddleware:
    """Let every client read an answer given before its request body was read (401 without
    the key, 413 from Content-Length, 415, ...).

    Closing a connection while the client's body is still arriving makes the kernel reset
    it, and a client that sends its whole body before reading (Python's http.client, hence
    urllib and requests) then sees ConnectionReset or BrokenPipe instead of the status. So
    the answer is held back while the rest of the body is read and dropped, up to
    ``max_drain_bytes`` and ``timeout_s`` between chunks; a body that would take more (by
    its Content-Length, or as it arrives) is not drained, and the answer says
    ``Connection: close``. A client that waits for ``100 Continue`` has sent nothing yet:
    it gets the answer at once, and the connection is closed (it will not send the body).
    A 408 (the client stopped sending) is never drained.
    """

    def __init__(self, app: ASGIApp, max_drain_bytes: int, timeout_s: float):
        self.app, self.max_drain_bytes, self.timeout_s = app, max_drain_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        expected = int(declared) if declared.isdigit() else None
        body_done = not (expected or "chunked" in headers.get("transfer-encoding", ""))
        waits_for_continue = headers.get("expect", "").lower() == "100-continue"
        received = 0
        held: Message | None = None

        async def tracked_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = body_done or not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def drain() -> bool:
            """Read and drop the rest of the body; whether all of it was read."""
            nonlocal received
            if waits_for_continue and received == 0:
                return False
            if expected is not None and expected > self.max_drain_bytes:
                return False
            start = received
            while not body_done:
                if received - start >= self.max_drain_bytes:
                    return False
                try:
                    await asyncio.wait_for(tracked_receive(), self.timeout_s)
                except TimeoutError:
                    return False
            return True

        async def answering_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and not body_done:
                held = message  # sent once the body is dealt with
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                closing = any(name.lower() == b"connection"
                              for name, _ in start.get("headers", []))
                if not closing and (start["status"] == 408 or not await drain()):
                    start = {**start, "headers": [*start.get("headers", []),
                                                  (b"connection", b"close")]}
                await send(start)
            await send(message)

        await self.app(scope, tracked_receive, answering_send)


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
                # Filenames are echoed in JSON: no browser may sniff it as something else.
                message = {**message, "headers": [*message.get("headers", []), NOSNIFF]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics = scope["app"].state.metrics
            route = scope.get("route")
            # The template (/predict), never the raw path: label values stay bounded.
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
