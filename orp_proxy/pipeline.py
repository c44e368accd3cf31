"""From a validated request body to a running `Exchange`: context, translation, upstream call.

Shared by every transport (HTTP JSON, HTTP SSE, WebSocket turns), so each of them differs only
in how it reads requests and delivers events.
"""

from __future__ import annotations

from typing import Any

from orp_proxy.errors import ApiError
from orp_proxy.exchange import Exchange, Persistence
from orp_proxy.protocol.resource import build_response
from orp_proxy.protocol.summaries import replay_compactions
from orp_proxy.protocol.transcoder import Transcoder
from orp_proxy.protocol.translate import (
    allowed_tool_names,
    build_chat_request,
    item_type,
    normalize_input,
    to_chat_messages,
)
from orp_proxy.state import Gateway


def previous_not_found(previous_id: str) -> ApiError:
    return ApiError(400, f"Previous response with id '{previous_id}' not found.",
                    param="previous_response_id", code="previous_response_not_found")


async def load_history(gateway: Gateway, owner: str, previous_id: str | None
                       ) -> list[dict[str, Any]]:
    """The stored lineage to continue from (empty without `previous_response_id`)."""
    if not previous_id:
        return []
    lineage = await gateway.store.load_lineage(owner, previous_id)
    if lineage is None:
        raise previous_not_found(previous_id)
    return lineage


async def resolve_references(gateway: Gateway, owner: str, items: list[dict[str, Any]]
                             ) -> list[dict[str, Any]]:
    """`item_reference` items replaced by the stored items (of the same owner) they name."""
    refs = [i for i, item in enumerate(items) if item_type(item) == "item_reference"]
    if not refs:
        return items
    found = await gateway.store.get_items(owner, [items[i]["id"] for i in refs])
    resolved = list(items)
    for i in refs:
        item = found.get(items[i]["id"])
        if item is None:
            raise ApiError(400, f"Item with id '{items[i]['id']}' not found.",
                           param=f"input[{i}].id", code="item_not_found")
        resolved[i] = item
    return resolved


async def start_exchange(gateway: Gateway, body: dict[str, Any], *, owner: str,
                         history: list[dict[str, Any]], request_id: str,
                         authorization: str | None = None) -> Exchange:
    """Translate, open the upstream stream (HTTP errors surface here), return the exchange.

    `authorization`: the client's header to send upstream instead of ORP's key (pass-through
    authentication, `auth.UPSTREAM_AUTHORIZATION`)."""
    settings = gateway.settings
    model = body.get("model") or settings.default_model
    if not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    new_items = await resolve_references(gateway, owner, normalize_input(body.get("input")))
    # Compaction items go upstream as the summaries they seal; the store keeps them sealed.
    context = replay_compactions(gateway.compaction, owner, history, new_items)
    messages = to_chat_messages(context, instructions=body.get("instructions"),
                                developer_role=settings.developer_role)
    chat = build_chat_request(body, messages, model=settings.upstream_model(model),
                              settings=settings)
    transcoder = Transcoder(
        build_response(body, model=model),
        allowed_tools=allowed_tool_names(body),
        reasoning_events=settings.reasoning_events,
        include_logprobs="message.output_text.logprobs" in (body.get("include") or ()),
    )
    upstream = await gateway.upstream.open(chat, request_id=request_id,
                                           authorization=authorization)
    persist = (Persistence(gateway.store, owner, new_items, settings.store_ttl_seconds or None)
               if body.get("store") is not False else None)
    return Exchange(transcoder, upstream, persist, new_items=new_items)
