"""Admission: per-worker caps on what requests may hold, so a burst of large bodies or of
responses is refused early rather than exhausting the worker's memory.

`ORP_MAX_INFLIGHT_BYTES` bounds the request-body bytes held by the requests and WebSocket turns
in progress (a request holds several times its body while it runs: the bytes, the parsed
JSON, the translated chat request); `ORP_MAX_CONCURRENT_RESPONSES` bounds the responses running
at once. Past either: 503 `server_overloaded` with `Retry-After`. A request alone is always
admitted, whatever its size, so a cap below the body limit cannot lock a request out forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from orp_proxy.errors import SERVER_ERROR, ApiError

RETRY_AFTER_SECONDS = 1
# Requests that run a response: they take a slot for their whole life.
RESPONSE_ROUTES = frozenset({"/v1/responses", "/v1/responses/compact"})

_RESERVED = web.RequestKey("orp_reserved_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def overloaded(what: str) -> ApiError:
    return ApiError(503, f"The gateway is at its limit of {what}; retry in a moment.",
                    type=SERVER_ERROR, code="server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class Admission:
    """The worker's counts of request bytes held and responses running, against their caps
    (0: no cap)."""

    def __init__(self, max_bytes: int, max_responses: int) -> None:
        self.max_bytes = max_bytes
        self.max_responses = max_responses
        self.bytes = 0
        self.responses = 0

    def take_bytes(self, size: int) -> None:
        """Hold `size` more bytes, or raise the 503."""
        if self.max_bytes and self.bytes and self.bytes + size > self.max_bytes:
            raise overloaded(f"{self.max_bytes} request bytes in flight")
        self.bytes += size

    def release_bytes(self, size: int) -> None:
        self.bytes -= size

    def reserve_body(self, request: web.Request, size: int) -> None:
        """Hold a request body's bytes until the request ends (see `admission_middleware`)."""
        self.take_bytes(size)
        request[_RESERVED] = request.get(_RESERVED, 0) + size

    def response(self, size: int = 0) -> _Slot:
        """A slot for one running response holding `size` bytes (entering it raises the 503)."""
        return _Slot(self, size)


class _Slot:
    """`Admission.response`: a plain object, not a generator and its context manager, since
    every open stream holds one for its whole life (memory per open stream)."""

    __slots__ = ("admission", "size")

    def __init__(self, admission: Admission, size: int) -> None:
        self.admission = admission
        self.size = size

    def __enter__(self) -> None:
        admission = self.admission
        if admission.max_responses and admission.responses >= admission.max_responses:
            raise overloaded(f"{admission.max_responses} responses at once")
        admission.take_bytes(self.size)
        admission.responses += 1

    def __exit__(self, *exc_info: object) -> None:
        self.admission.responses -= 1
        self.admission.release_bytes(self.size)


ADMISSION = web.AppKey("orp_admission", Admission)


@web.middleware
async def admission_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Responses take a slot for their whole life; body bytes reserved while reading the body
    (`Admission.reserve_body`) are given back when the request ends."""
    admission = request.app[ADMISSION]
    slot = (admission.response() if request.method == "POST" and request.path in RESPONSE_ROUTES
            else contextlib.nullcontext())
    try:
        with slot:
            return await handler(request)
    finally:
        admission.release_bytes(request.pop(_RESERVED, 0))


def setup_admission(app: web.Application, max_bytes: int, max_responses: int) -> Admission:
    """Install the caps (after authentication: a refused credential costs no slot)."""
    admission = Admission(max_bytes, max_responses)
    app[ADMISSION] = admission
    app.middlewares.append(admission_middleware)
    return admission
