"""`POST /v1/responses/compact`: a long context folded into a summary the client carries along.

The context (`previous_response_id` lineage, then `input`, after `instructions`) goes upstream
with one more user message asking for a hand-off summary; the request is streamed upstream and
collected through the usual transcoder, so upstream errors and usage behave as for a response.

The result (`object: "response.compaction"`) is a compacted input window, not a stored response:
every user message of the context, verbatim and in order (what the user asked is kept exactly, as
OpenAI's endpoint does), then one `compaction` item whose `encrypted_content` seals the summary
(see `protocol.summaries`). Earlier compaction items are folded into the new summary and not
repeated. A later request that sends this window as its input gets the summary replayed in the
item's place.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from orp_proxy.errors import SERVER_ERROR, ApiError
from orp_proxy.exchange import Exchange
from orp_proxy.http.request import credential, json_response, read_json_body, request_id
from orp_proxy.ops.access import attach_exchange
from orp_proxy.ops.auth import UPSTREAM_AUTHORIZATION
from orp_proxy.pipeline import chat_builder, check_model, load_history, resolve_references
from orp_proxy.protocol.resource import build_response, new_id, usage_from_chat
from orp_proxy.protocol.summaries import replay_sealed
from orp_proxy.protocol.transcoder import Transcoder
from orp_proxy.protocol.translate import item_type, normalize_input
from orp_proxy.protocol.validation import validate_compact_body
from orp_proxy.state import GATEWAY

SUMMARY_REQUEST = (
    "Stop here: the conversation above is about to be removed from your context window and "
    "replaced by a summary that you write now. Write a hand-off summary that lets you carry on "
    "the work without the original messages: the user's goals, requirements and preferences; "
    "decisions made and why; facts, results and tool outputs that still matter; what has been "
    "done and what remains, with the next step. Keep exact names, identifiers, file paths, "
    "commands, numbers and short code excerpts that later turns will need. Write only the "
    "summary, without a preamble, and do not answer or continue the conversation itself."
)


def _summary_text(response: dict[str, Any]) -> str:
    return "".join(
        part.get("text") or ""
        for item in response["output"] if item["type"] == "message"
        for part in item["content"] if part["type"] == "output_text"
    ).strip()


def _is_user_message(item: dict[str, Any]) -> bool:
    return item_type(item) == "message" and item.get("role") == "user"


async def compact_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses/compact` → a `CompactResource` (JSON; nothing is stored)."""
    gateway = request.app[GATEWAY]
    settings = gateway.settings
    body = await read_json_body(request, settings.max_body_bytes)
    validate_compact_body(body, limits=gateway.limits)
    owner = gateway.store.owner_id(credential(request))
    rid = request_id(request)
    model: str = body["model"]
    check_model(gateway, model)
    history = await load_history(gateway, owner, body.get("previous_response_id"))
    new_items = await resolve_references(gateway, owner, normalize_input(body.get("input")))
    context = replay_sealed(gateway.compaction, owner, history, new_items)
    build = chat_builder(settings, {}, context, instructions=body.get("instructions"),
                         append={"role": "user", "content": SUMMARY_REQUEST})
    # No tools are offered, so a tool call fails the summary rather than reaching the client.
    transcoder = Transcoder(build_response({"store": False}, model=model))
    upstream = await gateway.router.open(model, build, request_id=rid,
                                         authorization=request.get(UPSTREAM_AUTHORIZATION))
    exchange = Exchange(transcoder, upstream)
    attach_exchange(request, exchange, stream=False)  # tokens and model on the access line
    result = await exchange.collect()
    summary = _summary_text(result)
    if not summary:
        raise ApiError(502, "The upstream model returned an empty summary.", type=SERVER_ERROR,
                       code="empty_summary")
    output = [item for item in [*history, *new_items] if _is_user_message(item)]
    output.append({
        "id": new_id("cmp"),
        "type": "compaction",
        "encrypted_content": gateway.compaction.seal(owner, summary),
    })
    return json_response({
        "id": new_id("resp"),
        "object": "response.compaction",
        "output": output,
        "created_at": int(time.time()),
        "usage": result["usage"] or usage_from_chat({}),  # an upstream that reports none
    }, headers={"X-Request-Id": rid})
