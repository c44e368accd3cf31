"""`POST /v1/responses` (JSON and SSE) and the stored-response endpoints."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from orp_proxy.errors import NOT_FOUND, ApiError, invalid
from orp_proxy.http.background import (
    create_background,
    stop_before_delete,
    stream_response,
    wants_stream,
)
from orp_proxy.http.request import credential, json_response, read_json_body, request_id
from orp_proxy.http.sse import SSETransport, stream_events
from orp_proxy.ops.access import attach_exchange
from orp_proxy.ops.auth import UPSTREAM_AUTHORIZATION
from orp_proxy.pipeline import is_prewarm, load_history, start_exchange, warm_up
from orp_proxy.protocol.translate import with_status
from orp_proxy.protocol.validation import validate_create_body
from orp_proxy.state import GATEWAY

# -- POST /v1/responses -------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    body = await read_json_body(request, gateway.settings.max_body_bytes)
    validate_create_body(body, limits=gateway.limits)
    if body.get("background"):
        if is_prewarm(body):
            # A warm-up generates nothing, a background run generates: refuse rather than
            # spend tokens on a request that asked for none.
            raise invalid("'prompt_cache_options.prewarm' cannot be combined with "
                          "'background': true.", "background", "invalid_value")
        return await create_background(request, body)
    owner = gateway.store.owner_id(credential(request))
    rid = request_id(request)
    history = await load_history(gateway, owner, body.get("previous_response_id"))
    if is_prewarm(body):
        return await _prewarm(request, body, owner, history, {"X-Request-Id": rid})
    exchange = await start_exchange(gateway, body, owner=owner, history=history, request_id=rid,
                                    authorization=request.get(UPSTREAM_AUTHORIZATION),
                                    client_headers=request.headers)
    stream = bool(body.get("stream"))
    attach_exchange(request, exchange, stream=stream)
    headers = {"X-Request-Id": rid, **exchange.headers}
    # The response may take minutes. Everything it needs is in the exchange (the new items in
    # its Persistence, if stored); the body, the history and the items are not held meanwhile
    # (memory per open stream: a long conversation is most of a request's bytes).
    del body, history
    if not gateway.settings.log_content:  # the access line's `input` with ORP_LOG_CONTENT
        exchange.new_items = []  # else only a WebSocket connection keeps them, as context
    if stream:
        return await stream_events(exchange, request, headers)
    return json_response(await exchange.collect(), headers=headers)


async def _prewarm(request: web.Request, body: dict[str, Any], owner: str,
                   history: list[dict[str, Any]], headers: dict[str, str]
                   ) -> web.StreamResponse:
    """`prompt_cache_options.prewarm: true`: the warm-up of WebSocket `generate: false` over
    HTTP (completed at once, no output, no upstream call, continuable)."""
    warm = await warm_up(request.app[GATEWAY], body, owner=owner, history=history)
    if not body.get("stream"):
        return json_response(warm.response, headers=headers)
    transport = SSETransport(request, headers)
    try:
        await transport.send(warm.events[:-1])
        await transport.finish(warm.events[-1:])
    except ConnectionError:
        pass  # nobody is left to answer; the warm-up is stored already
    finally:
        transport.close()
    return transport.resp


# -- stored responses ---------------------------------------------------------------------


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"No response found with id '{response_id}'.", type=NOT_FOUND,
                    param="response_id", code="not_found")


async def get_response(request: web.Request) -> web.StreamResponse:
    if wants_stream(request):
        return await stream_response(request)
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
    owner = gateway.store.owner_id(credential(request))
    await stop_before_delete(request, owner, response_id)
    deleted = await gateway.store.delete_response(owner, response_id)
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
    data = [with_status(item) for item in page.data]
    return json_response({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    })
