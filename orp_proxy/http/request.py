"""Request helpers shared by every endpoint: JSON bodies in and out, caller identity, request id."""

from __future__ import annotations

import asyncio
from typing import Any

import ujson
from aiohttp import web

from orp_proxy.errors import ApiError
from orp_proxy.ops.access import ACCESS, incoming_request_id
from orp_proxy.ops.admission import ADMISSION
from orp_proxy.ops.auth import bearer_token
from orp_proxy.protocol.media import media_type
from orp_proxy.protocol.sse import json_bytes
from orp_proxy.state import GATEWAY


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers or None)


async def read_json_body(request: web.Request, limit: int) -> Any:
    """The body parsed as JSON, with 415 / 413 / 400 for the wrong kind of body, 408 for one
    that does not arrive within `ORP_BODY_READ_TIMEOUT`, and 503 past the worker's cap on
    request bytes in flight (the reservation lasts until the request ends)."""
    content_type = media_type(request.headers.get("Content-Type"))
    if content_type != "application/json":
        raise ApiError(415, "Request bodies must be JSON with 'Content-Type: application/json' "
                       f"(got '{content_type}').", code="unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                       code="request_too_large")
    admission = request.app.get(ADMISSION)
    if admission is not None and request.content_length is not None:
        admission.reserve_body(request, request.content_length)
    timeout = request.app[GATEWAY].settings.body_read_timeout if GATEWAY in request.app \
        else None
    try:
        if request.content.is_eof():
            raw = await _read_body(request, limit)  # all here: no timer to arm and cancel
        else:
            async with asyncio.timeout(timeout):
                raw = await _read_body(request, limit)
    except TimeoutError:
        # The rest of the body may still trickle in: the connection cannot be reused.
        raise ApiError(408, f"The request body did not arrive within {timeout:g} seconds.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    if admission is not None and request.content_length is None:
        admission.reserve_body(request, len(raw))  # chunked: its size is known only now
    try:
        return ujson.loads(raw)
    except (ValueError, OverflowError, RecursionError) as exc:
        # ujson refuses nesting over 1024 levels, and Python integers over 4300 digits: say so.
        reason = str(exc)
        detail = (" It is nested too deeply (at most 1024 levels)." if "depth" in reason
                  else " It holds a number with too many digits." if "digits" in reason
                  else "")
        raise ApiError(400, f"The request body is not valid JSON.{detail}",
                       code="invalid_json") from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, 413 past `limit` bytes. Not `request.read()`: that keeps its copy on
    the request as long as the request lives, which for a stream is the whole stream."""
    content = request.content
    parts: list[bytes] = []
    size = 0
    while data := await content.readany():
        size += len(data)
        if size > limit:
            raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                           code="request_too_large")
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def credential(request: web.Request) -> str | None:
    """The caller's bearer token, if any (only ever used hashed, as the store owner; the auth
    middleware has checked it unless ORP_AUTH_MODE is none)."""
    return bearer_token(request)


def request_id(request: web.Request) -> str:
    """The id the access middleware gave this request (the client's `X-Request-Id` if sane)."""
    record = request.get(ACCESS)
    return record.request_id if record is not None else incoming_request_id(request)
