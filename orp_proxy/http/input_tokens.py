"""`POST /v1/responses/input_tokens`: how many input tokens a request would use.

Chat Completions has no counting endpoint, but vLLM and SGLang serve `POST /tokenize` beside
their `/v1` API, taking the chat `messages` (and `tools`) and rendering them with the model's
chat template, so the count is what the same request's `usage.input_tokens` would be. ORP
translates the request exactly as for `POST /v1/responses` and asks that endpoint. A backend
without it (llama.cpp's `/tokenize` takes plain text only, OpenAI has none) gets a 501 error
object that says so, rather than an estimate.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import ujson
from aiohttp import web

from orp_proxy.errors import INVALID_REQUEST, SERVER_ERROR, ApiError
from orp_proxy.http.request import credential, json_response, read_json_body, request_id
from orp_proxy.ops.auth import UPSTREAM_AUTHORIZATION
from orp_proxy.pipeline import check_model, load_history, resolve_references
from orp_proxy.protocol.calls import check_outputs_answer_calls
from orp_proxy.protocol.summaries import replay_sealed
from orp_proxy.protocol.translate import build_chat_request, normalize_input, to_chat_messages
from orp_proxy.protocol.validation import validate_create_body
from orp_proxy.state import GATEWAY
from orp_proxy.upstream.client import UpstreamClient, status_error

_TIMEOUT = aiohttp.ClientTimeout(total=30)
_LIMIT = 1024 * 1024


def _unavailable(why: str) -> ApiError:
    return ApiError(501, f"Counting input tokens is not available here: {why}",
                    type=INVALID_REQUEST, code="input_tokens_unavailable")


def tokenize_url(upstream: UpstreamClient) -> str:
    """`{server}/tokenize`: beside the API version path, where vLLM and SGLang serve it."""
    parts = urlsplit(upstream.base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urlunsplit(parts._replace(path=path + "/tokenize", query=""))


def _count(raw: bytes) -> int | None:
    try:
        document = ujson.loads(raw)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    count = document.get("count")
    if type(count) is int and count >= 0:
        return count
    return None


async def count_input_tokens(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    settings = gateway.settings
    body = await read_json_body(request, settings.max_body_bytes)
    validate_create_body(body, limits=gateway.limits)
    model = body.get("model") or settings.default_model
    if not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    check_model(gateway, model)
    if settings.routed:
        raise _unavailable("with a file of models the deployment that would serve a request "
                           "is chosen per request, so there is no one tokenizer to ask.")
    owner = gateway.store.owner_id(credential(request))
    history = await load_history(gateway, owner, body.get("previous_response_id"))
    new_items = await resolve_references(gateway, owner, normalize_input(body.get("input")))
    check_outputs_answer_calls(history, new_items)
    context = replay_sealed(gateway.compaction, owner, history, new_items)
    quirks = settings.quirks
    messages = to_chat_messages(context, instructions=body.get("instructions"),
                                developer_role=quirks.developer_role,
                                reasoning_field=quirks.reasoning_field)
    chat = build_chat_request(body, messages, model=settings.upstream_model(model),
                              settings=settings, quirks=quirks)
    # vLLM's chat form of /tokenize: the messages and tools, rendered as for generation.
    payload: dict[str, Any] = {"model": chat["model"], "messages": chat["messages"],
                               "add_generation_prompt": True}
    if chat.get("tools"):
        payload["tools"] = chat["tools"]
    upstream = gateway.upstream
    auth = request.get(UPSTREAM_AUTHORIZATION) or upstream.authorization
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id(request)}
    if auth:
        headers["Authorization"] = auth
    try:
        async with upstream.session.post(tokenize_url(upstream), data=ujson.dumps(payload),
                                         headers=headers, timeout=_TIMEOUT) as resp:
            raw = await resp.content.read(_LIMIT)
            status = resp.status
            resp_headers = resp.headers
    except (TimeoutError, aiohttp.ClientError, OSError):
        raise ApiError(502, "The upstream model server could not be reached.",
                       type=SERVER_ERROR, code="upstream_unavailable") from None
    if status in (404, 405) and b'"error"' not in raw:
        raise _unavailable("the upstream model server has no /tokenize endpoint (vLLM and "
                           "SGLang have one).")
    if status != 200:
        raise status_error(status, raw, resp_headers, upstream.scrub)
    count = _count(raw)
    if count is None:
        raise _unavailable("the upstream's /tokenize answer has no token count.")
    return json_response({"object": "response.input_tokens", "input_tokens": count})
