"""HTTP handlers: `/v1/responses` and the stored-response endpoints, plus the error middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import ujson
from aiohttp import web

from .access import ACCESS, attach_exchange, incoming_request_id
from .auth import UPSTREAM_AUTHORIZATION, bearer_token
from .errors import (
    HTTP_ERROR_CODES,
    INVALID_REQUEST,
    NOT_FOUND,
    SERVER_ERROR,
    ApiError,
    invalid,
)
from .exchange import STREAM_STARTED
from .pipeline import load_history, start_exchange
from .sse import json_bytes
from .state import GATEWAY
from .validation import validate_create_body

log = logging.getLogger("orp.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers or None)




@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the spec's error object; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = NOT_FOUND if exc.status == 404 else INVALID_REQUEST
        if exc.status >= 500:
            kind = SERVER_ERROR
        message = f"{exc.reason}: {request.method} {request.path}" if exc.status in (404, 405) \
            else exc.reason
        return error_response(ApiError(exc.status, message, type=kind,
                                       code=HTTP_ERROR_CODES.get(exc.status),
                                       headers={k: v for k, v in exc.headers.items()
                                                if k == "Allow"}))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if request.get(STREAM_STARTED):
            raise  # headers and events are out: aiohttp closes the connection instead
        return error_response(ApiError(500, "The gateway failed unexpectedly.",
                                       type=SERVER_ERROR, code="internal_error"))


# -- request helpers ----------------------------------------------------------------------


async def read_json_body(request: web.Request, limit: int) -> Any:
    """The body parsed as JSON, with 415 / 413 / 400 for the wrong kind of body."""
    if request.content_type != "application/json":
        raise ApiError(415, "Request bodies must be JSON with 'Content-Type: application/json' "
                       f"(got '{request.content_type}').", code="unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                       code="request_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.",
                       code="request_too_large") from None
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


def credential(request: web.Request) -> str | None:
    """The caller's bearer token, if any (only ever used hashed, as the store owner; the auth
    middleware has checked it unless ORP_AUTH_MODE is none)."""
    return bearer_token(request)


def request_id(request: web.Request) -> str:
    """The id the access middleware gave this request (the client's `X-Request-Id` if sane)."""
    record = request.get(ACCESS)
    return record.request_id if record is not None else incoming_request_id(request)


# -- POST /v1/responses -------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    body = await read_json_body(request, gateway.settings.max_body_bytes)
    validate_create_body(body, limits=gateway.limits)
    if body.get("background"):  # valid per spec, but not something this gateway does
        raise invalid("Background responses are not supported by this gateway.", "background",
                      "unsupported_parameter")
    owner = gateway.store.owner_id(credential(request))
    rid = request_id(request)
    history = await load_history(gateway, owner, body.get("previous_response_id"))
    exchange = await start_exchange(gateway, body, owner=owner, history=history, request_id=rid,
                                    authorization=request.get(UPSTREAM_AUTHORIZATION))
    attach_exchange(request, exchange, stream=bool(body.get("stream")))
    headers = {"X-Request-Id": rid}
    if body.get("stream"):
        return await exchange.stream(request, headers)
    return json_response(await exchange.collect(), headers=headers)


# -- stored responses ---------------------------------------------------------------------


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"No response found with id '{response_id}'.", type=NOT_FOUND,
                    param="response_id", code="not_found")


async def get_response(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    response_id = request.match_info["response_id"]
    found = await gateway.store.get_response(gateway.store.owner_id(credential(request)),
                                             response_id)
    if found is None:
        raise _not_found(response_id)
    return json_response(found)


async def delete_response(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    response_id = request.match_info["response_id"]
    deleted = await gateway.store.delete_response(
        gateway.store.owner_id(credential(request)), response_id)
    if not deleted:
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


def _query_limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        raise invalid(f"Invalid 'limit': expected an integer, got '{raw[:32]}'.", "limit",
                      "invalid_type") from None
    if not 1 <= limit <= 100:
        raise invalid(f"Invalid 'limit': {limit}; it must be between 1 and 100.", "limit",
                      "invalid_value")
    return limit


async def list_input_items(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    response_id = request.match_info["response_id"]
    limit = _query_limit(request)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid(f"Invalid 'order': '{order[:32]}'. Supported values are: 'asc', 'desc'.",
                      "order", "invalid_value")
    page = await gateway.store.list_input_items(
        gateway.store.owner_id(credential(request)), response_id, limit=limit, order=order,
        after=request.query.get("after") or None, before=request.query.get("before") or None)
    if page is None:
        raise _not_found(response_id)
    data = page.data
    return json_response({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    })


def setup_routes(app: web.Application) -> None:
    # Imported here: both modules build on this one's request helpers.
    from .compaction import compact_response
    from .websocket import setup_websocket

    app.router.add_post("/v1/responses", create_response)
    setup_websocket(app)  # GET /v1/responses, upgraded
    app.router.add_post("/v1/responses/compact", compact_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
