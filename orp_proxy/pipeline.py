"""From a validated request body to a running `Exchange`: context, translation, upstream call.

Shared by every transport (HTTP JSON, HTTP SSE, WebSocket turns), so each of them differs only
in how it reads requests and delivers events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orp_proxy.config import Quirks, Settings
from orp_proxy.errors import SERVER_ERROR, ApiError
from orp_proxy.exchange import Exchange, Persistence
from orp_proxy.protocol.calls import check_outputs_answer_calls
from orp_proxy.protocol.clients import reasoning_event_style
from orp_proxy.protocol.resource import build_response, usage_from_chat
from orp_proxy.protocol.summaries import REASONING, replay_sealed
from orp_proxy.protocol.tools import ToolSet
from orp_proxy.protocol.transcoder import Event, Transcoder
from orp_proxy.protocol.translate import (
    build_chat_request,
    item_type,
    normalize_input,
    to_chat_messages,
)
from orp_proxy.protocol.truncation import drop_older_turns
from orp_proxy.routing import BuildChat, RouteHints, model_not_found
from orp_proxy.state import Gateway
from orp_proxy.store import StoredResponse, StoreUnavailable

log = logging.getLogger("orp.pipeline")


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
    # Only a background response is kept before it ends; continuing from one still running
    # would silently leave its answer out of the context (the spec wants input and output).
    head = await gateway.store.get_response(owner, previous_id)
    if head is not None and head.get("status") in ("queued", "in_progress"):
        raise ApiError(400, f"Previous response with id '{previous_id}' has not finished yet "
                       f"(status '{head['status']}'); continue from it once it has.",
                       param="previous_response_id", code="previous_response_in_progress")
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


def _model(gateway: Gateway, body: dict[str, Any]) -> str:
    model = body.get("model") or gateway.settings.default_model
    if not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    return str(model)


def is_prewarm(body: dict[str, Any]) -> bool:
    """`prompt_cache_options.prewarm: true` asks for a warm-up instead of an answer."""
    options = body.get("prompt_cache_options")
    return isinstance(options, dict) and options.get("prewarm") is True


@dataclass
class WarmUp:
    """A `generate: false` response: completed at once with no output, continuable."""

    response: dict[str, Any]
    events: list[Event]
    new_items: list[dict[str, Any]]
    stored: bool


async def warm_up(gateway: Gateway, body: dict[str, Any], *, owner: str,
                  history: list[dict[str, Any]], parent_stored: bool = True) -> WarmUp:
    """The WebSocket warm-up (`generate: false`, Codex's first message of a session): the
    context is prepared (and stored if `store` is not false) without calling the upstream, so
    that the next turn can continue from it with only its new items."""
    model = _model(gateway, body)
    new_items = await resolve_references(gateway, owner, normalize_input(body.get("input")))
    check_outputs_answer_calls(history, new_items)
    # Bad sealed blobs fail now, as they would on a generating turn.
    replay_sealed(gateway.compaction, owner, history, new_items)
    transcoder = Transcoder(build_response(
        body, model=model,
        verbosity_applied="verbosity" in gateway.settings.forward_fields))
    transcoder.start()
    transcoder.response["usage"] = usage_from_chat({})
    transcoder.finish()
    response = transcoder.response
    stored = body.get("store") is not False
    if stored:
        ttl = gateway.settings.store_ttl_seconds or None
        try:
            await gateway.store.save_response(StoredResponse(
                id=response["id"], owner=owner,
                previous_response_id=response["previous_response_id"],
                created_at=response["created_at"], status=response["status"],
                response=response,
                # A stored child of an unstored parent keeps the whole context (no parent).
                input_items=new_items if parent_stored else [*history, *new_items],
                expires_at=time.time() + ttl if ttl else None))
        except Exception as exc:
            log.exception("storing warm-up response %s failed", response["id"])
            raise ApiError(500, "The response could not be stored; it was not saved.",
                           type=SERVER_ERROR, code="store_failed") from exc
    return WarmUp(response, transcoder.take(), new_items, stored)


def chat_builder(settings: Settings, body: Mapping[str, Any], context: list[dict[str, Any]],
                 *, instructions: str | None, append: dict[str, Any] | None = None,
                 tools: ToolSet | None = None) -> BuildChat:
    """Makes the upstream body for whichever deployment the router picks (their quirks may
    differ); the messages are translated once per kind of backend. `tools`: the request's
    `ToolSet` (call items and declared tools map through it)."""
    translated: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def build(quirks: Quirks, upstream_model: str) -> dict[str, Any]:
        kind = (quirks.developer_role, quirks.reasoning_field)
        messages = translated.get(kind)
        if messages is None:
            messages = to_chat_messages(context, instructions=instructions,
                                        developer_role=quirks.developer_role,
                                        reasoning_field=quirks.reasoning_field, tools=tools)
            if append is not None:
                messages.append(append)
            translated[kind] = messages
        return build_chat_request(body, messages, model=upstream_model, settings=settings,
                                  quirks=quirks, tools=tools)

    return build


def check_model(gateway: Gateway, model: str) -> None:
    """404 `model_not_found` for a model no deployment serves, before any other work."""
    if not gateway.router.known(model):
        raise model_not_found(model)


@dataclass
class PreparedExchange:
    """A translated request whose upstream call is still to be made (a background run makes
    it later, from its own task)."""

    model: str
    build: BuildChat
    hints: RouteHints
    transcoder: Transcoder
    new_items: list[dict[str, Any]]
    persist: Persistence | None
    dropped: list[str] = field(default_factory=list)  # hosted tools left out (ToolSet.dropped)
    # `truncation: "auto"`: the builder of a shorter context, or None when nothing is left to
    # drop (see `protocol.truncation`); None for "disabled".
    shorten: Callable[[], BuildChat | None] | None = None

    async def open(self, gateway: Gateway, *, request_id: str,
                   authorization: str | None = None) -> Exchange:
        """Open the upstream stream (HTTP errors surface here as `ApiError`)."""
        if self.dropped:
            log.info("request %s: hosted tools dropped: %s", request_id,
                     ", ".join(self.dropped))
        if self.persist is not None and self.persist.store.known_unavailable():
            # The response could not be saved: refuse before the upstream spends tokens on it.
            raise StoreUnavailable("the database was unreachable a moment ago")
        build = self.build
        while True:
            try:
                upstream = await gateway.router.open(self.model, build, request_id=request_id,
                                                     authorization=authorization,
                                                     hints=self.hints)
                break
            except ApiError as exc:
                if exc.code != "context_length_exceeded" or self.shorten is None:
                    raise
                shorter = self.shorten()
                if shorter is None:
                    raise
                log.info("request %s: the context does not fit the model; older turns "
                         "dropped (truncation: auto)", request_id)
                build = shorter
        return Exchange(self.transcoder, upstream, self.persist, new_items=self.new_items,
                        headers=_dropped_header(self.dropped))


async def prepare_exchange(gateway: Gateway, body: dict[str, Any], *, owner: str,
                           history: list[dict[str, Any]],
                           client_headers: Mapping[str, str] | None = None
                           ) -> PreparedExchange:
    """Check, resolve references, translate, build the transcoder: all but the upstream call.
    `client_headers`: see `start_exchange`."""
    settings = gateway.settings
    model = _model(gateway, body)

    check_model(gateway, model)
    new_items = await resolve_references(gateway, owner, normalize_input(body.get("input")))
    check_outputs_answer_calls(history, new_items)
    # Compaction items go upstream as the summaries they seal, reasoning items with the text
    # their blob seals; the store keeps them as the client sent them.
    context = replay_sealed(gateway.compaction, owner, history, new_items)
    tools = ToolSet.build(body.get("tools"), context, hosted=settings.hosted_tools)
    if body.get("tool_choice") == "required" and not tools:
        raise ApiError(400, "Invalid value for 'tool_choice': 'required' needs a tool, and "
                       "every tool declared runs on OpenAI's servers (see "
                       "X-ORP-Dropped-Tools).", param="tool_choice", code="invalid_value",
                       headers=_dropped_header(tools.dropped))
    build = chat_builder(settings, body, context, instructions=body.get("instructions"),
                         tools=tools)
    include = body.get("include") or ()
    reasoning = body.get("reasoning")
    cipher = gateway.compaction
    # Calls past the limit are left out (the first ones to arrive are kept).
    limit = 1 if body.get("parallel_tool_calls") is False else body.get("max_tool_calls")
    transcoder = Transcoder(
        build_response(body, model=model,
                       verbosity_applied="verbosity" in settings.forward_fields),
        tools=tools,
        allowed_tools=tools.allowed(body.get("tool_choice")),
        undeclared_tools=settings.undeclared_tools,
        max_tool_calls=limit,
        reasoning_events=reasoning_event_style(settings.reasoning_events, client_headers),
        # `generate_summary` is the deprecated name of `summary`.
        reasoning_summary=isinstance(reasoning, dict) and (
            reasoning.get("summary") or reasoning.get("generate_summary")) is not None,
        seal_reasoning=((lambda text: cipher.seal(owner, text, purpose=REASONING))
                        if "reasoning.encrypted_content" in include else None),
        include_logprobs="message.output_text.logprobs" in include,
    )
    hints = RouteHints(previous_response_id=body.get("previous_response_id"),
                       response_id=transcoder.response["id"],
                       prompt_cache_key=body.get("prompt_cache_key"))
    persist = (Persistence(gateway.store, owner, new_items, settings.store_ttl_seconds or None)
               if body.get("store") is not False else None)
    shorten: Callable[[], BuildChat | None] | None = None
    if body.get("truncation") == "auto":
        remaining = [context]

        def shorten() -> BuildChat | None:
            shorter = drop_older_turns(remaining[0])
            if shorter is None:
                return None
            remaining[0] = shorter
            return chat_builder(settings, body, shorter, instructions=body.get("instructions"),
                                tools=tools)

    return PreparedExchange(model, build, hints, transcoder, new_items, persist, tools.dropped,
                            shorten)


async def start_exchange(gateway: Gateway, body: dict[str, Any], *, owner: str,
                         history: list[dict[str, Any]], request_id: str,
                         authorization: str | None = None,
                         client_headers: Mapping[str, str] | None = None) -> Exchange:
    """Translate, open the upstream stream (HTTP errors surface here), return the exchange.

    `authorization`: the client's header to send upstream instead of ORP's key (pass-through
    authentication, `auth.UPSTREAM_AUTHORIZATION`). `client_headers`: the request's (or the
    WebSocket upgrade's) headers, which pick the reasoning event names under `auto`."""
    prepared = await prepare_exchange(gateway, body, owner=owner, history=history,
                                      client_headers=client_headers)
    return await prepared.open(gateway, request_id=request_id, authorization=authorization)


def _dropped_header(dropped: list[str]) -> dict[str, str]:
    """`X-ORP-Dropped-Tools: web_search, mcp:crm`: the hosted tools left out of the request."""
    return {"X-ORP-Dropped-Tools": ", ".join(dropped)} if dropped else {}
