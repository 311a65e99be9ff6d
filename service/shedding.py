"""Overload shedding from the request's head: a scoring request that admission would refuse
is answered 503 by the HTTP protocol, without going through the application.

Under overload nearly every request is refused, and a refusal made by the application costs
what any request costs before its images: the middlewares, routing, the multipart parse and
the parameters. With clients that retry at once, the event loop then spends its time
refusing, and each step of an admitted request (its body, its decoding, its batch, its
answer) waits behind a whole round of refusals, so that the few admitted requests waited
seconds (``bench/attack.py``, docs/benchmarks.md). So when a request's head is complete
(:mod:`service.http_protocol`), :class:`Shedder` asks the target model's admission whether
one more image would be refused (a request holds at least one). If so, the protocol writes
admission's own 503 ``overloaded``, ``Retry-After`` and message at once, without a task or
the application, counted in ``oodserve_requests_total`` under the route's template like any
answer. If not, and the body came with the head (as a small upload does), that place is
taken now and handed to the application with the request (:func:`head_reservation`), whose
admission counts it as one of the request's images: a check that reserved nothing would let
every request whose head arrives in one turn of the event loop through on the same free
places, to be refused by the application at full cost. A request whose body is still on its
way takes no place, so that slow uploads cannot hold the queue. While a refused request's
body is read and dropped, it must keep arriving (``OODSERVE_READ_TIMEOUT_S`` between reads),
else the connection is closed.

Only requests whose refusal is certain and cheap are shed here; everything else goes to the
application, which still admits every request it scores:

- ``POST /predict`` and ``/predict/batch`` (the model from the ``model`` query parameter, or
  the default one when the query names none; a model named in the form alone cannot be seen
  from the head, so with several models served such a request goes to the application), and
  the Open Inference Protocol's ``infer`` (the model and version from the path, the error in
  the protocol's shape);
- with ``OODSERVE_API_KEY`` set, only a request carrying the key: one without it gets its 401;
- only on a connection that stays open after it (not ``Connection: close``, HTTP/1.0 or the
  connection's last allowed request), checked by the protocol: closing a connection while
  the body still arrives would reset it;
- a body of a declared ``Content-Length`` no larger than ``OODSERVE_MAX_DRAIN_BYTES`` and
  ``OODSERVE_MAX_UPLOAD_BYTES`` (a larger one gets the application's 413, not a 503 to
  retry), and no ``Expect: 100-continue``: the parser then reads and drops the body as it
  arrives, on a connection that stays open, so that every client reads the answer (chunked
  or larger bodies, and clients waiting to be told to send, are the application's: it drains
  or closes as for any early answer, :class:`service.middleware.EarlyAnswerMiddleware`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import parse_qs

from fastapi import Request
from prometheus_client import Counter, Histogram
from starlette.types import Scope

from service.admission import Refusal, Reservation
from service.errors import error_bytes
from service.metrics import ServiceMetrics
from service.security import authorized
from service.settings import Settings

if TYPE_CHECKING:  # the registry's middleware gives back the head's place (a cycle at run time)
    from service.model_registry import ModelRegistry

# The key under which the app's lifespan hands its shedder to the server (uvicorn keeps the
# lifespan's state and gives it to each connection's protocol).
STATE_KEY = "oodserve.shedder"
# The scope key of the place a request's head took.
HEAD_KEY = "oodserve.head_reservation"

PREDICT_PATHS = ("/predict", "/predict/batch")


def _target(scope: Scope) -> tuple[str, str | None, str | None] | None:
    """(route template, model or None for the default, version or None) of a scoring
    request, or None when the head does not tell."""
    path = scope["path"]
    if path in PREDICT_PATHS:
        query = scope["query_string"]
        models = (parse_qs(query.decode("latin-1"), keep_blank_values=True).get("model")
                  if query else None)
        if models is None:
            return path, None, None
        return (path, models[0], None) if len(models) == 1 else None
    parts = path.split("/")
    if parts[:3] != ["", "v2", "models"] or parts[-1] != "infer":
        return None
    if len(parts) == 5:
        return "/v2/models/{name}/infer", parts[3], None
    if len(parts) == 7 and parts[4] == "versions":
        return "/v2/models/{name}/versions/{version}/infer", parts[3], parts[5]
    return None


def head_reservation(request: Request) -> Reservation | None:
    """The place the request's head took, for its admission (which then holds it)."""
    return request.scope.get(HEAD_KEY)


def close_head_reservation(scope: Scope) -> None:
    """Give back the head's place of a request that ended before its admission used it."""
    if (head := scope.pop(HEAD_KEY, None)) is not None:
        head.close()


class Shedder:
    """What :mod:`service.http_protocol` asks about each request once its head is in."""

    CACHED = 256  # answers kept, by route and refusal (a refusal's text has few variants)

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics):
        self.api_key = settings.api_key
        # A body larger than this gets the app's 413, not a 503 to retry.
        self.max_body = min(settings.max_drain_bytes, settings.max_upload_bytes)
        self.registry = registry
        self.metrics = metrics
        self._answers: dict[tuple[str, Refusal], Answer] = {}

    def __call__(self, scope: Scope, body_complete: bool) -> Answer | None:
        """The request's 503, to write now, or None (the application's). A request
        that passes takes its first place now if its body is already in (``body_complete``:
        it came with the head); one still uploading takes none, so that slow uploads never
        hold places."""
        if scope["method"] != "POST" or (target := self._target(scope)) is None:
            return None
        route, name, version = target
        served = self.registry.models.get(self.registry.default if name is None else name)
        if served is None or (version is not None
                              and version != served.engine.model_ref.version):
            return None  # the application's 404 (or 422)
        admission = served.engine.admission
        if (refused := admission.refusal(1)) is not None:
            return self._answer(route, refused)
        if body_complete:
            scope[HEAD_KEY] = admission.admit(1)
        return None

    def _target(self, scope: Scope) -> tuple[str, str | None, str | None] | None:
        target = _target(scope)
        if target is None or (target[1] is None and len(self.registry.models) > 1):
            return None
        length, authorization = None, None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() and length is None else -1
            elif name == b"authorization" and authorization is None:  # the first, as the app
                authorization = value
            elif name in (b"expect", b"transfer-encoding"):
                return None
        if length is None or not 0 <= length <= self.max_body:
            return None
        return target if authorized(self.api_key, authorization or b"") else None

    def _answer(self, route: str, refused: Refusal) -> Answer:
        """The answer to a refusal, built once: most refusals repeat the same few texts."""
        if (answer := self._answers.get((route, refused))) is not None:
            return answer
        error = refused.error()
        # The response the app's error handlers would make, written by the protocol.
        answer = Answer(error.status,
                        error_bytes(route.startswith("/v2/"), error.status, error.code,
                                    error.message, error.headers),
                        self.metrics.requests.labels(route, str(error.status)),
                        self.metrics.request_duration.labels(route))
        if len(self._answers) >= self.CACHED:
            self._answers.clear()
        self._answers[(route, refused)] = answer
        return answer


class Answer(NamedTuple):
    """A refusal as the protocol writes it (:mod:`service.http_protocol`): its status, its
    own headers and body (the server's, such as ``date``, go before them), and the
    request's series in the metrics."""

    status: int
    rest: bytes
    requests: Counter
    duration: Histogram

    def count(self, started: float) -> None:
        self.requests.inc()
        self.duration.observe(time.perf_counter() - started)
