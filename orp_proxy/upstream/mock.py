"""A scripted Chat Completions upstream: for tests, benchmarks and as ORP's demo backend.

Serves `POST /v1/chat/completions` (SSE or JSON), `GET /v1/models` and `GET /health`.
Tests queue `Scenario`s to control the exact bytes, status, timing and failures of the next
answers; with an empty queue the model name picks a built-in behaviour (echo, tools, reasoning,
refusal, errors, or the cheap `bench*` token stream used as the floor of CPU measurements).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ujson
from aiohttp import web

__all__ = [
    "KNOWN_MODELS",
    "MOCK_UPSTREAM_KEY",
    "MockUpstream",
    "RecordedRequest",
    "Scenario",
    "completion_from_chunks",
    "encode_sse",
    "main",
    "reasoning_chunks",
    "refusal_chunks",
    "start_mock_upstream",
    "text_chunks",
    "tool_call_chunks",
    "usage_dict",
]

KNOWN_MODELS: tuple[str, ...] = (
    "mock",
    "mock-tools",
    "mock-reasoning",
    "mock-refusal",
    "mock-error-400",
    "mock-error-429",
    "mock-error-500",
    "bench",
)

DEFAULT_ID = "chatcmpl-mock"
DEFAULT_CREATED = 1_700_000_000
SSE_CONTENT_TYPE = "text/event-stream"

# Disconnect polling period: the proxy's tests demand detection within 20 ms.
_POLL_S = 0.01
# Bench events per write when unpaced: fewer syscalls keep the mock's CPU out of the measurement.
_BENCH_BATCH = 16
_ERROR_MODEL = re.compile(r"mock-error-(\d{3})\Z")
_WORD = re.compile(r"\s*\S+")
_DONE = b"data: [DONE]\n\n"
_ROLE_TEXT: dict[str, Any] = {"role": "assistant", "content": ""}
_ROLE_CHOICE: dict[str, Any] = {"index": 0, "delta": _ROLE_TEXT, "finish_reason": None}


def _finish_choice(reason: str) -> dict[str, Any]:
    return {"index": 0, "delta": {}, "finish_reason": reason}
_KEEPALIVE = b": keep-alive\n\n"


# --------------------------------------------------------------------------- chunk builders


def _chunk(
    delta: dict[str, Any], finish_reason: str | None, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _close(
    chunks: list[dict[str, Any]],
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    model: str,
    completion_id: str,
    created: int,
) -> list[dict[str, Any]]:
    if finish_reason is not None:
        chunks.append(_chunk({}, finish_reason, model, completion_id, created))
    if usage is not None:
        chunks.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    return chunks


def usage_dict(
    prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    """An upstream `usage` object, with the cached and reasoning token details."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def text_chunks(
    pieces: Sequence[str],
    *,
    finish_reason: str | None = "stop",
    usage: dict[str, Any] | None = None,
    model: str = "mock",
    role_chunk: bool = True,
    completion_id: str = DEFAULT_ID,
    created: int = DEFAULT_CREATED,
) -> list[dict[str, Any]]:
    """Chunks streaming `pieces` as `delta.content`, after a `{"role": "assistant", "content": ""}`
    chunk (unless `role_chunk` is false); then a finish chunk and, given `usage`, a usage chunk."""
    chunks: list[dict[str, Any]] = []
    if role_chunk:
        chunks.append(_chunk(dict(_ROLE_TEXT), None, model, completion_id, created))
    chunks.extend(_chunk({"content": p}, None, model, completion_id, created) for p in pieces)
    return _close(chunks, finish_reason, usage, model, completion_id, created)


def tool_call_chunks(
    calls: Sequence[tuple[str, str, str]],
    *,
    split_args: int = 7,
    interleave: bool = False,
    text_before: str | None = None,
    finish_reason: str | None = "tool_calls",
    usage: dict[str, Any] | None = None,
    model: str = "mock",
    completion_id: str = DEFAULT_ID,
    created: int = DEFAULT_CREATED,
) -> list[dict[str, Any]]:
    """Chunks streaming tool calls given as `(call_id, name, arguments_json)`.

    Each call's first fragment carries `index`, `id`, `type`, `function.name` and empty
    `function.arguments`; the following ones carry only `index` and `split_args` characters of
    the arguments (cut blindly, so possibly inside an escape). `interleave` alternates the calls'
    fragments round-robin. The role chunk has `content: null` unless `text_before` is streamed
    first (as one content delta).
    """
    chunks: list[dict[str, Any]] = []
    if text_before is None:
        role = {"role": "assistant", "content": None}
        chunks.append(_chunk(role, None, model, completion_id, created))
    else:
        chunks.append(_chunk(dict(_ROLE_TEXT), None, model, completion_id, created))
        chunks.append(_chunk({"content": text_before}, None, model, completion_id, created))
    per_call: list[list[dict[str, Any]]] = []
    for index, (call_id, name, arguments) in enumerate(calls):
        fragments: list[dict[str, Any]] = [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        ]
        step = split_args if split_args > 0 else max(len(arguments), 1)
        fragments.extend(
            {"index": index, "function": {"arguments": arguments[start : start + step]}}
            for start in range(0, len(arguments), step)
        )
        per_call.append(fragments)
    if interleave:
        ordered = [f for group in itertools.zip_longest(*per_call) for f in group if f is not None]
    else:
        ordered = [f for fragments in per_call for f in fragments]
    chunks.extend(_chunk({"tool_calls": [f]}, None, model, completion_id, created) for f in ordered)
    return _close(chunks, finish_reason, usage, model, completion_id, created)


def reasoning_chunks(
    reasoning: Sequence[str],
    text: Sequence[str],
    *,
    field: str = "reasoning_content",
    calls: Sequence[tuple[str, str, str]] = (),
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    model: str = "mock",
    completion_id: str = DEFAULT_ID,
    created: int = DEFAULT_CREATED,
) -> list[dict[str, Any]]:
    """Chunks streaming `reasoning` as `delta.<field>` (`reasoning_content` as DeepSeek/llama.cpp/
    SGLang send it, or `reasoning` as vLLM/OpenRouter do), then `text` as content, then `calls`
    (`(call_id, name, arguments_json)`, each in two fragments: name, then arguments).

    `finish_reason` defaults to `tool_calls` with calls, `stop` without."""
    if field not in ("reasoning_content", "reasoning"):
        raise ValueError(f"field must be 'reasoning_content' or 'reasoning', got {field!r}")
    chunks = [_chunk(dict(_ROLE_TEXT), None, model, completion_id, created)]
    chunks.extend(_chunk({field: p}, None, model, completion_id, created) for p in reasoning)
    chunks.extend(_chunk({"content": p}, None, model, completion_id, created) for p in text)
    for index, (call_id, name, arguments) in enumerate(calls):
        head = {"index": index, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}
        tail = {"index": index, "function": {"arguments": arguments}}
        chunks.append(_chunk({"tool_calls": [head]}, None, model, completion_id, created))
        chunks.append(_chunk({"tool_calls": [tail]}, None, model, completion_id, created))
    if finish_reason is None:
        finish_reason = "tool_calls" if calls else "stop"
    return _close(chunks, finish_reason, usage, model, completion_id, created)


def refusal_chunks(
    pieces: Sequence[str],
    *,
    finish_reason: str | None = "stop",
    usage: dict[str, Any] | None = None,
    model: str = "mock",
    completion_id: str = DEFAULT_ID,
    created: int = DEFAULT_CREATED,
) -> list[dict[str, Any]]:
    """Chunks streaming a refusal as `delta.refusal`, after a `{"role": "assistant",
    "refusal": ""}` chunk."""
    chunks = [_chunk({"role": "assistant", "refusal": ""}, None, model, completion_id, created)]
    chunks.extend(_chunk({"refusal": p}, None, model, completion_id, created) for p in pieces)
    return _close(chunks, finish_reason, usage, model, completion_id, created)


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (echoed from a `\ud800` escape) is not UTF-8; escaped it is JSON.
        return json.dumps(obj, separators=(",", ":")).encode()


def _sse_events(
    chunks: Sequence[dict[str, Any]], *, send_done: bool, crlf: bool, keepalive_comments: bool
) -> list[bytes]:
    """The stream as a list of events (comments count as events of their own)."""
    events: list[bytes] = []
    bodies = [b"data: " + _dumps(c) + b"\n\n" for c in chunks]
    if send_done:
        bodies.append(_DONE)
    for i, event in enumerate(bodies):
        if keepalive_comments and i:
            events.append(_KEEPALIVE)
        events.append(event)
    if crlf:
        events = [e.replace(b"\n", b"\r\n") for e in events]
    return events


def encode_sse(
    chunks: Sequence[dict[str, Any]],
    *,
    send_done: bool = True,
    crlf: bool = False,
    keepalive_comments: bool = False,
) -> bytes:
    """The wire bytes of `chunks`: one compact `data: {json}` event each, then `data: [DONE]`
    (if `send_done`), with a `: keep-alive` comment between events if asked."""
    return b"".join(
        _sse_events(chunks, send_done=send_done, crlf=crlf, keepalive_comments=keepalive_comments)
    )


def completion_from_chunks(chunks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed `chat.completion` object equivalent to a list of chunks."""
    first = chunks[0] if chunks else {}
    content: list[str] | None = None
    reasoning: dict[str, list[str]] = {}
    refusal: list[str] | None = None
    calls: dict[int, dict[str, Any]] = {}
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            finish_reason = choice.get("finish_reason") or finish_reason
            delta = choice.get("delta") or {}
            if delta.get("content") is not None:
                content = (content or []) + [delta["content"]]
            if delta.get("refusal") is not None:
                refusal = (refusal or []) + [delta["refusal"]]
            for key in ("reasoning_content", "reasoning"):
                if delta.get(key) is not None:
                    reasoning.setdefault(key, []).append(delta[key])
            for fragment in delta.get("tool_calls") or ():
                call = calls.setdefault(
                    fragment["index"],
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = fragment.get("id") or call["id"]
                function = fragment.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if content is None else "".join(content),
    }
    for key, parts in reasoning.items():
        message[key] = "".join(parts)
    if refusal is not None:
        message["refusal"] = "".join(refusal)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    result: dict[str, Any] = {
        "id": first.get("id", DEFAULT_ID),
        "object": "chat.completion",
        "created": first.get("created", DEFAULT_CREATED),
        "model": first.get("model", "mock"),
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        result["usage"] = usage
    return result


# status: (message, type, param, code); `{name}` gets " (model)" when the model is known.
_ERRORS: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "The mock upstream rejected the request{name}.",
        "invalid_request_error",
        "messages",
        "invalid_value",
    ),
    401: ("Incorrect API key{name}.", "authentication_error", None, "invalid_api_key"),
    404: ("Model not found{name}.", "not_found_error", "model", "model_not_found"),
    429: ("Rate limit reached{name}; retry in 2s.", "requests", None, "rate_limit_exceeded"),
}


def _error_body(status: int, model: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object for `status`."""
    default = ("The mock upstream failed{name}.", "server_error", None, None)
    if status < 500:
        default = (f"Mock error {status}{{name}}.", "invalid_request_error", None, None)
    message, kind, param, code = _ERRORS.get(status, default)
    message = message.format(name=f" ({model})" if model else "")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One scripted upstream answer, consumed by the next chat request.

    Content, first match wins: `raw` bytes; `body` (sent as-is, with Content-Length; a dict is
    JSON and switches the default content type to application/json); a non-200 `status` alone
    (an OpenAI-style error body); `chunks` (SSE events); otherwise the model's default answer,
    still shaped by the delivery fields (split, delays, stall/reset, SSE options).
    """

    chunks: list[dict[str, Any]] | None = None
    raw: bytes | None = None
    status: int = 200
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = SSE_CONTENT_TYPE
    split: int | list[int] | None = None
    delay: float = 0.0
    first_byte_delay: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None
    send_done: bool = True
    keepalive_comments: bool = False
    crlf: bool = False


class _Headers(dict[str, str]):
    """Received headers; keys are stored lower-cased and looked up case-insensitively."""

    def __init__(self, items: Mapping[str, str]) -> None:
        super().__init__((k.lower(), v) for k, v in items.items())

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    """A chat request the mock received, and when it finished or saw the client go away.

    `headers` is a dict with lower-cased keys that also answers lookups in any case.
    """

    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    finished_at: float | None = None
    disconnected_at: float | None = None


@dataclass
class _Plan:
    status: int
    headers: dict[str, str]
    pieces: list[bytes]
    content_length: int | None
    delay: float = 0.0
    first_byte_delay: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None


def _cut(data: list[bytes], split: int | list[int] | None) -> list[bytes]:
    if split is None:
        return [d for d in data if d]
    joined = b"".join(data)
    if isinstance(split, int):
        step = max(split, 1)
        return [joined[i : i + step] for i in range(0, len(joined), step)]
    bounds = [0, *sorted({o for o in split if 0 < o < len(joined)}), len(joined)]
    return [joined[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _text_of(content: Any) -> str:
    """Text of a chat message `content` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
        )
    return ""


def _split_words(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is exactly `text` (spaces lead each word)."""
    pieces = _WORD.findall(text)
    rest = text[sum(map(len, pieces)) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


def _prompt_words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict)
    )


def _token_limit(body: Mapping[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(value, 0)
    return None


_CALL_DIRECTIVE = re.compile(r"CALL ([A-Za-z0-9_-]+)(?: (\{.*\}))?", re.S)


def _functions(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            out.append(function)
    return out


def _example(name: str, schema: Any) -> Any:
    """A valid value for a property, harmless if a client runs it (`echo hello`)."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "array":
        return ["echo hello"] if name in ("commands", "command") else []
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "object":
        return {}
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    return "echo hello" if name in ("cmd", "command") else "hello"


def _pick_call(tools: list[Any], messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(function name, arguments) of the call `mock-tools` makes.

    The last user message picks the tool: `CALL name {json arguments}` calls `name` (a
    declared function, or one whose flattened name ends in `__name`) with those arguments;
    without arguments, or when the message just mentions a declared function's name, they are
    made up from its schema (required properties). Otherwise the first tool is called with
    `{"city": "Paris"}`, the mock's historical answer.
    """
    functions = _functions(tools)
    said = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            said = _text_of(message.get("content"))
            break
    wanted: dict[str, Any] | None = None
    arguments: str | None = None
    directive = _CALL_DIRECTIVE.search(said)
    if directive:
        target = directive.group(1)
        wanted = next((f for f in functions if f["name"] == target), None) or next(
            (f for f in functions if f["name"].endswith(f"__{target}")), None)
        arguments = directive.group(2)
    if wanted is None:
        words = set(re.findall(r"[A-Za-z0-9_-]+", said))
        wanted = next((f for f in functions if f["name"] in words), None)
    if wanted is None:
        first = functions[0]["name"] if functions else "tool"
        return first, '{"city": "Paris"}'
    if arguments is None:
        schema = wanted.get("parameters")
        props = schema.get("properties") if isinstance(schema, dict) else None
        props = props if isinstance(props, dict) else {}
        required = schema.get("required") if isinstance(schema, dict) else None
        names = [n for n in (required if isinstance(required, list) else props)
                 if isinstance(n, str)]
        arguments = json.dumps({n: _example(n, props.get(n)) for n in names})
    return str(wanted["name"]), arguments


def _has_lone_surrogate(body: Any) -> bool:
    try:
        ujson.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (OverflowError, ValueError, TypeError):
        return False
    return False


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --------------------------------------------------------------------------- the server


class MockUpstream:
    """A Chat Completions server that plays queued `Scenario`s, or default behaviours by model.

    `interval_ms` paces the default streams (echo word by word, bench tokens);
    `bench_tokens` is the length of a `bench*` answer before any max_tokens cap.
    """

    def __init__(self, *, interval_ms: float = 0.0, bench_tokens: int = 256) -> None:
        self.interval_ms = interval_ms
        self.bench_tokens = bench_tokens
        self.requests: list[RecordedRequest] = []
        self.tokenize_requests: list[dict[str, Any]] = []
        self.model_listings = 0  # GET /v1/models answered
        self._queue: deque[Scenario] = deque()
        self._closing = False
        self._ids = itertools.count(1)
        # Each bench event is `head + tail`: the head (id, model) is made per request, the
        # tails once; every token's text differs because some gateways drop repeated chunks.
        self._bench_tails = [
            b' w%d"},"finish_reason":null}]}\n\n' % i for i in range(bench_tokens)
        ]

    # -- scripting

    def enqueue(self, *scenarios: Scenario) -> None:
        """Queue answers for the next chat requests, first in first out."""
        self._queue.extend(scenarios)

    def reset(self) -> None:
        """Forget queued scenarios and recorded requests."""
        self._queue.clear()
        self.requests.clear()
        self.tokenize_requests.clear()
        self.model_listings = 0

    # The documented API takes a timeout (callers must not need asyncio.timeout around it).
    async def wait_for_disconnect(self, index: int = -1, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """Wait until request `index` has seen its client go away; return `disconnected_at`.

        Raises TimeoutError if that does not happen (or the request never arrives) in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                seen = self.requests[index].disconnected_at
            except IndexError:
                seen = None
            if seen is not None:
                return seen
            if loop.time() >= deadline:
                raise TimeoutError(f"request {index} saw no client disconnect within {timeout}s")
            await asyncio.sleep(0.002)

    # -- application

    def app(self) -> web.Application:
        """A new aiohttp application serving this mock (chat and models under /v1)."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app[MOCK_UPSTREAM_KEY] = self
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_post("/tokenize", self._handle_tokenize)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/mock/requests", self._handle_requests)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._closing = False

    async def _on_shutdown(self, app: web.Application) -> None:
        # Lets stalled handlers end, so that shutdown does not wait for their clients.
        self._closing = True

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle_tokenize(self, request: web.Request) -> web.Response:
        """vLLM's chat form of `/tokenize`: the count is the `prompt_tokens` a chat request
        with the same messages would report."""
        try:
            body = ujson.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response({"error": {"message": "messages required",
                                                "type": "invalid_request_error"}}, status=400)
        self.tokenize_requests.append(body)
        count = _prompt_words(body["messages"])
        return web.json_response({"count": count, "max_model_len": 32768,
                                  "tokens": list(range(count))})

    async def _handle_requests(self, request: web.Request) -> web.Response:
        """What tests in another process need to know of the chat requests so far: when each
        arrived, finished or saw its client go away (`time.monotonic()`, which is the same
        clock in every process of the machine)."""
        return web.json_response([
            {"model": r.body.get("model"), "received_at": r.received_at,
             "finished_at": r.finished_at, "disconnected_at": r.disconnected_at}
            for r in self.requests])

    async def _handle_models(self, request: web.Request) -> web.Response:
        self.model_listings += 1
        data = [
            {"id": name, "object": "model", "created": DEFAULT_CREATED, "owned_by": "orp-mock"}
            for name in KNOWN_MODELS
        ]
        return web.json_response({"object": "list", "data": data})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = ujson.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = {
                "error": {
                    "message": "The request body is not a JSON object.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_json",
                }
            }
            return web.json_response(error, status=400)
        record = RecordedRequest(body, _Headers(request.headers), time.monotonic())
        self.requests.append(record)
        if _has_lone_surrogate(body):
            # As real servers do: a `\ud800` escape without its pair is no text a tokenizer
            # takes, and they fail with a 5xx (the fuzz found it against real backends).
            failure = {"error": {"code": 500, "type": "server_error", "message":
                                 "invalid string: lone UTF-16 surrogate"}}
            return web.json_response(failure, status=500)
        scenario = self._queue.popleft() if self._queue else None
        try:
            model = body.get("model")
            if (
                scenario is None
                and body.get("stream") is True
                and isinstance(model, str)
                and model.startswith("bench")
            ):
                return await self._bench_stream(request, record, body, model)
            return await self._play(request, record, self._plan(scenario, body))
        except asyncio.CancelledError:
            if record.finished_at is None and record.disconnected_at is None:
                record.disconnected_at = time.monotonic()
            raise

    # -- planning an answer

    def _plan(self, scenario: Scenario | None, body: dict[str, Any]) -> _Plan:
        s = scenario if scenario is not None else Scenario()
        stream = body.get("stream") is True
        headers = dict(s.headers)
        if s.raw is not None:
            return self._bytes_plan(s, headers, _cut([s.raw], s.split), s.content_type, None)
        if s.body is not None:
            if isinstance(s.body, dict):
                data = _dumps(s.body)
                ctype = "application/json" if s.content_type == SSE_CONTENT_TYPE else s.content_type
            else:
                data, ctype = s.body, s.content_type
            return self._bytes_plan(s, headers, _cut([data], s.split), ctype, len(data))
        if s.status != 200:
            return self._json_plan(s, headers, _error_body(s.status))
        if s.chunks is not None:
            return self._sse_plan(s, headers, s.chunks)

        status, extra_headers, chunks = self._default_answer(body, stream)
        headers = {**extra_headers, **headers}
        if status != 200:
            plan = self._json_plan(s, headers, _error_body(status, str(body.get("model"))))
            plan.status = status
            return plan
        if not stream:
            return self._json_plan(s, headers, completion_from_chunks(chunks))
        plan = self._sse_plan(s, headers, chunks)
        if scenario is None:
            plan.delay = self.interval_ms / 1000.0
        return plan

    def _json_plan(self, s: Scenario, headers: dict[str, str], obj: dict[str, Any]) -> _Plan:
        data = _dumps(obj)
        return self._bytes_plan(s, headers, _cut([data], s.split), "application/json", len(data))

    def _sse_plan(
        self, s: Scenario, headers: dict[str, str], chunks: Sequence[dict[str, Any]]
    ) -> _Plan:
        events = _sse_events(
            chunks, send_done=s.send_done, crlf=s.crlf, keepalive_comments=s.keepalive_comments
        )
        return self._bytes_plan(s, headers, _cut(events, s.split), s.content_type, None)

    @staticmethod
    def _bytes_plan(
        s: Scenario,
        headers: dict[str, str],
        pieces: list[bytes],
        content_type: str,
        content_length: int | None,
    ) -> _Plan:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = content_type
        return _Plan(
            status=s.status,
            headers=headers,
            pieces=pieces,
            content_length=content_length,
            delay=s.delay,
            first_byte_delay=s.first_byte_delay,
            stall_after=s.stall_after,
            reset_after=s.reset_after,
        )

    def _default_answer(
        self, body: dict[str, Any], stream: bool
    ) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
        """(status, extra headers, chunks) of the built-in behaviour for the request's model."""
        model = body.get("model")
        model = model if isinstance(model, str) else "mock"
        error = _ERROR_MODEL.match(model)
        if error:
            status = int(error.group(1))
            return status, ({"Retry-After": "2"} if status == 429 else {}), []

        messages = body.get("messages")
        if not isinstance(messages, list):
            messages = []
        messages = [m for m in messages if isinstance(m, dict)]
        options = body.get("stream_options")
        include_usage = not stream or (
            isinstance(options, dict) and options.get("include_usage") is True
        )
        prompt = _prompt_words(messages)
        limit = _token_limit(body)
        meta: dict[str, Any] = {
            "model": model,
            "completion_id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
        }

        def capped(pieces: list[str]) -> tuple[list[str], str]:
            if limit is not None and limit < len(pieces):
                return pieces[:limit], "length"
            return pieces, "stop"

        if model.startswith("bench"):
            pieces, finish = capped([f" w{i}" for i in range(self.bench_tokens)])
            usage = usage_dict(prompt, len(pieces)) if include_usage else None
            return 200, {}, text_chunks(pieces, finish_reason=finish, usage=usage, **meta)

        if model == "mock-tools":
            last = messages[-1] if messages else {}
            tools = body.get("tools")
            if last.get("role") != "tool" and isinstance(tools, list) and tools:
                name, arguments = _pick_call(tools, messages)
                call = (f"call_{uuid.uuid4().hex[:24]}", name, arguments)
                usage = usage_dict(prompt, len(arguments) // 4 + 1) if include_usage else None
                return 200, {}, tool_call_chunks([call], usage=usage, **meta)
            if last.get("role") == "tool":
                answer = f"The tool returned: {_text_of(last.get('content'))}"
                pieces, finish = capped(_split_words(answer))
                usage = usage_dict(prompt, len(pieces)) if include_usage else None
                return 200, {}, text_chunks(pieces, finish_reason=finish, usage=usage, **meta)

        if model == "mock-refusal":
            pieces, finish = capped(_split_words("I'm sorry, but I can't help with that."))
            usage = usage_dict(prompt, len(pieces)) if include_usage else None
            return 200, {}, refusal_chunks(pieces, finish_reason=finish, usage=usage, **meta)

        said = self._echo_text(messages)
        if model == "mock-reasoning":
            tools = body.get("tools")
            if isinstance(tools, list) and tools:
                return 200, {}, self._reasoning_tools(messages, tools, prompt, include_usage,
                                                      meta)
            thought = _split_words(f"The user wrote {prompt} words; I will repeat them back.")
            pieces, finish = capped(thought + _split_words(said))
            reasoning, text = pieces[: len(thought)], pieces[len(thought) :]
            usage = (
                usage_dict(prompt, len(pieces), reasoning=len(reasoning)) if include_usage else None
            )
            return 200, {}, reasoning_chunks(
                reasoning, text, finish_reason=finish, usage=usage, **meta
            )

        pieces, finish = capped(_split_words(said))
        usage = usage_dict(prompt, len(pieces)) if include_usage else None
        return 200, {}, text_chunks(pieces, finish_reason=finish, usage=usage, **meta)

    @staticmethod
    def _reasoning_tools(messages: list[dict[str, Any]], tools: list[Any], prompt: int,
                         include_usage: bool, meta: dict[str, Any]) -> list[dict[str, Any]]:
        """A thinking model with tools: think, then call a tool (the one `mock-tools` would call:
        see `_pick_call`); after a tool result, think again and answer with it. Each thought
        says how many earlier thoughts came back on assistant messages (`reasoning_content` or
        `reasoning`), so a client can see that its reasoning made the round trip."""
        last = messages[-1] if messages else {}
        recalled = sum(1 for m in messages if m.get("role") == "assistant"
                       and (m.get("reasoning_content") or m.get("reasoning")))
        if last.get("role") == "tool":
            thought = _split_words(f"I recall {recalled} earlier thoughts. The tool answered; "
                                   "I can reply now.")
            text = _split_words(f"The tool returned: {_text_of(last.get('content'))}")
            calls: list[tuple[str, str, str]] = []
        else:
            name, arguments = _pick_call(tools, messages)
            thought = _split_words(f"I recall {recalled} earlier thoughts. I need the tool "
                                   f"{name} first.")
            text = []
            calls = [(f"call_{uuid.uuid4().hex[:24]}", name, arguments)]
        produced = len(thought) + len(text) + 4 * len(calls)
        usage = usage_dict(prompt, produced, reasoning=len(thought)) if include_usage else None
        return reasoning_chunks(thought, text, calls=calls, usage=usage, **meta)

    @staticmethod
    def _echo_text(messages: list[dict[str, Any]]) -> str:
        for message in reversed(messages):
            if message.get("role") == "user":
                return f"You said: {_text_of(message.get('content'))}"
        return "You said: "

    # -- writing an answer

    async def _sleep(self, request: web.BaseRequest, seconds: float) -> bool:
        """Sleep, polling for the client going away; True if it went away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not _client_gone(request):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(remaining, _POLL_S))
        return True

    async def _stall(self, request: web.BaseRequest) -> bool:
        """Wait until the client goes away (True) or the server shuts down (False)."""
        while not _client_gone(request):
            if self._closing:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    @staticmethod
    async def _reset(request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None:
            return
        # Let what was written reach the kernel first, so the client sees those bytes.
        for _ in range(100):
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.001)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Zero linger turns the close into a TCP RST rather than an orderly FIN.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _play(
        self, request: web.Request, record: RecordedRequest, plan: _Plan
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=plan.status, headers=plan.headers)
        if plan.content_length is not None:
            response.content_length = plan.content_length
        try:
            if plan.first_byte_delay > 0 and await self._sleep(request, plan.first_byte_delay):
                record.disconnected_at = time.monotonic()
                return response
            await response.prepare(request)
            count = len(plan.pieces)
            for i in range(count + 1):
                if plan.reset_after is not None and i >= plan.reset_after:
                    await self._reset(request)
                    record.finished_at = time.monotonic()
                    return response
                if plan.stall_after is not None and i >= plan.stall_after:
                    if await self._stall(request):
                        record.disconnected_at = time.monotonic()
                    else:
                        # Server shutting down: cut the stream rather than end it cleanly.
                        await self._reset(request)
                    return response
                if i == count:
                    break
                if i and plan.delay > 0 and await self._sleep(request, plan.delay):
                    record.disconnected_at = time.monotonic()
                    return response
                await response.write(plan.pieces[i])
            await response.write_eof()
            record.finished_at = time.monotonic()
        except ConnectionError:
            record.disconnected_at = time.monotonic()
        return response

    async def _bench_stream(
        self, request: web.Request, record: RecordedRequest, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """The benchmark stream: pre-built events, batched writes when unpaced."""
        limit = _token_limit(body)
        count = self.bench_tokens if limit is None else min(self.bench_tokens, limit)
        finish = "length" if count < self.bench_tokens else "stop"
        completion_id = f"chatcmpl-bench{next(self._ids)}"
        created = int(time.time())
        prefix = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            completion_id.encode(),
            created,
            _dumps(model),
        )
        head = prefix + b'"choices":[{"index":0,"delta":{"content":"'
        first = prefix + _dumps({"choices": [_ROLE_CHOICE]})[1:] + b"\n\n"
        last = prefix + _dumps({"choices": [_finish_choice(finish)]})[1:] + b"\n\n"
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            usage = usage_dict(_prompt_words(body.get("messages")), count)
            last += prefix + b'"choices":[],"usage":' + _dumps(usage) + b"}\n\n"
        last += _DONE
        tails = self._bench_tails
        interval = self.interval_ms / 1000.0

        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        try:
            await response.prepare(request)
            if interval <= 0:
                batch = first
                for start in range(0, count, _BENCH_BATCH):
                    # `head.join` puts the head before every tail but the first: add that one.
                    batch += head + head.join(tails[start : min(start + _BENCH_BATCH, count)])
                    await response.write(batch)
                    batch = b""
                await response.write_eof(batch + last)
            else:
                loop = asyncio.get_running_loop()
                # Absolute deadlines keep the token rate exact whatever each write costs.
                start_time = loop.time()
                await response.write(first)
                for i in range(count):
                    if i:
                        wait = start_time + i * interval - loop.time()
                        if wait > 0 and await self._sleep(request, wait):
                            record.disconnected_at = time.monotonic()
                            return response
                    await response.write(head + tails[i])
                await response.write_eof(last)
            record.finished_at = time.monotonic()
        except ConnectionError:
            record.disconnected_at = time.monotonic()
        return response


# The app's mock, for code that only holds the application (e.g. a test server).
MOCK_UPSTREAM_KEY = web.AppKey("orp_mock_upstream", MockUpstream)


# --------------------------------------------------------------------------- running


async def start_mock_upstream(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    interval_ms: float = 0.0,
    bench_tokens: int = 256,
) -> tuple[MockUpstream, web.AppRunner, str]:
    """Start a mock on `host:port` (0: any free port); return it, its runner (call
    `cleanup()` to stop) and its base URL ending in /v1."""
    mock = MockUpstream(interval_ms=interval_ms, bench_tokens=bench_tokens)
    runner = web.AppRunner(mock.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)  # bursts of 1000 connects in benches
    await site.start()
    bound_port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return mock, runner, f"http://{shown}:{bound_port}/v1"


async def _serve(host: str, port: int, interval_ms: float, bench_tokens: int) -> None:
    _, runner, url = await start_mock_upstream(
        host, port, interval_ms=interval_ms, bench_tokens=bench_tokens
    )
    print(f"mock upstream listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Command line: serve the mock until interrupted (on uvloop when installed)."""
    parser = argparse.ArgumentParser(description="Scripted Chat Completions mock upstream.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (0: any)")
    parser.add_argument(
        "--interval-ms", type=float, default=0.0, help="pause between streamed tokens (ms)"
    )
    parser.add_argument(
        "--bench-tokens", type=int, default=256, help="tokens in a bench* model's answer"
    )
    args = parser.parse_args(argv)
    if args.bench_tokens < 0 or args.interval_ms < 0:
        parser.error("--bench-tokens and --interval-ms must not be negative")
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args.host, args.port, args.interval_ms, args.bench_tokens))


if __name__ == "__main__":
    main(sys.argv[1:])
