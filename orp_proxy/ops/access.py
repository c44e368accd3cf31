"""One JSON access-log line and the request metrics per request, written when it ends.

The middleware names every request (the client's `X-Request-Id` if it is sane, otherwise a new
one; handlers send the same id upstream and back in the response headers), and handlers that
run a response attach their `Exchange`, from which the line takes the model, token counts, time
to first token and outcome. The line never holds headers (so no credentials) and holds message
content only with `ORP_LOG_CONTENT`. Probe endpoints are logged at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from orp_proxy.errors import HTTP_ERROR_CODES, ApiError
from orp_proxy.ids import random_hex
from orp_proxy.ops import metrics
from orp_proxy.protocol.sse import dumps
from orp_proxy.state import GATEWAY

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from orp_proxy.exchange import Exchange

log = logging.getLogger("orp.access")

PROBE_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
# Not an HTTP status anyone sent: nginx's convention for "the client closed the connection
# before the response was complete".
CLIENT_CLOSED = 499


@dataclass(slots=True)
class AccessRecord:
    """What the access line needs to know about one request beyond the request itself."""

    request_id: str
    started: float
    exchange: Exchange | None = None
    stream: bool = False


ACCESS = web.RequestKey("orp_access", AccessRecord)
WEBSOCKET_CLOSED = web.RequestKey("orp_websocket_closed", bool)
"""Set on an upgrade request once its WebSocket closed by handshake: the peer dropping the TCP
connection after that (which cancels the handler) is the normal end, not a hang-up."""


def incoming_request_id(request: web.BaseRequest) -> str:
    """The client's `X-Request-Id` if short and printable, otherwise a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return random_hex()


def attach_exchange(request: web.Request, exchange: Exchange, *, stream: bool) -> None:
    """Let the access line and metrics report on this response."""
    record = request.get(ACCESS)
    if record is not None:
        record.exchange = exchange
        record.stream = stream


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def write_access_line(request: web.Request, record: AccessRecord, status: int,
                      error_code: str | None, *, method: str | None = None) -> None:
    """The access line and request metrics for one request, or for one WebSocket turn
    (`method="WS"`, on the upgrade request)."""
    now = time.monotonic()
    exchange = record.exchange
    response = exchange.transcoder.response if exchange is not None else None
    usage = ttft = None
    if exchange is not None and response is not None:
        if status < 400 and _client_left(response):
            # Noticed by a failed write, the handler returned normally: still the client's
            # hang-up.
            status, error_code = CLIENT_CLOSED, None
        ttft = (exchange.first_token_at - record.started
                if exchange.first_token_at is not None else None)
        usage = response.get("usage") or None
        failure = response.get("error") if response.get("status") == "failed" else None
        if failure and error_code is None:
            error_code = failure.get("code") or "response_failed"
        metrics.record_response(ttft=ttft, duration=now - record.started, usage=usage)
    if error_code is not None:
        metrics.record_error(error_code)
    metrics.record_request(_route(request), status, record.stream)
    level = logging.DEBUG if request.path in PROBE_PATHS else logging.INFO
    if not log.isEnabledFor(level):
        return  # the metrics are kept; the line is not built for nobody (most of its cost)
    line: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "type": "access",
        "request_id": record.request_id,
        "method": method or request.method,
        "path": request.path,
        "status": status,
        "duration_ms": _ms(now - record.started),
        "stream": record.stream,
        "pid": os.getpid(),
        "remote": request.remote,
    }
    if exchange is not None and response is not None:
        line.update(model=response.get("model"), response_id=response.get("id"),
                    outcome=response.get("status"), ttft_ms=_ms(ttft),
                    input_tokens=usage.get("input_tokens") if usage else None,
                    output_tokens=usage.get("output_tokens") if usage else None)
        if exchange.upstream.deployment is not None:
            line["deployment"] = exchange.upstream.deployment
        if response.get("status") == "incomplete" and response.get("incomplete_details"):
            line["incomplete_reason"] = response["incomplete_details"].get("reason")
        if _log_content(request):
            line.update(instructions=response.get("instructions"), input=exchange.new_items,
                        output=response.get("output"))
    if error_code is not None:
        line["error_code"] = error_code
    agent = request.headers.get("User-Agent")
    if agent:
        line["user_agent"] = agent[:200]
    # The JSON line as the message, its fields for the text format (see ops.logs).
    log.log(level, dumps(line), extra={"access": line})


def _client_left(response: dict[str, Any]) -> bool:
    if response.get("status") != "incomplete":
        return False
    details = response.get("incomplete_details")
    return isinstance(details, dict) and details.get("reason") == "client_disconnected"


def _log_content(request: web.Request) -> bool:
    gateway = request.app.get(GATEWAY)
    return gateway is not None and gateway.settings.log_content


@web.middleware
async def access_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
    """Times the request; sits inside the error middleware so it sees errors by their code."""
    record = AccessRecord(incoming_request_id(request), time.monotonic())
    request[ACCESS] = record
    status = 500
    error_code: str | None = "internal_error"
    try:
        response = await handler(request)
        status = response.status
        error_code = None if status < 400 else f"http_{status}"
        return response
    except ApiError as exc:
        status, error_code = exc.status, exc.code or f"http_{exc.status}"
        raise
    except web.HTTPException as exc:
        status = exc.status
        error_code = None if status < 400 else HTTP_ERROR_CODES.get(status, f"http_{status}")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 101 if request.get(WEBSOCKET_CLOSED) else CLIENT_CLOSED
        error_code = None
        raise
    finally:
        try:
            write_access_line(request, record, status, error_code)
        except Exception:  # pragma: no cover - logging must never fail a request
            logging.getLogger("orp.http").exception("writing the access line failed")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(ACCESS)
    if record is not None and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = record.request_id


def setup_access_log(app: web.Application) -> None:
    """Every response, errors included, carries its `X-Request-Id`."""
    app.on_response_prepare.append(_add_request_id)
