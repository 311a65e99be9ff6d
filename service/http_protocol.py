"""uvicorn's httptools protocol with limits on the request head, and JSON for its own errors.

uvicorn bounds nothing before the app sees a request: with httptools (the parser it runs
here) a 200 MB header block was read and answered 200, and a client that sends its headers
a byte at a time holds its connection forever. This subclass (``http=`` of uvicorn's
config, set by ``python -m service``):

- answers 431 ``headers_too_large`` once the request line and headers pass
  ``OODSERVE_MAX_HEADER_BYTES`` (counted on the bytes received before the head is complete,
  so at most one read beyond the limit is ever buffered) or hold more than
  ``OODSERVE_MAX_HEADERS`` fields;
- answers 408 ``request_timeout`` when a request's head is not complete
  ``OODSERVE_READ_TIMEOUT_S`` after its first byte (or after the connection opened);
- answers a request the parser cannot read with 400 ``bad_request`` in the service's JSON
  error shape instead of uvicorn's plain text.

Each of these closes the connection. So does the ``OODSERVE_MAX_REQUESTS_PER_CONNECTION``-th
request on one keep-alive connection: its response says ``Connection: close`` and the
connection ends once it is sent. A keep-alive client otherwise stays with the worker that
accepted its connection for good; when a worker is replaced, its clients reconnect to the
surviving ones and would all stay there while the new worker idles. Reconnecting now and
then lets the kernel's ``SO_REUSEPORT`` spread them over all the workers again
(:mod:`service.workers`).

A scoring request that admission would refuse is answered 503 from its head, without the
app, by the shedder the app's lifespan hands over (:mod:`service.shedding`). Requests are
started once the read that completed their head is parsed, so that the shedder knows whether
the body came with it; the body of a refused request must then keep arriving
(``OODSERVE_READ_TIMEOUT_S`` between reads) while it is dropped, or the connection is closed.

The limits are class attributes, set by
:func:`configure` from the settings when the app is created (in each worker, before it
accepts a connection). The body's own timeout is the app's (:mod:`service.middleware`).
"""

from __future__ import annotations

import logging
import time

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from service.errors import error_bytes
from service.shedding import STATE_KEY, Answer

log = logging.getLogger("uvicorn.error")


class _HeadersTooLarge(Exception):
    pass


def configure(settings) -> None:
    """Take the limits from the service's settings."""
    HttpProtocol.max_header_bytes = settings.max_header_bytes
    HttpProtocol.max_headers = settings.max_headers
    HttpProtocol.read_timeout_s = settings.read_timeout_s
    HttpProtocol.max_requests_per_connection = settings.max_requests_per_connection


class HttpProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    max_headers = 100
    read_timeout_s = 30.0
    max_requests_per_connection = 1000  # 0: no limit

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._requests = 0  # on this connection
        self._in_head = True  # waiting for (the rest of) a request's head
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer = None
        # Requests whose heads this read completed, started once the read is parsed (then
        # it is known whether each one's body came with it); None outside a read.
        self._starting: list | None = None
        self._dropping = None  # the refused request whose body is being read and dropped
        self._drop_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        self._stop_dropping()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408, "request_timeout", "the request's headers did not arrive "
                         f"within {self.read_timeout_s:g} s (OODSERVE_READ_TIMEOUT_S)")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body, and close the connection."""
        if self.transport.is_closing():
            return
        content = self._response_head(status)
        content.append(error_bytes(False, status, code, message, {"connection": "close"}))
        self.transport.write(b"".join(content))
        self.transport.close()

    def _response_head(self, status: int) -> list[bytes]:
        """The status line and the server's own headers (``date``), as uvicorn writes them;
        the response's headers and body follow."""
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        return content

    def _too_large(self) -> None:
        self._refuse(431, "headers_too_large", f"the request line and headers are over "
                     f"{self.max_header_bytes} bytes (OODSERVE_MAX_HEADER_BYTES) or "
                     f"{self.max_headers} fields (OODSERVE_MAX_HEADERS)")

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            self._start_head_timer()
        if self._dropping is not None:
            self._start_drop_timer()
        self._unset_keepalive_if_required()
        self._starting = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn does
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                self._too_large()
                return
            log.warning("Invalid HTTP request received.")
            self._refuse(400, "bad_request", "invalid HTTP request")
            return
        finally:
            self._start_waiting()
        if self._in_head and self._head_bytes > self.max_header_bytes:
            self._too_large()

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            raise _HeadersTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        """Start answering a request (in order: pipelined ones wait for the one before);
        during a read, once the read is parsed. The app's task would not run before then
        anyway."""
        if self._starting is not None:
            self._starting.append((cycle, app))
            return
        self._starting = [(cycle, app)]
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Start the requests waiting to be, in order. A loop, not a recursion: a refusal is
        answered at once, and answering it starts the next pipelined request."""
        try:
            while self._starting and not self.transport.is_closing():
                self._start(*self._starting.pop(0))
        finally:
            self._starting = None

    def _start(self, cycle, app) -> None:
        self._unset_keepalive_if_required()  # a request being answered: not idle
        self._requests += 1
        if 0 < self.max_requests_per_connection <= self._requests:
            cycle.keep_alive = False  # answered with Connection: close, then closed
        # A refusal from the head is sent before the body is read, so only on a connection
        # that stays open, where the parser reads and drops the body: closing one while the
        # body still arrives would reset it (the app's early answers drain it first).
        shed = self.app_state.get(STATE_KEY) if cycle.keep_alive else None
        answer = shed(cycle.scope, body_complete=not cycle.more_body) if shed else None
        if answer is None:
            super()._start_asgi_task(cycle, app)
            return
        if cycle.more_body:
            self._dropping = cycle
            self._start_drop_timer()
        self._write_answer(cycle, answer)

    def _write_answer(self, cycle, answer: Answer) -> None:
        """Write a refusal at once, as the request's whole response: no task, no app. In
        order, since a request is started only once the one before it is answered."""
        started = time.perf_counter()
        content = self._response_head(answer.status)
        content.append(answer.rest)
        self.transport.write(b"".join(content))
        cycle.response_started = cycle.response_complete = True
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                                    cycle.scope["method"],
                                    get_path_with_query_string(cycle.scope),
                                    cycle.scope["http_version"], answer.status)
        answer.count(started)
        self.on_response_complete()  # the next pipelined request, or the keep-alive timer
        if self._dropping is cycle:
            self._unset_keepalive_if_required()  # the drop timer's, until the body is in

    def _start_drop_timer(self) -> None:
        """The refused request's body must keep coming (OODSERVE_READ_TIMEOUT_S between
        reads), or the connection is closed: its answer is sent, and no app reads it."""
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        self._drop_timer = self.loop.call_later(self.read_timeout_s, self.transport.close)

    def _stop_dropping(self) -> None:
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        self._dropping = self._drop_timer = None

    def on_message_complete(self) -> None:
        dropped = self._dropping is not None and self.cycle is self._dropping
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0
        if dropped:
            self._stop_dropping()
            # Its answer has been sent, and reading the body cancelled the keep-alive
            # timer that followed it: an idle connection closes as after any answer.
            if (self.cycle.response_complete and not self.pipeline
                    and self.timeout_keep_alive_task is None):
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)
