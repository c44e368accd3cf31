"""Open Responses items and settings → the exact Chat Completions body."""

from __future__ import annotations

from typing import Any

from orp_proxy.config import FORWARDABLE_FIELDS, Settings
from orp_proxy.protocol.tools import ToolSet
from orp_proxy.protocol.translate import (
    build_chat_request,
    normalize_input,
    to_chat_messages,
)

SETTINGS = Settings()


def messages(items: list[dict[str, Any]], instructions: str | None = None,
             developer_role: str = "system") -> list[dict[str, Any]]:
    return to_chat_messages(normalize_input(items), instructions=instructions,
                            developer_role=developer_role)


def test_string_input_and_instructions() -> None:
    out = to_chat_messages(normalize_input("hello"), instructions="Be brief.",
                           developer_role="system")
    assert out == [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "hello"}]


def test_roles_and_developer_mapping() -> None:
    items = [
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "a"},
                                                         {"type": "input_text", "text": "b"}]},
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "ans", "annotations": []}]},
    ]
    assert messages(items) == [
        {"role": "system", "content": "dev rules"},
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ans"},
    ]
    assert messages(items[:1], developer_role="developer") == [
        {"role": "developer", "content": "dev rules"}]


def test_user_multimodal_parts() -> None:
    items = [{"role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": "https://x/cat.png", "detail": "low"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAA"},
        {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,B"},
    ]}]
    assert messages(items) == [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "file", "file": {"filename": "a.pdf",
                                  "file_data": "data:application/pdf;base64,B"}},
    ]}]


def test_consecutive_function_calls_become_one_assistant_message() -> None:
    items = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"c":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"c":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ]
    assert messages(items) == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w",
                                                          "arguments": '{"c":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "w",
                                                          "arguments": '{"c":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]


def test_assistant_text_and_following_calls_merge() -> None:
    items = [{"role": "assistant", "content": "Checking."},
             {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"}]
    assert messages(items) == [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}]


def test_tool_output_media_follows_as_user_message() -> None:
    items = [
        {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "screenshot:"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAA"}]},
        {"role": "user", "content": "what do you see?"},
    ]
    out = messages(items)
    assert out[1] == {"role": "tool", "tool_call_id": "c1", "content": "screenshot:"}
    assert out[2] == {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]}
    assert out[3] == {"role": "user", "content": "what do you see?"}


def test_reasoning_items_are_not_sent_upstream() -> None:
    items = [{"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                             "text": "hidden"}]},
             {"role": "user", "content": "hi"}]
    assert messages(items) == [{"role": "user", "content": "hi"}]


def test_normalize_assigns_ids_and_part_lists() -> None:
    items = normalize_input([{"role": "user", "content": "hi"},
                             {"type": "function_call_output", "call_id": "c", "output": "x"},
                             {"type": "item_reference", "id": "msg_1"}])
    assert items[0]["id"].startswith("msg_") and items[0]["type"] == "message"
    assert items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert items[1]["id"].startswith("fco_")
    assert items[2] == {"type": "item_reference", "id": "msg_1"}


# -- issue 12: replay order, text parts, refusals, status -------------------------------


def test_text_after_calls_joins_the_message_holding_them() -> None:
    # A stored output `[function_call, message]` (the model spoke after calling), replayed
    # with the call's output: the tool message must directly follow the calls.
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    assert messages(items) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]


def test_text_before_and_after_calls_are_one_message() -> None:
    items = [{"role": "assistant", "content": "First."},
             {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
             {"role": "assistant", "content": "Then."},
             {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "a"},
             {"type": "function_call_output", "call_id": "c2", "output": "b"}]
    out = messages(items)
    assert [m["role"] for m in out] == ["assistant", "tool", "tool"]
    assert out[0]["content"] == "First.\nThen."
    assert [c["id"] for c in out[0]["tool_calls"]] == ["c1", "c2"]


def test_text_parts_are_joined_with_a_newline() -> None:
    # As vLLM joins text parts for its chat templates; never glued together.
    parts = [{"type": "input_text", "text": "Translate this:"},
             {"type": "input_text", "text": "Bonjour"}]
    items = [{"role": "user", "content": parts},
             {"role": "developer", "content": parts},
             {"type": "message", "role": "assistant", "content": [
                 {"type": "output_text", "text": "Hello", "annotations": []},
                 {"type": "output_text", "text": "there", "annotations": []}]},
             {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": parts}]
    out = messages(items)
    assert out[0] == {"role": "user", "content": "Translate this:\nBonjour"}
    assert out[1] == {"role": "system", "content": "Translate this:\nBonjour"}
    assert out[2]["content"] == "Hello\nthere"
    assert out[3] == {"role": "tool", "tool_call_id": "c1", "content": "Translate this:\nBonjour"}


def test_assistant_refusal_goes_to_the_refusal_field() -> None:
    items = [{"type": "message", "role": "assistant", "content": [
                 {"type": "refusal", "refusal": "I can't help with that."}]},
             {"role": "user", "content": "ok"},
             {"type": "message", "role": "assistant", "content": [
                 {"type": "output_text", "text": "Partly:", "annotations": []},
                 {"type": "refusal", "refusal": "not the rest."}]}]
    out = messages(items)
    assert out[0] == {"role": "assistant", "content": "", "refusal": "I can't help with that."}
    assert out[2] == {"role": "assistant", "content": "Partly:", "refusal": "not the rest."}


def test_normalize_gives_every_item_type_with_a_status_one() -> None:
    items = normalize_input([
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "x"},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "d", "name": "f", "arguments": "{}",
         "status": "incomplete"},
        {"type": "compaction", "encrypted_content": "x"},
    ])
    assert [i.get("status") for i in items] == ["completed", "completed", "completed",
                                                "incomplete", None]


TOOLS = [
    {"type": "function", "name": "get_sales", "description": "Sales.",
     "parameters": {"type": "object", "properties": {"region": {"type": "string"}}},
     "strict": True},
    {"type": "function", "name": "send_email"},
]


def chat(body: dict[str, Any], settings: Settings = SETTINGS) -> dict[str, Any]:
    return build_chat_request(body, [{"role": "user", "content": "x"}], model="up-model",
                              settings=settings)


def test_full_body_translation() -> None:
    body = {
        "model": "alias", "input": "x", "tools": TOOLS, "tool_choice": "required",
        "parallel_tool_calls": False, "max_output_tokens": 64, "temperature": 0.2,
        "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": -0.1,
        "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                            "schema": {"type": "object"}, "description": "d"}},
        "include": ["message.output_text.logprobs"], "top_logprobs": 3,
        "metadata": {"k": "v"}, "store": False, "truncation": "auto",
        "safety_identifier": "u1", "prompt_cache_key": "p", "user": "u", "service_tier": "flex",
    }
    body["text"]["verbosity"] = "low"
    assert chat(body) == {
        "model": "up-model",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {"type": "function", "function": {
                "name": "get_sales", "description": "Sales.",
                "parameters": {"type": "object", "properties": {"region": {"type": "string"}}},
                "strict": True}},
            {"type": "function", "function": {
                "name": "send_email", "parameters": {"type": "object", "properties": {}}}},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "out", "schema": {"type": "object"}, "description": "d", "strict": True}},
        "max_tokens": 64,
        "reasoning_effort": "high",
        "temperature": 0.2, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": -0.1,
        "logprobs": True, "top_logprobs": 3,
        "safety_identifier": "u1", "prompt_cache_key": "p", "user": "u", "service_tier": "flex",
        "verbosity": "low",
    }


def test_forwarded_fields_follow_the_setting() -> None:
    body = {"prompt_cache_key": "p", "safety_identifier": "s", "user": "u",
            "service_tier": "auto", "text": {"verbosity": "high"}}
    sent = chat(body)
    assert {k: sent[k] for k in FORWARDABLE_FIELDS} == {
        "prompt_cache_key": "p", "safety_identifier": "s", "user": "u",
        "service_tier": "auto", "verbosity": "high"}
    only = chat(body, Settings(forward_fields=frozenset({"user"})))
    assert only["user"] == "u" and not (set(FORWARDABLE_FIELDS) - {"user"}) & set(only)
    # The Responses-only tiers go upstream as the chat API's name for them.
    assert chat({"service_tier": "fast"})["service_tier"] == "priority"
    assert chat({"service_tier": "ultrafast"})["service_tier"] == "priority"
    # Nulls mean absent.
    nulls = chat({k: None for k in body} | {"text": {"verbosity": None}})
    assert not set(FORWARDABLE_FIELDS) & set(nulls)


def test_image_detail_original_goes_upstream_as_high() -> None:
    messages = to_chat_messages(normalize_input([{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://x/i.png", "detail": "original"}]}]),
        instructions=None, developer_role="system")
    assert messages[0]["content"][0]["image_url"] == {"url": "https://x/i.png", "detail": "high"}


def test_minimal_body_sends_only_what_was_asked() -> None:
    assert chat({"model": "m", "input": "x"}) == {
        "model": "up-model", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}}


def test_max_completion_tokens_setting() -> None:
    out = chat({"max_output_tokens": 99}, Settings(max_tokens_field="max_completion_tokens"))
    assert out["max_completion_tokens"] == 99 and "max_tokens" not in out


def test_tool_choice_forms() -> None:
    forced = chat({"tools": TOOLS, "tool_choice": {"type": "function", "name": "send_email"}})
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "send_email"}}
    allowed = {"type": "allowed_tools", "tools": [{"type": "function", "name": "get_sales"}]}
    out = chat({"tools": TOOLS, "tool_choice": allowed})
    assert out["tool_choice"] == "auto" and len(out["tools"]) == 2  # all tools stay visible
    one_required = dict(allowed, mode="required")
    assert chat({"tools": TOOLS, "tool_choice": one_required})["tool_choice"] == {
        "type": "function", "function": {"name": "get_sales"}}
    assert "tool_choice" not in chat({"tool_choice": "auto"})  # no tools: nothing to choose


def test_allowed_tool_names() -> None:
    def allowed(body: dict[str, Any]) -> frozenset[str] | None:
        return ToolSet.build(body.get("tools")).allowed(body.get("tool_choice"))

    assert allowed({"tools": TOOLS}) is None  # no restriction: undeclared calls per setting
    assert allowed({"tools": TOOLS, "tool_choice": "required"}) is None
    assert allowed({"tools": TOOLS, "tool_choice": "none"}) == set()
    assert allowed({}) is None
    assert allowed({"tools": TOOLS, "tool_choice": {
        "type": "allowed_tools", "tools": [{"type": "function", "name": "get_sales"}]}}) == {
        "get_sales"}
    assert allowed({"tools": TOOLS, "tool_choice": {
        "type": "function", "name": "send_email"}}) == {"send_email"}


def test_json_object_format() -> None:
    assert chat({"text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in chat({"text": {"format": {"type": "text"}}})
