"""The request surface: every field of the `openai` SDK's `ResponseCreateParams` (HTTP) and
`response.create` (WebSocket) has a treatment, and the validator does what the treatment says
for every value the SDK's types allow.

The walk reads the SDK's TypedDicts, so a field (or an enum value) added by a future SDK fails
here, not in a client. `surface_fields.FIELDS` is the table; the README's "Request fields"
table must say the same.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import re
import types
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import typing_extensions
from openai.types.responses import response_create_params, responses_client_event_param

from orp_proxy.config import Settings
from orp_proxy.errors import ApiError
from orp_proxy.protocol.validation import validate_create_body
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, usage_dict
from tests.conftest import Proxy
from tests.surface_fields import ACCEPTED_ONLY, ALWAYS_REFUSED, FIELDS, OPAQUE

README = Path(__file__).resolve().parent.parent / "README.rst"

# In the table but in no SDK type: the spec's penalties, Codex's labels, the beta multi_agent.
NOT_IN_SDK = {"presence_penalty", "frequency_penalty", "client_metadata", "multi_agent",
              "multi_agent.enabled", "multi_agent.max_concurrent_subagents"}
# Too wide to sample here; each has its own tests (test_validation, the tools' tests).
NOT_SAMPLED = {"input", "tools", "tool_choice"}
WEBSOCKET_ONLY = {"type", "generate", "stream_id"}
# Valid over HTTP, refused on a socket (it always streams; the spec forbids background there).
WEBSOCKET_REFUSED = {"stream": frozenset({False}), "background": frozenset({True})}

_MISSING = object()


def _strip(tp: Any) -> Any:
    """The type without Annotated / Required / NotRequired wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin in (typing.Required, typing.NotRequired, typing.Annotated):
            tp = typing.get_args(tp)[0]
        else:
            return tp


def _members(tp: Any) -> list[Any]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _is_typeddict(tp: Any) -> bool:
    # The SDK's TypedDicts come from typing_extensions, which typing.is_typeddict misses.
    return isinstance(tp, type) and typing_extensions.is_typeddict(tp)


def _hints(td: Any) -> dict[str, Any]:
    return typing.get_type_hints(td, include_extras=True)


def _sequence_element(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
        return typing.get_args(tp)[0]
    return _MISSING


def walk(td: Any, prefix: str = "") -> dict[str, Any]:
    """Every field path under TypedDict `td` → its annotation (`[]` for array entries)."""
    found: dict[str, Any] = {}
    for key, annotation in _hints(td).items():
        path = f"{prefix}{key}"
        found[path] = annotation
        if path in OPAQUE:
            continue
        for member in _members(annotation):
            element = _sequence_element(member)
            if element is not _MISSING:
                for inner in _members(element):
                    if _is_typeddict(inner):
                        found.update(walk(inner, f"{path}[]."))
            elif _is_typeddict(member):
                found.update(walk(member, f"{path}."))
    return found


def _required(td: Any) -> list[str]:
    # `__required_keys__` is empty when the SDK's annotations are strings (`from __future__
    # import annotations`): read the `Required[...]` markers instead.
    hints = _hints(td)
    return [key for key, tp in hints.items()
            if typing.get_origin(tp) is typing.Required
            or (td.__total__ and typing.get_origin(tp) is not typing.NotRequired)]


def _minimal(td: Any) -> dict[str, Any]:
    """An instance of TypedDict `td` with only its required keys (first sample of each)."""
    # `{}` stands in for types the sampler does not know (`object`).
    return {key: (samples(_hints(td)[key]) or [{}])[0] for key in _required(td)}


def samples(tp: Any) -> list[Any]:
    """Values of type `tp` to try: every literal, both booleans, null if allowed, ..."""
    values: list[Any] = []
    for member in _members(tp):
        origin = typing.get_origin(member)
        if member is type(None):
            values.append(None)
        elif origin is typing.Literal:
            values.extend(typing.get_args(member))
        elif member is bool:
            values.extend([True, False])
        elif member is int:
            values.append(16)
        elif member is float:
            values.append(0.5)
        elif member is str:
            values.append("x")
        elif _is_typeddict(member):
            values.append(_minimal(member))
        elif _sequence_element(member) is not _MISSING:
            values.extend([[value] for value in samples(_sequence_element(member))
                           if value is not None])
        elif origin in (dict, collections.abc.Mapping) or member is dict:
            values.append({})
    return values


HTTP_FIELDS = walk(response_create_params.ResponseCreateParamsBase)
HTTP_FIELDS.update(walk(response_create_params.ResponseCreateParamsStreaming))
# `stream: false | null` (the non-streaming variant) as well as `true`.
HTTP_FIELDS["stream"] = bool | None
WS_FIELDS = walk(responses_client_event_param.ResponseCreate)


def test_every_sdk_field_has_a_treatment() -> None:
    missing = sorted((set(HTTP_FIELDS) | set(WS_FIELDS)) - set(FIELDS))
    assert not missing, f"SDK fields without a treatment (add them to surface_fields): {missing}"


def test_no_stale_entries() -> None:
    stale = set(FIELDS) - set(HTTP_FIELDS) - set(WS_FIELDS) - NOT_IN_SDK
    assert not stale


def test_the_walk_reaches_nested_fields() -> None:
    # Guards the walk itself: without these it would pass on an empty SDK.
    assert {"reasoning.effort", "reasoning.context", "text.verbosity",
            "prompt_cache_options.prewarm", "context_management[].compact_threshold",
            "stream_options.include_obfuscation"} <= set(HTTP_FIELDS)
    assert {"generate", "stream_id", "type"} <= set(WS_FIELDS)


def _container(annotation: Any) -> tuple[Any, bool]:
    """The TypedDict inside a field's annotation, and whether it is an array of them."""
    for member in _members(annotation):
        if _is_typeddict(member):
            return member, False
        element = _sequence_element(member)
        if element is not _MISSING:
            for inner in _members(element):
                if _is_typeddict(inner):
                    return inner, True
    raise AssertionError(f"no object type in {annotation}")


def _body(path: str, value: Any, fields: dict[str, Any], *, websocket: bool) -> dict[str, Any]:
    """A request body that sets `path` to `value` (parents built minimally)."""
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    if websocket:
        body["type"] = "response.create"
    elif path != "stream":
        body["stream"] = True  # so that stream_options is allowed
    parts = path.split(".")
    node = body
    prefix = ""
    for part in parts[:-1]:
        key = part.removesuffix("[]")
        td, is_array = _container(fields[prefix + key])
        child = _minimal(td)
        node[key] = [child] if is_array else child
        node = child
        prefix += part + "."
    node[parts[-1]] = value
    return body


def _refused(path: str, value: Any, *, websocket: bool) -> bool:
    if any(path.startswith((f"{r}.", f"{r}[]")) for r in ALWAYS_REFUSED):
        return True  # the parent object is there, whatever this field holds
    if value is None:
        return False
    if path in ALWAYS_REFUSED:
        return True
    if websocket and value in WEBSOCKET_REFUSED.get(path, ()):
        return True
    accepted = ACCEPTED_ONLY.get(path)
    return accepted is not None and value not in accepted


def _cases(fields: dict[str, Any], websocket: bool) -> list[Any]:
    cases = []
    for path, annotation in sorted(fields.items()):
        if path.split(".")[0].split("[")[0] in NOT_SAMPLED:
            continue
        if not websocket and path in WEBSOCKET_ONLY:
            continue
        for value in samples(annotation):
            cases.append(pytest.param(path, value, websocket, id=f"{path}={value!r}"[:90]))
    return cases


@pytest.mark.parametrize(("path", "value", "websocket"),
                         _cases(HTTP_FIELDS, False) + _cases(WS_FIELDS, True))
def test_every_sdk_value_gets_its_treatment(path: str, value: Any, websocket: bool) -> None:
    fields = WS_FIELDS if websocket else HTTP_FIELDS
    body = _body(path, value, fields, websocket=websocket)
    if _refused(path, value, websocket=websocket):
        with pytest.raises(ApiError) as info:
            validate_create_body(body, websocket=websocket)
        assert info.value.status == 400 and info.value.code == "unsupported_parameter"
        assert info.value.param is not None
        assert info.value.param.split(".")[0].split("[")[0] == path.split(".")[0].split("[")[0]
    else:
        try:
            validate_create_body(body, websocket=websocket)
        except ApiError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{path}={value!r} refused: {exc.code} {exc.param}: {exc}")


def test_null_means_absent_for_every_optional_field() -> None:
    nullable = [path for path, annotation in HTTP_FIELDS.items()
                if "." not in path and "[" not in path and type(None) in _members(annotation)]
    assert {"include", "user", "instructions", "metadata", "store", "stream", "background",
            "service_tier", "truncation", "conversation", "prompt", "moderation",
            "context_management", "prompt_cache_retention"} <= set(nullable) | {"user"}
    body = {"model": "m", "input": "hi", **dict.fromkeys(nullable), "user": None}
    assert validate_create_body(body) is body


def _readme_table() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("Request fields\n--------------", 1)[1].split("\n\n\n", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"``([a-z_.\[\]]+)``\s{2,}(translated|honoured|no effect|refused)\b",
                         line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_readme_table_matches() -> None:
    assert _readme_table() == {path: treatment for path, (treatment, _) in FIELDS.items()}


# -- end to end: what the upstream gets and what the client sees -------------------------------


LLAMAINDEX_BODY = {  # every request of LlamaIndex's OpenAIResponses (llama-index-llms-openai 0.8)
    "include": None, "instructions": None, "max_output_tokens": None, "metadata": None,
    "model": "m", "previous_response_id": None, "store": False, "stream": False, "tools": [],
    "truncation": "disabled", "user": None, "input": [{"role": "user", "content": "hi"}],
}


async def test_explicit_nulls_are_absent(proxy: Proxy, mock: MockUpstream) -> None:
    status, _, data = await proxy.post(LLAMAINDEX_BODY)
    assert status == 200, data
    response = json.loads(data)
    assert response["status"] == "completed" and response["metadata"] == {}
    assert set(mock.requests[0].body) == {"model", "messages", "stream", "stream_options"}


async def test_forwarded_fields_reach_the_upstream(proxy: Proxy, mock: MockUpstream) -> None:
    status, _, data = await proxy.post({
        "model": "m", "input": "hi", "prompt_cache_key": "thread-1", "safety_identifier": "u-9",
        "user": "alice", "service_tier": "flex", "text": {"verbosity": "low"},
        "client_metadata": {"turn_id": "t"}, "prompt_cache_retention": "24h",
        "reasoning": {"effort": "max", "context": "all_turns"}, "truncation": "auto"})
    assert status == 200, data
    sent = mock.requests[0].body
    assert {k: sent.get(k) for k in ("prompt_cache_key", "safety_identifier", "user",
                                     "service_tier", "verbosity", "reasoning_effort")} == {
        "prompt_cache_key": "thread-1", "safety_identifier": "u-9", "user": "alice",
        "service_tier": "flex", "verbosity": "low", "reasoning_effort": "max"}
    for absent in ("client_metadata", "prompt_cache_retention", "truncation", "reasoning"):
        assert absent not in sent
    response = json.loads(data)
    # Asked for flex, the upstream reported no tier: the echo says what is known.
    assert response["service_tier"] == "default"
    assert response["prompt_cache_key"] == "thread-1"


async def test_verbosity_not_forwarded_is_not_echoed(
        start_proxy: Callable[[Settings], Awaitable[Proxy]], settings: Settings,
        mock: MockUpstream) -> None:
    """ORP_UPSTREAM_FORWARD without verbosity: the echo does not claim a verbosity."""
    proxy = await start_proxy(dataclasses.replace(
        settings, forward_fields=frozenset({"user"})))
    status, _, data = await proxy.post({"model": "m", "input": "hi",
                                        "text": {"verbosity": "low"}})
    assert status == 200, data
    assert "verbosity" not in mock.requests[0].body
    assert "verbosity" not in json.loads(data)["text"]
    # Forwarded (the default), it is echoed.
    status, _, data = await (await start_proxy(settings)).post(
        {"model": "m", "input": "hi", "text": {"verbosity": "low"}})
    assert json.loads(data)["text"]["verbosity"] == "low"


@pytest.mark.parametrize("stream", [False, True])
async def test_service_tier_echo_is_what_the_upstream_reports(
        proxy: Proxy, mock: MockUpstream, stream: bool) -> None:
    chunks = text_chunks(["ok"], usage=usage_dict(2, 1))
    for chunk in chunks:
        chunk["service_tier"] = "priority"
    mock.enqueue(Scenario(chunks=chunks))
    body = {"model": "m", "input": "hi", "service_tier": "fast"}
    if stream:
        events, _ = await proxy.stream(body)
        response = events[-1]["response"]
    else:
        status, _, data = await proxy.post(body)
        assert status == 200, data
        response = json.loads(data)
    assert response["service_tier"] == "priority"


@pytest.mark.parametrize(("field", "value", "param"), [
    ("conversation", "conv_1", "conversation"),
    ("conversation", {"id": "conv_1"}, "conversation"),
    ("prompt", {"id": "pmpt_1"}, "prompt"),
    ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
    ("context_management", [{"type": "compaction", "compact_threshold": 1000}],
     "context_management[0]"),
    ("reasoning", {"mode": "pro"}, "reasoning.mode"),
    ("image", {"context_compression": "enabled"}, "image.context_compression"),
])
async def test_refused_fields_name_themselves(proxy: Proxy, mock: MockUpstream, field: str,
                                              value: Any, param: str) -> None:
    status, _, data = await proxy.post({"model": "m", "input": "hi", field: value})
    error = json.loads(data)["error"]
    assert (status, error["code"], error["param"]) == (400, "unsupported_parameter", param)
    assert mock.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_prewarm_over_http_is_a_continuable_warm_up(proxy: Proxy, mock: MockUpstream,
                                                          stream: bool) -> None:
    body = {"model": "m", "instructions": "Be brief.", "input": "I am Ada.",
            "prompt_cache_options": {"prewarm": True, "ttl": "30m"}}
    if stream:
        events, done = await proxy.stream(body)
        assert done and [e["type"] for e in events] == [
            "response.created", "response.in_progress", "response.completed"]
        warm = events[-1]["response"]
    else:
        status, _, data = await proxy.post(body)
        assert status == 200, data
        warm = json.loads(data)
    assert warm["status"] == "completed" and warm["output"] == []
    assert mock.requests == []
    status, _, data = await proxy.post({"model": "m", "input": "Who am I?",
                                        "previous_response_id": warm["id"]})
    assert status == 200, data
    assert [m["content"] for m in mock.requests[0].body["messages"]] == ["I am Ada.",
                                                                          "Who am I?"]


async def test_generate_summary_is_the_old_name_of_summary(proxy: Proxy,
                                                          mock: MockUpstream) -> None:
    del mock
    events, done = await proxy.stream({"model": "mock-reasoning", "input": "hello",
                                       "reasoning": {"generate_summary": "concise"}})
    assert done
    assert "response.reasoning_summary_text.delta" in [e["type"] for e in events]
    assert events[-1]["response"]["reasoning"]["summary"] == "concise"


def _item_types() -> dict[str, Any]:
    """Every input item `type` of the SDK's `ResponseInputItemParam` → one of its TypedDicts."""
    from openai.types.responses import response_input_item_param

    found: dict[str, Any] = {}
    for member in _members(response_input_item_param.ResponseInputItemParam):
        kind = _hints(member).get("type")
        for value in samples(kind) if kind is not None else []:
            if isinstance(value, str):
                found.setdefault(value, member)
    return found


SDK_ITEM_TYPES = _item_types()


def test_the_item_walk_finds_the_sdk_items() -> None:
    assert {"message", "function_call_output", "web_search_call", "compaction_trigger",
            "custom_tool_call"} <= set(SDK_ITEM_TYPES)


@pytest.mark.parametrize("kind", sorted(SDK_ITEM_TYPES))
def test_every_sdk_item_type_is_taken_or_refused_by_name(kind: str) -> None:
    """A new item type in a future SDK fails here until it is translated or refused clearly."""
    item = {**_minimal(SDK_ITEM_TYPES[kind]), "type": kind}
    try:
        validate_create_body({"model": "m", "input": [item]})
    except ApiError as exc:
        # Accepted types can still refuse this minimal sample on another field; what must not
        # happen is "invalid value" for the type itself.
        if exc.param == "input[0].type":
            assert exc.code == "unsupported_parameter", str(exc)
            assert "Unsupported item type" in str(exc)
