"""Tests for orp_proxy.protocol.validation: valid bodies pass untouched, invalid ones fail with a
400 naming the exact path and an OpenAI-style code."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orp_proxy.errors import ApiError
from orp_proxy.protocol.validation import (
    DEFAULT_LIMITS,
    RequestLimits,
    validate_compact_body,
    validate_create_body,
    validate_input_items,
)

# ---------------------------------------------------------------------------------------------
# Helpers


DROP = object()  # as a field value: leave the key out


def body(**fields: Any) -> dict[str, Any]:
    """A minimal valid create body with `fields` merged in (a value of DROP removes the key)."""
    result: dict[str, Any] = {"model": "gpt-test", "input": "hello"}
    for key, value in fields.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def items(*entries: Any, **fields: Any) -> dict[str, Any]:
    """A create body whose input is `entries`."""
    return body(input=list(entries), **fields)


def user(content: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": content}


def assistant(content: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": content, **extra}


def fn_tool(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "name": name, **extra}


def nested(depth: int) -> dict[str, Any]:
    """A JSON-schema-like object whose nesting depth is exactly `depth`."""
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        node = {"type": "array", "items": node}
    return node


def deep_object(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth - 1):
        node = {"a": node}
    return node


def expect_error(
    payload: object, *, websocket: bool = False, limits: RequestLimits = DEFAULT_LIMITS
) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate_create_body(payload, websocket=websocket, limits=limits)
    error = info.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    return error


FUNCTION_CALL = {
    "type": "function_call",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": '{"city": "Paris"}',
}
FUNCTION_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
REASONING = {"type": "reasoning", "summary": []}
COMPACTION = {"type": "compaction", "encrypted_content": "opaque"}
TOOLS = [fn_tool("get_weather"), fn_tool("send_email")]

# ---------------------------------------------------------------------------------------------
# Valid bodies


SPEC_WEBSOCKET_CREATE = {
    "type": "response.create",
    "model": "gpt-openresponses-1",
    "store": False,
    "input": [{"type": "message", "role": "user", "content": "Find the bug in fizz_buzz()."}],
    "tools": [],
}

SPEC_WEBSOCKET_CONTINUE = {
    "type": "response.create",
    "model": "gpt-openresponses-1",
    "store": False,
    "previous_response_id": "resp_123",
    "input": [
        {"type": "function_call_output", "call_id": "call_123", "output": "tool result"},
        {"type": "message", "role": "user", "content": "Now optimize it."},
    ],
}

SPEC_ALLOWED_TOOLS = {
    "model": "gpt-openresponses-1",
    "input": [
        {
            "role": "user",
            "content": [
                {
                    "type": "input_text",
                    "text": "Summarize the latest sales data and then draft a follow-up email.",
                }
            ],
        }
    ],
    "tools": [
        {
            "type": "function",
            "name": "get_latest_sales_report",
            "description": "Fetches the most recent sales report for the current quarter.",
            "parameters": {
                "type": "object",
                "properties": {
                    "region": {
                        "type": "string",
                        "description": "Geographic sales region identifier.",
                    }
                },
                "required": ["region"],
            },
        },
        {
            "type": "function",
            "name": "send_email",
            "description": "Sends an email via the CRM.",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string"},
                    "subject": {"type": "string"},
                    "body": {"type": "string"},
                },
                "required": ["to", "subject", "body"],
            },
        },
    ],
    "tool_choice": {
        "type": "allowed_tools",
        "tools": [{"type": "function", "name": "get_latest_sales_report"}],
    },
}

SPEC_TOOL_CHOICE = {
    "model": "m",
    "input": "call it",
    "tools": [fn_tool("fn_name")],
    "tool_choice": {"type": "function", "name": "fn_name"},
}

SPEC_MESSAGE_ITEM = {
    "type": "message",
    "id": "msg_01A2B3C4D5E6F7G8H9I0J1K2L3M4N5O6",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Hello! How can I assist you today?"}],
}

EVERY_FIELD = {
    "model": "gpt-test",
    "input": [
        {"type": "message", "role": "developer", "content": "Be terse."},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "sys"}]},
        {
            "type": "message",
            "id": "msg_in",
            "status": "completed",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in these?"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "high"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": None},
                {"type": "input_file", "filename": "a.pdf", "file_data": "data:...;base64,AA"},
                {"type": "input_file", "file_url": "https://example.com/b.pdf"},
            ],
        },
        assistant(
            [
                {
                    "type": "output_text",
                    "text": "See [1].",
                    "annotations": [
                        {
                            "type": "url_citation",
                            "start_index": 4,
                            "end_index": 7,
                            "url": "https://example.com",
                            "title": "Example",
                        }
                    ],
                    "logprobs": [
                        {"token": "See", "logprob": -0.1, "bytes": [83], "top_logprobs": []}
                    ],
                },
                {"type": "refusal", "refusal": "No."},
            ],
            id="msg_out",
            status="incomplete",
            phase="final_answer",
        ),
        assistant("plain string content", phase="commentary"),
        {**FUNCTION_CALL, "id": "fc_1", "status": "completed"},
        {
            "type": "function_call_output",
            "id": "fco_1",
            "call_id": "call_1",
            "status": "completed",
            "output": [
                {"type": "input_text", "text": "result"},
                {"type": "input_image", "image_url": "https://example.com/c.png"},
                {"type": "input_file", "file_data": "AAAA"},
                {"type": "input_video", "video_url": "https://example.com/v.mp4"},
            ],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Thought about it."}],
            "content": [{"type": "reasoning_text", "text": "step 1"}],
            "encrypted_content": "gAAAA",
            "status": "completed",
        },
        {"type": "reasoning", "summary": [], "content": None, "encrypted_content": None},
        {"type": "item_reference", "id": "msg_123"},
        {"type": None, "id": "msg_456"},
        {"id": "msg_789"},
        {"type": "compaction", "id": "cmp_1", "encrypted_content": "opaque", "created_by": "m"},
        {"role": "user", "content": "easy message"},
    ],
    "previous_response_id": "resp_123",
    "include": ["reasoning.encrypted_content", "message.output_text.logprobs"],
    "tools": [
        fn_tool(
            "get_weather",
            description="Weather for a city.",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
            strict=True,
        ),
        fn_tool("send_email", description=None, parameters=None, strict=None),
        fn_tool("noop"),
    ],
    "tool_choice": {
        "type": "allowed_tools",
        "tools": [{"type": "function", "name": "get_weather"}],
        "mode": "required",
    },
    "metadata": {"user": "u_1", "k" * 64: "v" * 512},
    "text": {
        "format": {
            "type": "json_schema",
            "name": "weather-Report_1",
            "description": "A report.",
            "schema": {"type": "object", "properties": {"t": {"type": "number"}}},
            "strict": True,
        },
        "verbosity": "low",
    },
    "temperature": 0.2,
    "top_p": 1,
    "presence_penalty": -2,
    "frequency_penalty": 2.0,
    "parallel_tool_calls": False,
    "stream": True,
    "stream_options": {"include_obfuscation": False},
    "background": False,
    "max_output_tokens": 16,
    "max_tool_calls": 1,
    "reasoning": {"effort": "xhigh", "summary": "detailed"},
    "safety_identifier": "s" * 64,
    "prompt_cache_key": "cache-1",
    "truncation": "disabled",
    "instructions": "You are helpful.",
    "store": True,
    "service_tier": "flex",
    "top_logprobs": 20,
}

VALID_BODIES = [
    pytest.param(body(), id="minimal"),
    pytest.param({"input": "no model is fine"}, id="no-model"),
    pytest.param(body(model=None), id="null-model"),
    pytest.param(body(input=""), id="empty-string-input"),
    pytest.param({"previous_response_id": "resp_1"}, id="previous-response-only"),
    pytest.param(body(input=[], previous_response_id="resp_1"), id="empty-list-with-previous"),
    pytest.param(body(input=None, previous_response_id="resp_1"), id="null-input-with-previous"),
    pytest.param(SPEC_ALLOWED_TOOLS, id="spec-allowed-tools"),
    pytest.param(SPEC_TOOL_CHOICE, id="spec-tool-choice-function"),
    pytest.param(items(SPEC_MESSAGE_ITEM), id="spec-message-item"),
    pytest.param(EVERY_FIELD, id="every-field"),
    pytest.param(items({"role": "user", "content": "hi"}), id="easy-message"),
    pytest.param(items({"role": "assistant", "content": "hi"}), id="easy-assistant"),
    pytest.param(items({"type": None, "role": "user", "content": "hi"}), id="null-type-message"),
    pytest.param(items(user([])), id="empty-content-list"),
    pytest.param(items(FUNCTION_CALL, FUNCTION_OUTPUT), id="tool-round"),
    pytest.param(items({**FUNCTION_CALL, "arguments": ""}), id="empty-arguments"),
    pytest.param(items({**FUNCTION_OUTPUT, "output": []}), id="empty-output-list"),
    pytest.param(items(REASONING), id="reasoning-minimal"),
    pytest.param(items(COMPACTION), id="compaction-minimal"),
    pytest.param(items({**COMPACTION, "id": None, "created_by": None}), id="compaction-nulls"),
    pytest.param(items(assistant("x", phase=None)), id="assistant-null-phase"),
    pytest.param(body(tools=[]), id="empty-tools"),
    pytest.param(body(tools=None, tool_choice=None), id="null-tools"),
    pytest.param(body(tool_choice="none"), id="tool-choice-none"),
    pytest.param(body(tool_choice="auto"), id="tool-choice-auto"),
    pytest.param(body(tools=TOOLS, tool_choice="required"), id="tool-choice-required"),
    pytest.param(
        body(
            tools=TOOLS,
            tool_choice={
                "type": "allowed_tools",
                "tools": [fn_tool("get_weather"), fn_tool("send_email")],
                "mode": "auto",
            },
        ),
        id="allowed-tools-mode",
    ),
    pytest.param(body(text={"format": {"type": "text"}}), id="text-format-text"),
    pytest.param(body(text={"format": {"type": "json_object"}}), id="text-format-json-object"),
    pytest.param(body(text={"format": None}), id="text-format-null"),
    pytest.param(body(text={}), id="text-empty"),
    pytest.param(body(text=None), id="text-null"),
    pytest.param(
        body(text={"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": None}}),
        id="json-schema-minimal",
    ),
    pytest.param(body(reasoning={"effort": None, "summary": None}), id="reasoning-nulls"),
    pytest.param(body(reasoning={"effort": "minimal"}), id="reasoning-minimal-effort"),
    pytest.param(body(reasoning={}), id="reasoning-empty"),
    pytest.param(body(metadata={}), id="metadata-empty"),
    pytest.param(body(metadata=None), id="metadata-null"),
    pytest.param(body(metadata={f"k{i}": "v" for i in range(16)}), id="metadata-16-keys"),
    pytest.param(body(stream=False), id="stream-false"),
    pytest.param(body(stream=False, stream_options=None), id="stream-options-null"),
    pytest.param(body(stream=True, stream_options={}), id="stream-options-empty"),
    pytest.param(
        body(temperature=None, top_p=None, presence_penalty=None, frequency_penalty=None),
        id="null-sampling",
    ),
    pytest.param(body(temperature=0, top_p=0.0, presence_penalty=2), id="sampling-bounds"),
    pytest.param(body(temperature=2), id="temperature-int-max"),
    pytest.param(
        body(max_output_tokens=None, max_tool_calls=None, top_logprobs=None),
        id="null-integers",
    ),
    pytest.param(body(max_output_tokens=10**30), id="huge-max-output-tokens"),
    pytest.param(body(top_logprobs=0), id="top-logprobs-zero"),
    pytest.param(body(include=[]), id="include-empty"),
    pytest.param(
        body(safety_identifier=None, prompt_cache_key=None, instructions=None), id="null-strings"
    ),
    pytest.param(body(safety_identifier="", prompt_cache_key=""), id="empty-short-strings"),
    pytest.param(body(parallel_tool_calls=None), id="parallel-null"),
    pytest.param(body(service_tier="auto", truncation="auto"), id="enums"),
    pytest.param(body(tools=[fn_tool("deep", parameters=nested(64))]), id="schema-depth-64"),
    pytest.param(
        items(user([{"type": "input_image", "image_url": "https://x", "detail": "low"}])),
        id="image-detail-low",
    ),
]


@pytest.mark.parametrize("payload", VALID_BODIES)
def test_valid_bodies_pass_unchanged(payload: dict[str, Any]) -> None:
    snapshot = copy.deepcopy(payload)
    assert validate_create_body(payload) is payload
    assert payload == snapshot


@pytest.mark.parametrize("payload", [SPEC_WEBSOCKET_CREATE, SPEC_WEBSOCKET_CONTINUE])
def test_spec_websocket_examples(payload: dict[str, Any]) -> None:
    assert validate_create_body(payload, websocket=True) is payload


def test_nested_helper_depth() -> None:
    # The schema-depth cases below rely on this helper being exact.
    limits = RequestLimits(max_schema_depth=3)
    validate_create_body(body(tools=[fn_tool("t", parameters=nested(3))]), limits=limits)
    error = expect_error(body(tools=[fn_tool("t", parameters=nested(4))]), limits=limits)
    assert error.param == "tools[0].parameters"


# ---------------------------------------------------------------------------------------------
# Invalid bodies: (payload, param, code)

MANY_ALLOWED = [fn_tool("get_weather")] * 129

INVALID_TOP_LEVEL = [
    # body and unknown keys
    ([], None, "invalid_type"),
    ("hello", None, "invalid_type"),
    (None, None, "invalid_type"),
    (3, None, "invalid_type"),
    (body(foo=1), "foo", "unknown_parameter"),
    (body(messages=[]), "messages", "unknown_parameter"),
    (body(type="response.create"), "type", "unknown_parameter"),
    # model / previous_response_id
    (body(model=5), "model", "invalid_type"),
    (body(model=""), "model", "empty_string"),
    (body(model=["a"]), "model", "invalid_type"),
    (body(previous_response_id=""), "previous_response_id", "empty_string"),
    (body(previous_response_id=7), "previous_response_id", "invalid_type"),
    # input presence and type
    (body(input=DROP), "input", "missing_required_parameter"),
    (body(input=None), "input", "missing_required_parameter"),
    (body(input=[]), "input", "missing_required_parameter"),
    ({}, "input", "missing_required_parameter"),
    (body(input=1), "input", "invalid_type"),
    (body(input={"role": "user", "content": "hi"}), "input", "invalid_type"),
    (body(input=True), "input", "invalid_type"),
    # include
    (body(include="reasoning.encrypted_content"), "include", "invalid_type"),
    (
        body(include=["reasoning.encrypted_content", "file_search_call.result"]),
        "include[1]",
        "invalid_value",
    ),
    (body(include=[1]), "include[0]", "invalid_type"),
    # tools
    (body(tools={}), "tools", "invalid_type"),
    (body(tools=[1]), "tools[0]", "invalid_type"),
    (body(tools=[{"name": "a"}]), "tools[0].type", "missing_required_parameter"),
    (body(tools=[{"type": None, "name": "a"}]), "tools[0].type", "invalid_type"),
    (body(tools=[{"type": "telepathy"}]), "tools[0].type", "invalid_value"),
    (body(tools=[fn_tool("a"), {"type": "mcp_server", "name": "b"}]), "tools[1].type",
     "invalid_value"),
    (body(tools=[{"type": "function"}]), "tools[0].name", "missing_required_parameter"),
    (body(tools=[fn_tool("")]), "tools[0].name", "empty_string"),
    (body(tools=[fn_tool("has space")]), "tools[0].name", "invalid_value"),
    (body(tools=[fn_tool("dot.name")]), "tools[0].name", "invalid_value"),
    (body(tools=[fn_tool("trailing\n")]), "tools[0].name", "invalid_value"),
    (body(tools=[fn_tool("a" * 65)]), "tools[0].name", "string_above_max_length"),
    (body(tools=[{"type": "function", "name": 3}]), "tools[0].name", "invalid_type"),
    (body(tools=[fn_tool("a", description=1)]), "tools[0].description", "invalid_type"),
    (body(tools=[fn_tool("a", parameters=[])]), "tools[0].parameters", "invalid_type"),
    (body(tools=[fn_tool("a", parameters="{}")]), "tools[0].parameters", "invalid_type"),
    (body(tools=[fn_tool("a", strict="yes")]), "tools[0].strict", "invalid_type"),
    (body(tools=[fn_tool("a", strict=1)]), "tools[0].strict", "invalid_type"),
    (body(tools=[fn_tool("a", function={})]), "tools[0].function", "unknown_parameter"),
    (body(tools=[fn_tool("a"), fn_tool("b"), fn_tool("a")]), "tools[2].name", "invalid_value"),
    (body(tools=[fn_tool("d", parameters=nested(65))]), "tools[0].parameters", "invalid_value"),
    (body(tools=[fn_tool(f"t{i}") for i in range(129)]), "tools", "array_above_max_length"),
    # tool_choice
    (body(tool_choice="banana"), "tool_choice", "invalid_value"),
    (body(tool_choice=1), "tool_choice", "invalid_type"),
    (body(tool_choice=["auto"]), "tool_choice", "invalid_type"),
    (
        body(tools=TOOLS, tool_choice={"name": "x"}),
        "tool_choice.type",
        "missing_required_parameter",
    ),
    (body(tools=TOOLS, tool_choice={"type": "file_search"}), "tool_choice.type", "invalid_value"),
    (
        body(tools=TOOLS, tool_choice={"type": "function"}),
        "tool_choice.name",
        "missing_required_parameter",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "function", "name": 1}),
        "tool_choice.name",
        "invalid_type",
    ),
    (body(tools=TOOLS, tool_choice=fn_tool("missing")), "tool_choice.name", "invalid_value"),
    (body(tool_choice=fn_tool("get_weather")), "tool_choice.name", "invalid_value"),
    (
        body(tools=TOOLS, tool_choice=fn_tool("get_weather", x=1)),
        "tool_choice.x",
        "unknown_parameter",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools"}),
        "tool_choice.tools",
        "missing_required_parameter",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools", "tools": []}),
        "tool_choice.tools",
        "array_below_min_length",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools", "tools": MANY_ALLOWED}),
        "tool_choice.tools",
        "array_above_max_length",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools", "tools": "get_weather"}),
        "tool_choice.tools",
        "invalid_type",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools", "tools": [{"type": "function"}]}),
        "tool_choice.tools[0].name",
        "missing_required_parameter",
    ),
    (
        body(tools=TOOLS, tool_choice={"type": "allowed_tools", "tools": [{"name": "send_email"}]}),
        "tool_choice.tools[0].type",
        "missing_required_parameter",
    ),
    (
        body(
            tools=TOOLS,
            tool_choice={"type": "allowed_tools", "tools": [{"type": "custom", "name": "x"}]},
        ),
        "tool_choice.tools[0].name",
        "invalid_value",
    ),
    (
        body(
            tools=TOOLS,
            tool_choice={
                "type": "allowed_tools",
                "tools": [fn_tool("get_weather"), fn_tool("nope")],
            },
        ),
        "tool_choice.tools[1].name",
        "invalid_value",
    ),
    (
        body(
            tools=TOOLS,
            tool_choice={
                "type": "allowed_tools",
                "tools": [fn_tool("get_weather")],
                "mode": "sometimes",
            },
        ),
        "tool_choice.mode",
        "invalid_value",
    ),
    (
        body(
            tools=TOOLS,
            tool_choice={"type": "allowed_tools", "tools": [fn_tool("get_weather")], "mode": None},
        ),
        "tool_choice.mode",
        "invalid_type",
    ),
    (
        body(
            tools=TOOLS,
            tool_choice={"type": "allowed_tools", "tools": [fn_tool("get_weather")], "extra": True},
        ),
        "tool_choice.extra",
        "unknown_parameter",
    ),
    # metadata
    (body(metadata=[]), "metadata", "invalid_type"),
    (body(metadata="k=v"), "metadata", "invalid_type"),
    (body(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "object_above_max_properties"),
    (body(metadata={"k" * 65: "v"}), "metadata." + "k" * 65, "string_above_max_length"),
    (body(metadata={"key": "v" * 513}), "metadata.key", "string_above_max_length"),
    (body(metadata={"some_key": 1}), "metadata.some_key", "invalid_type"),
    (body(metadata={"some_key": None}), "metadata.some_key", "invalid_type"),
    (body(metadata={"some_key": True}), "metadata.some_key", "invalid_type"),
    # text
    (body(text="json"), "text", "invalid_type"),
    (body(text={"foo": 1}), "text.foo", "unknown_parameter"),
    (body(text={"format": "json"}), "text.format", "invalid_type"),
    (body(text={"format": {}}), "text.format.type", "missing_required_parameter"),
    (body(text={"format": {"type": "xml"}}), "text.format.type", "invalid_value"),
    (body(text={"format": {"type": "text", "name": "x"}}), "text.format.name", "unknown_parameter"),
    (
        body(text={"format": {"type": "json_schema", "schema": {}}}),
        "text.format.name",
        "missing_required_parameter",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x"}}),
        "text.format.schema",
        "missing_required_parameter",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x", "schema": "{}"}}),
        "text.format.schema",
        "invalid_type",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x", "schema": None}}),
        "text.format.schema",
        "invalid_type",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "a b", "schema": {}}}),
        "text.format.name",
        "invalid_value",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "n" * 65, "schema": {}}}),
        "text.format.name",
        "string_above_max_length",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": "no"}}),
        "text.format.strict",
        "invalid_type",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x", "schema": {}, "description": 1}}),
        "text.format.description",
        "invalid_type",
    ),
    (
        body(text={"format": {"type": "json_schema", "name": "x", "schema": nested(65)}}),
        "text.format.schema",
        "invalid_value",
    ),
    (body(text={"verbosity": "loud"}), "text.verbosity", "invalid_value"),
    # numbers
    (body(temperature="1"), "temperature", "invalid_type"),
    (body(temperature=True), "temperature", "invalid_type"),
    (body(temperature=[1]), "temperature", "invalid_type"),
    (body(temperature=2.5), "temperature", "decimal_above_max_value"),
    (body(temperature=-0.1), "temperature", "decimal_below_min_value"),
    (body(temperature=float("nan")), "temperature", "invalid_value"),
    (body(temperature=float("inf")), "temperature", "invalid_value"),
    (body(temperature=float("-inf")), "temperature", "invalid_value"),
    (body(temperature=10**400), "temperature", "decimal_above_max_value"),
    (body(top_p=1.5), "top_p", "decimal_above_max_value"),
    (body(top_p=-1), "top_p", "decimal_below_min_value"),
    (body(top_p=False), "top_p", "invalid_type"),
    (body(presence_penalty=-3), "presence_penalty", "decimal_below_min_value"),
    (body(presence_penalty="0"), "presence_penalty", "invalid_type"),
    (body(frequency_penalty=2.01), "frequency_penalty", "decimal_above_max_value"),
    (body(max_output_tokens=15), "max_output_tokens", "integer_below_min_value"),
    (body(max_output_tokens=-(10**100)), "max_output_tokens", "integer_below_min_value"),
    (body(max_output_tokens=16.0), "max_output_tokens", "invalid_type"),
    (body(max_output_tokens=True), "max_output_tokens", "invalid_type"),
    (body(max_output_tokens="100"), "max_output_tokens", "invalid_type"),
    (body(max_tool_calls=0), "max_tool_calls", "integer_below_min_value"),
    (body(max_tool_calls=1.5), "max_tool_calls", "invalid_type"),
    (body(max_tool_calls=True), "max_tool_calls", "invalid_type"),
    (body(top_logprobs=21), "top_logprobs", "integer_above_max_value"),
    (body(top_logprobs=-1), "top_logprobs", "integer_below_min_value"),
    (body(top_logprobs=5.0), "top_logprobs", "invalid_type"),
    (body(top_logprobs=False), "top_logprobs", "invalid_type"),
    # booleans
    (body(parallel_tool_calls=1), "parallel_tool_calls", "invalid_type"),
    (body(parallel_tool_calls="true"), "parallel_tool_calls", "invalid_type"),
    (body(stream=1), "stream", "invalid_type"),
    (body(stream=0), "stream", "invalid_type"),
    (body(background="yes"), "background", "invalid_type"),
    (body(store=0), "store", "invalid_type"),
    # stream_options
    (body(stream_options={"include_obfuscation": True}), "stream_options", "invalid_value"),
    (body(stream=False, stream_options={}), "stream_options", "invalid_value"),
    (
        body(stream=True, stream_options={"include_usage": True}),
        "stream_options.include_usage",
        "unknown_parameter",
    ),
    (
        body(stream=True, stream_options={"include_obfuscation": 1}),
        "stream_options.include_obfuscation",
        "invalid_type",
    ),
    (body(stream=True, stream_options="x"), "stream_options", "invalid_type"),
    # reasoning
    (body(reasoning="high"), "reasoning", "invalid_type"),
    (body(reasoning={"effort": "extreme"}), "reasoning.effort", "invalid_value"),
    (body(reasoning={"effort": 3}), "reasoning.effort", "invalid_type"),
    (body(reasoning={"summary": "short"}), "reasoning.summary", "invalid_value"),
    (body(reasoning={"generate_summary": "short"}), "reasoning.generate_summary",
     "invalid_value"),
    (body(reasoning={"mode": "pro"}), "reasoning.mode", "unsupported_parameter"),
    (body(reasoning={"context": "all"}), "reasoning.context", "invalid_value"),
    # short strings and enums
    (body(safety_identifier="s" * 129), "safety_identifier", "string_above_max_length"),
    (body(safety_identifier=1), "safety_identifier", "invalid_type"),
    (body(prompt_cache_key="p" * 65), "prompt_cache_key", "string_above_max_length"),
    (body(instructions=1), "instructions", "invalid_type"),
    (body(instructions=["a"]), "instructions", "invalid_type"),
    (body(truncation="none"), "truncation", "invalid_value"),
    (body(service_tier="slow"), "service_tier", "invalid_value"),
    (body(service_tier=1), "service_tier", "invalid_type"),
]


@pytest.mark.parametrize(("payload", "param", "code"), INVALID_TOP_LEVEL)
def test_invalid_top_level(payload: object, param: str | None, code: str) -> None:
    error = expect_error(payload)
    assert (error.param, error.code) == (param, code), error.message


def part(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


TEXT = part("input_text", text="x")
OUT = part("output_text", text="x")
IMAGE = part("input_image", image_url="https://example.com/a.png")

INVALID_ITEMS = [
    # the item itself
    ([1], "input[0]", "invalid_type"),
    (["hello"], "input[0]", "invalid_type"),
    ([None], "input[0]", "invalid_type"),
    ([[{"role": "user", "content": "x"}]], "input[0]", "invalid_type"),
    ([{}], "input[0].type", "missing_required_parameter"),
    ([{"type": None}], "input[0].type", "missing_required_parameter"),
    ([{"content": "hi"}], "input[0].role", "missing_required_parameter"),
    ([{"type": 1}], "input[0].type", "invalid_type"),
    ([{"type": "banana"}], "input[0].type", "invalid_value"),
    ([{"type": "web_search_call", "id": "ws_1"}], "input[0].type", "unsupported_parameter"),
    ([{"type": "web_search_result", "id": "ws_1"}], "input[0].type", "invalid_value"),
    (
        [user("ok"), user("ok"), {"type": "output_text", "text": "x"}],
        "input[2].type",
        "invalid_value",
    ),
    # messages
    ([{"type": "message", "content": "x"}], "input[0].role", "missing_required_parameter"),
    ([{"role": "robot", "content": "x"}], "input[0].role", "invalid_value"),
    ([{"role": None, "content": "x"}], "input[0].role", "invalid_type"),
    ([{"role": 1, "content": "x"}], "input[0].role", "invalid_type"),
    ([{"role": "user"}], "input[0].content", "missing_required_parameter"),
    ([user(1)], "input[0].content", "invalid_type"),
    ([user(None)], "input[0].content", "invalid_type"),
    ([user({"type": "input_text", "text": "x"})], "input[0].content", "invalid_type"),
    ([{"role": "user", "content": "x", "foo": 1}], "input[0].foo", "unknown_parameter"),
    ([{**user("x"), "name": "bob"}], "input[0].name", "unknown_parameter"),
    ([{**user("x"), "status": "done"}], "input[0].status", "invalid_value"),
    ([{**user("x"), "id": 1}], "input[0].id", "invalid_type"),
    ([{**user("x"), "phase": "later"}], "input[0].phase", "invalid_value"),
    ([assistant("x", phase="draft")], "input[0].phase", "invalid_value"),
    ([user([1])], "input[0].content[0]", "invalid_type"),
    ([user(["text"])], "input[0].content[0]", "invalid_type"),
    ([user([{}])], "input[0].content[0].type", "missing_required_parameter"),
    ([user([{"text": "x"}])], "input[0].content[0].type", "missing_required_parameter"),
    ([user([part("input_text")])], "input[0].content[0].text", "missing_required_parameter"),
    (
        [user("a"), user("b"), user([TEXT, part("input_text", text=1)])],
        "input[2].content[1].text",
        "invalid_type",
    ),
    ([user([part("input_text", text="x", foo=1)])], "input[0].content[0].foo", "unknown_parameter"),
    (
        [user([part("input_text", text="x", annotations=[])])],
        "input[0].content[0].annotations",
        "unknown_parameter",
    ),
    # unknown part types, per role
    ([user([OUT])], "input[0].content[0].type", "invalid_value"),
    ([user([part("refusal", refusal="no")])], "input[0].content[0].type", "invalid_value"),
    (
        [user([part("input_video", video_url="https://v")])],
        "input[0].content[0].type",
        "invalid_value",
    ),
    ([user([part("input_audio")])], "input[0].content[0].type", "invalid_value"),
    ([user([TEXT, part("text", text="x")])], "input[0].content[1].type", "invalid_value"),
    ([{"role": "system", "content": [IMAGE]}], "input[0].content[0].type", "invalid_value"),
    ([{"role": "system", "content": [OUT]}], "input[0].content[0].type", "invalid_value"),
    (
        [{"role": "developer", "content": [part("input_file", file_url="https://f")]}],
        "input[0].content[0].type",
        "invalid_value",
    ),
    ([assistant([TEXT])], "input[0].content[0].type", "invalid_value"),
    ([assistant([IMAGE])], "input[0].content[0].type", "invalid_value"),
    ([{"role": "assistant", "content": [OUT, TEXT]}], "input[0].content[1].type", "invalid_value"),
    # input_image
    ([user([part("input_image")])], "input[0].content[0].image_url", "missing_required_parameter"),
    (
        [user([part("input_image", image_url=None)])],
        "input[0].content[0].image_url",
        "missing_required_parameter",
    ),
    ([user([part("input_image", image_url=1)])], "input[0].content[0].image_url", "invalid_type"),
    ([user([{**IMAGE, "detail": "ultra"}])], "input[0].content[0].detail", "invalid_value"),
    ([user([{**IMAGE, "detail": 1}])], "input[0].content[0].detail", "invalid_type"),
    ([user([{**IMAGE, "file_id": "file_1"}])], "input[0].content[0].file_id",
     "unsupported_parameter"),
    ([user([{"type": "input_file", "file_id": "file_1"}])], "input[0].content[0].file_id",
     "unsupported_parameter"),
    ([user([{**IMAGE, "prompt_cache_breakpoint": {"mode": "implicit"}}])],
     "input[0].content[0].prompt_cache_breakpoint.mode", "invalid_value"),
    # input_file
    ([user([part("input_file")])], "input[0].content[0].file_data", "missing_required_parameter"),
    (
        [user([part("input_file", filename="a.pdf", file_data=None, file_url=None)])],
        "input[0].content[0].file_data",
        "missing_required_parameter",
    ),
    (
        [user([part("input_file", file_url="https://f", filename=1)])],
        "input[0].content[0].filename",
        "invalid_type",
    ),
    (
        [user([part("input_file", file_url=["https://f"])])],
        "input[0].content[0].file_url",
        "invalid_type",
    ),
    (
        [user([part("input_file", file_data="x" * 33_554_433)])],
        "input[0].content[0].file_data",
        "string_above_max_length",
    ),
    # output_text / refusal
    ([assistant([part("output_text")])], "input[0].content[0].text", "missing_required_parameter"),
    (
        [assistant([{**OUT, "annotations": "none"}])],
        "input[0].content[0].annotations",
        "invalid_type",
    ),
    (
        [assistant([{**OUT, "annotations": [{"type": "file_citation", "file_id": "f"}]}])],
        "input[0].content[0].annotations[0].type",
        "invalid_value",
    ),
    (
        [
            assistant(
                [
                    {
                        **OUT,
                        "annotations": [
                            {"type": "url_citation", "start_index": 0, "end_index": 1, "url": "u"}
                        ],
                    }
                ]
            )
        ],
        "input[0].content[0].annotations[0].title",
        "missing_required_parameter",
    ),
    (
        [
            assistant(
                [
                    {
                        **OUT,
                        "annotations": [
                            {
                                "type": "url_citation",
                                "start_index": -1,
                                "end_index": 1,
                                "url": "u",
                                "title": "t",
                            }
                        ],
                    }
                ]
            )
        ],
        "input[0].content[0].annotations[0].start_index",
        "integer_below_min_value",
    ),
    (
        [
            assistant(
                [
                    {
                        **OUT,
                        "annotations": [
                            {
                                "type": "url_citation",
                                "start_index": 1.0,
                                "end_index": 1,
                                "url": "u",
                                "title": "t",
                            }
                        ],
                    }
                ]
            )
        ],
        "input[0].content[0].annotations[0].start_index",
        "invalid_type",
    ),
    (
        [
            assistant(
                [
                    {
                        **OUT,
                        "annotations": [
                            {
                                "type": "url_citation",
                                "start_index": 0,
                                "end_index": True,
                                "url": "u",
                                "title": "t",
                            }
                        ],
                    }
                ]
            )
        ],
        "input[0].content[0].annotations[0].end_index",
        "invalid_type",
    ),
    ([assistant([{**OUT, "logprobs": "none"}])], "input[0].content[0].logprobs", "invalid_type"),
    ([assistant([{**OUT, "logprobs": [1]}])], "input[0].content[0].logprobs[0]", "invalid_type"),
    (
        [assistant([{**OUT, "logprobs": [deep_object(65)]}])],
        "input[0].content[0].logprobs[0]",
        "invalid_value",
    ),
    ([assistant([part("refusal")])], "input[0].content[0].refusal", "missing_required_parameter"),
    ([assistant([part("refusal", refusal=None)])], "input[0].content[0].refusal", "invalid_type"),
    # function_call
    ([{**FUNCTION_CALL, "call_id": DROP}], "input[0].call_id", "missing_required_parameter"),
    ([{**FUNCTION_CALL, "name": DROP}], "input[0].name", "missing_required_parameter"),
    ([{**FUNCTION_CALL, "arguments": DROP}], "input[0].arguments", "missing_required_parameter"),
    ([{**FUNCTION_CALL, "call_id": ""}], "input[0].call_id", "empty_string"),
    ([{**FUNCTION_CALL, "call_id": "c" * 65}], "input[0].call_id", "string_above_max_length"),
    ([{**FUNCTION_CALL, "call_id": 1}], "input[0].call_id", "invalid_type"),
    ([{**FUNCTION_CALL, "name": "get weather"}], "input[0].name", "invalid_value"),
    ([{**FUNCTION_CALL, "name": ""}], "input[0].name", "empty_string"),
    ([{**FUNCTION_CALL, "arguments": {"city": "Paris"}}], "input[0].arguments", "invalid_type"),
    ([{**FUNCTION_CALL, "status": "failed"}], "input[0].status", "invalid_value"),
    ([{**FUNCTION_CALL, "role": "assistant"}], "input[0].role", "unknown_parameter"),
    # function_call_output
    ([{**FUNCTION_OUTPUT, "output": DROP}], "input[0].output", "missing_required_parameter"),
    ([{**FUNCTION_OUTPUT, "call_id": DROP}], "input[0].call_id", "missing_required_parameter"),
    ([{**FUNCTION_OUTPUT, "output": 1}], "input[0].output", "invalid_type"),
    ([{**FUNCTION_OUTPUT, "output": None}], "input[0].output", "invalid_type"),
    ([{**FUNCTION_OUTPUT, "output": {"result": 1}}], "input[0].output", "invalid_type"),
    ([{**FUNCTION_OUTPUT, "output": [OUT]}], "input[0].output[0].type", "invalid_value"),
    (
        [{**FUNCTION_OUTPUT, "output": [TEXT, part("input_video")]}],
        "input[0].output[1].video_url",
        "missing_required_parameter",
    ),
    (
        [{**FUNCTION_OUTPUT, "output": [part("input_image")]}],
        "input[0].output[0].image_url",
        "missing_required_parameter",
    ),
    ([{**FUNCTION_OUTPUT, "name": "x"}], "input[0].name", "unknown_parameter"),
    ([{**FUNCTION_OUTPUT, "status": "cancelled"}], "input[0].status", "invalid_value"),
    # reasoning
    ([{"type": "reasoning"}], "input[0].summary", "missing_required_parameter"),
    ([{**REASONING, "summary": "x"}], "input[0].summary", "invalid_type"),
    ([{**REASONING, "summary": None}], "input[0].summary", "invalid_type"),
    (
        [{**REASONING, "summary": [part("reasoning_text", text="x")]}],
        "input[0].summary[0].type",
        "invalid_value",
    ),
    (
        [{**REASONING, "summary": [part("summary_text")]}],
        "input[0].summary[0].text",
        "missing_required_parameter",
    ),
    ([{**REASONING, "content": [OUT]}], "input[0].content[0].type", "invalid_value"),
    ([{**REASONING, "content": "x"}], "input[0].content", "invalid_type"),
    (
        [{**REASONING, "content": [part("reasoning_text", text=1)]}],
        "input[0].content[0].text",
        "invalid_type",
    ),
    ([{**REASONING, "encrypted_content": 1}], "input[0].encrypted_content", "invalid_type"),
    ([{**REASONING, "status": "done"}], "input[0].status", "invalid_value"),
    ([{**REASONING, "text": "x"}], "input[0].text", "unknown_parameter"),
    # item_reference
    ([{"type": "item_reference"}], "input[0].id", "missing_required_parameter"),
    ([{"type": "item_reference", "id": None}], "input[0].id", "invalid_type"),
    ([{"id": 1}], "input[0].id", "invalid_type"),
    (
        [{"type": "item_reference", "id": "x", "status": "completed"}],
        "input[0].status",
        "unknown_parameter",
    ),
    # compaction
    ([{"type": "compaction"}], "input[0].encrypted_content", "missing_required_parameter"),
    ([{**COMPACTION, "encrypted_content": None}], "input[0].encrypted_content", "invalid_type"),
    ([{**COMPACTION, "created_by": 1}], "input[0].created_by", "invalid_type"),
    ([{**COMPACTION, "summary": "x"}], "input[0].summary", "unknown_parameter"),
]


def _drop_markers(entries: list[Any]) -> list[Any]:
    return [
        {k: v for k, v in e.items() if v is not DROP} if isinstance(e, dict) else e for e in entries
    ]


@pytest.mark.parametrize(("entries", "param", "code"), INVALID_ITEMS)
def test_invalid_input_items(entries: list[Any], param: str, code: str) -> None:
    entries = _drop_markers(entries)
    error = expect_error(items(*entries))
    assert (error.param, error.code) == (param, code), error.message
    # The same failure through the shared entry point, with a different path prefix.
    with pytest.raises(ApiError) as info:
        validate_input_items(entries, "input", DEFAULT_LIMITS)
    assert (info.value.param, info.value.code) == (param, code)


# ---------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            items(user("a"), user("b"), user([TEXT, part("input_text", text=3)])),
            "Invalid type for 'input[2].content[1].text': expected a string, "
            "but got an integer instead.",
        ),
        (items({**user("x"), "foo": 1}), "Unknown parameter: 'input[0].foo'."),
        (
            body(truncation="banana"),
            "Invalid value for 'truncation': 'banana'. Supported values are: 'auto', 'disabled'.",
        ),
        (
            items({**FUNCTION_CALL, "call_id": DROP}),
            "Missing required parameter: 'input[0].call_id'.",
        ),
        (
            body(max_output_tokens=16.0),
            "Invalid type for 'max_output_tokens': expected an integer, but got a decimal instead.",
        ),
        (
            body(top_logprobs=True),
            "Invalid type for 'top_logprobs': expected an integer, but got a boolean instead.",
        ),
        (
            body(max_output_tokens=8),
            "Invalid 'max_output_tokens': integer below minimum value. "
            "Expected a value >= 16, but got 8 instead.",
        ),
        (
            body(temperature=3),
            "Invalid 'temperature': decimal above maximum value. "
            "Expected a value <= 2, but got 3 instead.",
        ),
        ([], "Invalid request body: expected a JSON object, but got an array instead."),
    ],
)
def test_messages(payload: Any, message: str) -> None:
    if isinstance(payload, dict) and isinstance(payload.get("input"), list):
        payload["input"] = _drop_markers(payload["input"])
    assert expect_error(payload).message == message


def test_unknown_part_type_lists_supported_values() -> None:
    error = expect_error(items(assistant([TEXT])))
    assert "'input_text'" in error.message
    assert "'output_text', 'refusal'" in error.message
    error = expect_error(items(user([OUT])))
    assert "'input_text', 'input_image', 'input_file'" in error.message


def test_messages_do_not_echo_huge_values() -> None:
    error = expect_error(body(truncation="x" * 100_000))
    assert len(error.message) < 300
    error = expect_error(body(temperature=10**5000))
    assert "very large" in error.message


# ---------------------------------------------------------------------------------------------
# Limits


@pytest.mark.parametrize(
    ("limits", "payload", "param", "code"),
    [
        (
            RequestLimits(max_input_items=2),
            items(user("a"), user("b"), user("c")),
            "input",
            "array_above_max_length",
        ),
        (RequestLimits(max_tools=1), body(tools=TOOLS), "tools", "array_above_max_length"),
        (
            RequestLimits(max_metadata_keys=1),
            body(metadata={"a": "1", "b": "2"}),
            "metadata",
            "object_above_max_properties",
        ),
        (
            RequestLimits(max_metadata_key_length=3),
            body(metadata={"abcd": "1"}),
            "metadata.abcd",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_metadata_value_length=3),
            body(metadata={"a": "1234"}),
            "metadata.a",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            body(input="123456"),
            "input",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items(user("123456")),
            "input[0].content",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items(user([part("input_text", text="123456")])),
            "input[0].content[0].text",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items(assistant([part("refusal", refusal="123456")])),
            "input[0].content[0].refusal",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items({**FUNCTION_OUTPUT, "output": "123456"}),
            "input[0].output",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items({**COMPACTION, "encrypted_content": "123456"}),
            "input[0].encrypted_content",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_string_length=5),
            items({**REASONING, "summary": [part("summary_text", text="123456")]}),
            "input[0].summary[0].text",
            "string_above_max_length",
        ),
        (
            RequestLimits(max_schema_depth=2),
            body(tools=[fn_tool("t", parameters={"a": [1]})]),
            "tools[0].parameters",
            "ok",
        ),
        (
            RequestLimits(max_schema_depth=2),
            body(tools=[fn_tool("t", parameters={"a": [[1]]})]),
            "tools[0].parameters",
            "invalid_value",
        ),
        (
            RequestLimits(max_schema_depth=1),
            body(text={"format": {"type": "json_schema", "name": "n", "schema": {"a": {}}}}),
            "text.format.schema",
            "invalid_value",
        ),
    ],
)
def test_configurable_limits(
    limits: RequestLimits, payload: dict[str, Any], param: str, code: str
) -> None:
    if code == "ok":
        assert validate_create_body(payload, limits=limits) is payload
        return
    error = expect_error(payload, limits=limits)
    assert (error.param, error.code) == (param, code), error.message
    # The default limits accept the same body.
    assert validate_create_body(payload) is payload


def test_default_limits_at_their_edges() -> None:
    validate_create_body(items(*[user("x")] * 4096))
    error = expect_error(items(*[user("x")] * 4097))
    assert (error.param, error.code) == ("input", "array_above_max_length")
    validate_create_body(body(tools=[fn_tool(f"t{i}") for i in range(128)]))
    validate_create_body(body(input="x" * 10_485_760))
    error = expect_error(body(input="x" * 10_485_761))
    assert (error.param, error.code) == ("input", "string_above_max_length")


# ---------------------------------------------------------------------------------------------
# WebSocket mode


def ws(**fields: Any) -> dict[str, Any]:
    return body(**{"type": "response.create", **fields})


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        (body(), "type", "missing_required_parameter"),
        (ws(type="response.cancel"), "type", "invalid_value"),
        (ws(type=None), "type", "invalid_type"),
        (ws(type=1), "type", "invalid_type"),
        (ws(stream=False), "stream", "unsupported_parameter"),
        (ws(stream="yes"), "stream", "invalid_type"),
        (ws(stream_options={"include_usage": True}), "stream_options.include_usage",
         "unknown_parameter"),
        (ws(background=True), "background", "unsupported_parameter"),
        (ws(background=1), "background", "invalid_type"),
        (ws(generate="no"), "generate", "invalid_type"),
        (ws(stream_id=3), "stream_id", "invalid_type"),
        (ws(input=DROP), "input", "missing_required_parameter"),
        (ws(foo=1), "foo", "unknown_parameter"),
        (ws(temperature=5), "temperature", "decimal_above_max_value"),
        (ws(input=[{"role": "user"}]), "input[0].content", "missing_required_parameter"),
    ],
)
def test_websocket_invalid(payload: dict[str, Any], param: str, code: str) -> None:
    error = expect_error(payload, websocket=True)
    assert (error.param, error.code) == (param, code), error.message


def test_websocket_messages_explain_transport() -> None:
    error = expect_error(ws(stream=False), websocket=True)
    assert "always streamed" in error.message


def test_websocket_valid() -> None:
    payload = ws(previous_response_id="resp_1", input=[], store=False, tools=TOOLS)
    assert validate_create_body(payload, websocket=True) is payload
    # What Codex and openai-agents (stream: true), the SDK (generate, stream_id) send.
    for extra in ({"stream": True}, {"stream": None}, {"stream_options": None},
                  {"stream_options": {"include_obfuscation": False}}, {"background": False},
                  {"background": None}, {"generate": False}, {"generate": True},
                  {"stream_id": "lane-1"}, {"client_metadata": {"turn_id": "t1"}}):
        payload = ws(**extra)
        assert validate_create_body(payload, websocket=True) is payload, extra
    # `generate` and `stream_id` exist only on the socket.
    assert expect_error(body(generate=False)).param == "generate"
    assert expect_error(body(stream_id="x")).param == "stream_id"
    # Over HTTP the same fields are fine and `type` is not.
    http = body(stream=True, stream_options={"include_obfuscation": True}, background=False)
    assert validate_create_body(http) is http


# ---------------------------------------------------------------------------------------------
# /responses/compact


@pytest.mark.parametrize(
    "payload",
    [
        {"model": "m", "input": "compact this"},
        {"model": "m", "input": [user("hi"), assistant([OUT])]},
        {"model": "m", "previous_response_id": "resp_1"},
        {
            "model": "m",
            "input": [COMPACTION, user("next")],
            "previous_response_id": None,
            "instructions": "Summarise.",
            "prompt_cache_key": "k" * 64,
        },
    ],
)
def test_compact_valid(payload: dict[str, Any]) -> None:
    assert validate_compact_body(payload) is payload


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ([], None, "invalid_type"),
        ({"input": "x"}, "model", "missing_required_parameter"),
        ({"model": None, "input": "x"}, "model", "invalid_type"),
        ({"model": "", "input": "x"}, "model", "empty_string"),
        ({"model": 1, "input": "x"}, "model", "invalid_type"),
        ({"model": "m"}, "input", "missing_required_parameter"),
        ({"model": "m", "input": []}, "input", "missing_required_parameter"),
        ({"model": "m", "input": 1}, "input", "invalid_type"),
        (
            {"model": "m", "input": [{"role": "user", "content": 1}]},
            "input[0].content",
            "invalid_type",
        ),
        ({"model": "m", "input": "x", "tools": []}, "tools", "unknown_parameter"),
        ({"model": "m", "input": "x", "stream": True}, "stream", "unknown_parameter"),
        (
            {"model": "m", "input": "x", "prompt_cache_key": "k" * 65},
            "prompt_cache_key",
            "string_above_max_length",
        ),
        ({"model": "m", "input": "x", "instructions": 1}, "instructions", "invalid_type"),
        ({"model": "m", "previous_response_id": ""}, "previous_response_id", "empty_string"),
    ],
)
def test_compact_invalid(payload: object, param: str | None, code: str) -> None:
    with pytest.raises(ApiError) as info:
        validate_compact_body(payload)
    assert info.value.status == 400
    assert (info.value.param, info.value.code) == (param, code), info.value.message


# ---------------------------------------------------------------------------------------------
# validate_input_items on its own


def test_validate_input_items_paths() -> None:
    validate_input_items([user("x"), FUNCTION_CALL], "input", DEFAULT_LIMITS)
    validate_input_items([], "input", DEFAULT_LIMITS)
    with pytest.raises(ApiError) as info:
        validate_input_items([user("x"), {"type": "nope"}], "window", DEFAULT_LIMITS)
    assert (info.value.param, info.value.code) == ("window[1].type", "invalid_value")
    with pytest.raises(ApiError) as info:
        validate_input_items("x", "input", DEFAULT_LIMITS)
    assert (info.value.param, info.value.code) == ("input", "invalid_type")


# ---------------------------------------------------------------------------------------------
# Round trip: everything the gateway emits as output must be accepted back as input.


GATEWAY_OUTPUT: list[dict[str, Any]] = [
    {
        "type": "reasoning",
        "id": "rs_abc",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "The user greets me."}],
    },
    {
        "type": "reasoning",
        "id": "rs_def",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "More."}],
        "encrypted_content": "gAAAAB...",
    },
    {
        "type": "message",
        "id": "msg_abc",
        "status": "completed",
        "role": "assistant",
        "content": [
            {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []},
            {"type": "refusal", "refusal": "I can't help with that."},
        ],
    },
    {
        "type": "function_call",
        "id": "fc_abc",
        "call_id": "call_abc",
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
        "status": "completed",
    },
    {
        "type": "compaction",
        "id": "cmp_abc",
        "encrypted_content": "opaque-window",
        "created_by": "gpt-test",
    },
]


def test_output_round_trips_as_input() -> None:
    previous_input: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    conversation = previous_input + GATEWAY_OUTPUT
    conversation.append({"type": "function_call_output", "call_id": "call_abc", "output": "22C"})
    conversation.append({"role": "user", "content": "thanks"})
    payload = body(input=conversation, tools=[fn_tool("get_weather")])
    assert validate_create_body(payload) is payload
    assert validate_create_body(ws(input=conversation), websocket=True)
    assert validate_compact_body({"model": "m", "input": conversation})


def test_output_with_populated_logprobs_round_trips() -> None:
    logprob = {
        "token": "Hi",
        "logprob": -0.01,
        "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105]}],
    }
    message = {
        **GATEWAY_OUTPUT[2],
        "content": [
            {"type": "output_text", "text": "Hi", "annotations": [], "logprobs": [logprob]}
        ],
    }
    validate_create_body(items(message))


# ---------------------------------------------------------------------------------------------
# Robustness: arbitrary JSON-like values only ever produce a clean 400.


_KEYS = st.sampled_from(
    [
        "type",
        "role",
        "content",
        "text",
        "input",
        "model",
        "tools",
        "name",
        "tool_choice",
        "call_id",
        "output",
        "summary",
        "id",
        "metadata",
        "parameters",
        "format",
        "schema",
        "image_url",
        "file_data",
        "annotations",
        "logprobs",
        "stream",
        "stream_options",
        "encrypted_content",
        "arguments",
        "status",
        "previous_response_id",
    ]
) | st.text(max_size=8)
_STRINGS = st.sampled_from(
    [
        "message",
        "user",
        "assistant",
        "system",
        "developer",
        "input_text",
        "output_text",
        "input_image",
        "input_file",
        "function_call",
        "function_call_output",
        "reasoning",
        "item_reference",
        "compaction",
        "function",
        "allowed_tools",
        "json_schema",
        "auto",
        "response.create",
        "summary_text",
        "reasoning_text",
        "refusal",
        "url_citation",
        "",
    ]
) | st.text(max_size=10)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _STRINGS
JSON_LIKE = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)


def _only_clean_400(call: Any) -> None:
    try:
        call()
    except ApiError as error:
        assert error.status == 400
        assert error.type == "invalid_request_error"
        assert isinstance(error.code, str) and error.code
        assert error.param is None or isinstance(error.param, str)
        assert isinstance(error.message, str) and error.message


@settings(max_examples=400, deadline=None)
@given(JSON_LIKE)
def test_random_bodies_only_raise_api_errors(value: Any) -> None:
    _only_clean_400(lambda: validate_create_body(value))
    _only_clean_400(lambda: validate_create_body(value, websocket=True))
    _only_clean_400(lambda: validate_compact_body(value))


@settings(max_examples=400, deadline=None)
@given(JSON_LIKE)
def test_random_input_items_only_raise_api_errors(value: Any) -> None:
    _only_clean_400(lambda: validate_create_body({"model": "m", "input": [value]}))
    _only_clean_400(lambda: validate_create_body({"model": "m", "input": [user([value])]}))
    _only_clean_400(lambda: validate_create_body({"model": "m", "input": "x", "tools": [value]}))
    _only_clean_400(lambda: validate_create_body({"model": "m", "input": "x", "text": value}))
    _only_clean_400(
        lambda: validate_create_body({"model": "m", "input": "x", "tool_choice": value})
    )


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, JSON_LIKE, max_size=8))
def test_random_items_shaped_like_messages(value: dict[str, Any]) -> None:
    for kind in ("message", "function_call", "function_call_output", "reasoning", "compaction"):
        item = {**value, "type": kind}
        _only_clean_400(lambda item=item: validate_create_body({"input": [item]}))


def _deep_list(depth: int) -> list[Any]:
    node: list[Any] = []
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda deep: deep, None),
        (lambda deep: body(input=deep), "input[0]"),
        (lambda deep: body(input=[deep]), "input[0]"),
        (lambda deep: items(user(deep)), "input[0].content[0]"),
        (lambda deep: body(metadata={"k": deep}), "metadata.k"),
        (lambda deep: body(tools=[fn_tool("t", parameters={"p": deep})]), "tools[0].parameters"),
        (
            lambda deep: body(
                text={"format": {"type": "json_schema", "name": "n", "schema": {"s": deep}}}
            ),
            "text.format.schema",
        ),
        (
            lambda deep: items(assistant([{**OUT, "logprobs": [{"x": deep}]}])),
            "input[0].content[0].logprobs[0]",
        ),
        (lambda deep: body(temperature=deep), "temperature"),
        (lambda deep: body(tool_choice=deep), "tool_choice"),
    ],
)
def test_ten_thousand_levels_deep_is_a_clean_400(make: Any, param: str | None) -> None:
    error = expect_error(make(_deep_list(10_000)))
    assert error.param == param


def test_ten_thousand_levels_of_objects() -> None:
    deep = deep_object(10_000)
    error = expect_error(body(tools=[fn_tool("t", parameters=deep)]))
    assert (error.param, error.code) == ("tools[0].parameters", "invalid_value")
    assert "nested too deeply" in error.message
    error = expect_error(deep)
    assert error.param == "a"


def test_cyclic_schema_from_python_callers_terminates() -> None:
    cyclic: dict[str, Any] = {"type": "object"}
    cyclic["self"] = cyclic
    error = expect_error(body(tools=[fn_tool("t", parameters=cyclic)]))
    assert error.param == "tools[0].parameters"


# -- lone surrogates (issue 12, item 11) ----------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt\ud800", "input": "x"}, "model"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "ok"}, {"type": "input_text", "text": "a\udfffb"}]}]},
     "input[0].content[1].text"),
    ({"model": "m", "input": "x", "metadata": {"k\udc00": "v"}}, "metadata.k\\udc00"),
    ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {"a": {"enum": ["x", "\ud83d"]}}}}]},
     "tools[0].parameters.properties.a.enum[1]"),
])
def test_lone_surrogates_are_refused_naming_the_path(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        validate_create_body(body)
    assert (caught.value.status, caught.value.param, caught.value.code) == (
        400, param, "invalid_unicode")
    if param == "model" or param.startswith("input"):
        with pytest.raises(ApiError) as caught:
            validate_compact_body({"model": body["model"], "input": body["input"]})
        assert (caught.value.param, caught.value.code) == (param, "invalid_unicode")


def test_surrogate_pairs_are_fine() -> None:
    validate_create_body({"model": "m", "input": "smile \U0001f600"})
