"""Reasoning, pure parts: replay onto assistant messages, summaries, sealing, effort, usage,
and the per-client choice of event names (no sockets)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from orp_proxy.config import Settings
from orp_proxy.errors import ApiError
from orp_proxy.protocol.clients import reasoning_event_style
from orp_proxy.protocol.resource import build_response, usage_from_chat
from orp_proxy.protocol.summaries import (
    COMPACTION,
    REASONING,
    CompactionCipher,
    SealedSummaryError,
    replay_sealed,
)
from orp_proxy.protocol.transcoder import Transcoder
from orp_proxy.protocol.translate import (
    build_chat_request,
    normalize_input,
    to_chat_messages,
)
from orp_proxy.upstream.mock import reasoning_chunks, usage_dict
from tests.test_transcoder import run

CIPHER = CompactionCipher([b"k" * 40])


def rs(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], **extra}


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}


def out(call_id: str, text: str = "r") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def chat(items: list[dict[str, Any]], field: str = "reasoning_content") -> list[dict[str, Any]]:
    return to_chat_messages(normalize_input(items), instructions=None, developer_role="system",
                            reasoning_field=field)


# -- 1. reasoning back upstream ------------------------------------------------------------


def test_reasoning_plus_tool_calls_is_one_assistant_message() -> None:
    items = [{"role": "user", "content": "q"}, rs("think A"), call("c1"), call("c2"),
             out("c1"), out("c2"), rs("think B"),
             {"role": "assistant", "content": "done"}, {"role": "user", "content": "next"}]
    assert chat(items) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "reasoning_content": "think A",
         "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "tool", "tool_call_id": "c2", "content": "r"},
        {"role": "assistant", "content": "done", "reasoning_content": "think B"},
        {"role": "user", "content": "next"},
    ]


def test_reasoning_text_and_call_of_one_turn_share_the_message() -> None:
    items = [rs("why"), {"role": "assistant", "content": "Let me look."}, call("c1")]
    [message] = chat(items)
    assert message["reasoning_content"] == "why"
    assert message["content"] == "Let me look." and len(message["tool_calls"]) == 1


@pytest.mark.parametrize(("field", "keys"), [
    ("reasoning_content", {"reasoning_content"}), ("reasoning", {"reasoning"}),
    ("both", {"reasoning_content", "reasoning"}), ("none", set())])
def test_reasoning_field_setting(field: str, keys: set[str]) -> None:
    [message] = chat([rs("t"), call("c1")], field)
    assert {k for k in message if k.startswith("reasoning")} == keys
    assert all(message[k] == "t" for k in keys)


def test_reasoning_without_a_following_assistant_turn_is_dropped() -> None:
    items = [rs("orphan"), {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "a"}, rs("trailing")]
    assert chat(items) == [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "a"}]


def test_summary_only_items_replay_their_summary() -> None:
    # LangChain, pydantic-ai and the Vercel AI SDK send back the summary they read.
    item = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "one"},
                                             {"type": "summary_text", "text": "two"}]}
    [message] = chat([item, {"role": "assistant", "content": "x"}])
    assert message["reasoning_content"] == "one\n\ntwo"
    # With both, the raw content wins and nothing is doubled.
    both = rs("raw", summary=[{"type": "summary_text", "text": "raw"}])
    [message] = chat([both, {"role": "assistant", "content": "x"}])
    assert message["reasoning_content"] == "raw"


# -- 2. sealing ----------------------------------------------------------------------------


def test_purpose_binds_a_blob() -> None:
    reasoning_blob = CIPHER.seal("o1", "thought", purpose=REASONING)
    compaction_blob = CIPHER.seal("o1", "summary")
    assert CIPHER.open("o1", reasoning_blob, purpose=REASONING) == "thought"
    assert CIPHER.open("o1", compaction_blob, purpose=COMPACTION) == "summary"
    with pytest.raises(SealedSummaryError):
        CIPHER.open("o1", reasoning_blob)  # a reasoning blob passed as a compaction
    with pytest.raises(SealedSummaryError):
        CIPHER.open("o1", compaction_blob, purpose=REASONING)
    with pytest.raises(SealedSummaryError):
        CIPHER.open("o2", reasoning_blob, purpose=REASONING)


def test_replay_unseals_reasoning_and_names_the_bad_item() -> None:
    blob = CIPHER.seal("o1", "secret thought", purpose=REASONING)
    sealed = {"type": "reasoning", "summary": [], "encrypted_content": blob}
    [opened] = replay_sealed(CIPHER, "o1", [], [sealed])
    assert opened["content"] == [{"type": "reasoning_text", "text": "secret thought"}]
    assert opened["encrypted_content"] == blob
    # A client's blob is checked even when the item carries text too.
    tampered = {**rs("anything"), "encrypted_content": blob[:-4] + "AAAA"}
    with pytest.raises(ApiError) as err:
        replay_sealed(CIPHER, "o1", [], [{"role": "user", "content": "x"}, tampered])
    assert err.value.param == "input[1].encrypted_content"
    assert err.value.status == 400 and err.value.code == "invalid_encrypted_content"
    compaction_as_reasoning = {"type": "reasoning", "summary": [],
                               "encrypted_content": CIPHER.seal("o1", "s")}
    with pytest.raises(ApiError):
        replay_sealed(CIPHER, "o1", [], [compaction_as_reasoning])
    with pytest.raises(ApiError):
        replay_sealed(CIPHER, "o2", [], [sealed])  # another caller's blob


# -- 3./5. the transcoder: summaries, sealing, usage ---------------------------------------


def make(body: dict[str, Any], **kwargs: Any) -> Transcoder:
    counter = itertools.count()
    return Transcoder(build_response(body, model="m", response_id="resp_1", created_at=1),
                      id_factory=lambda prefix: f"{prefix}_{next(counter)}", **kwargs)


def test_summary_events_in_order() -> None:
    body = {"model": "m", "input": "hi", "reasoning": {"summary": "auto"}}
    events = run(reasoning_chunks(["Let me ", "think."], ["Answer"]),
                 make(body, reasoning_summary=True))
    assert [e["type"] for e in events[2:12]] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.content_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.reasoning.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    # The item as added has no summary yet (a list of its own, not the one that fills up).
    assert events[2]["item"]["summary"] == [] and events[2]["item"]["content"] == []
    added = events[3]
    assert added["summary_index"] == 0 and added["part"] == {"type": "summary_text", "text": ""}
    assert [e["delta"] for e in events[5:7]] == ["Let me ", "think."]
    assert events[7]["text"] == "Let me think."
    item = events[11]["item"]
    assert item["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert item["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert "encrypted_content" not in item


def test_encrypted_content_on_the_finished_item() -> None:
    tc = make({"model": "m", "input": "hi"},
              seal_reasoning=lambda text: CIPHER.seal("o1", text, purpose=REASONING))
    events = run(reasoning_chunks(["deep ", "thought"], ["Answer"]), tc)
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert "encrypted_content" not in added["item"]
    item = tc.response["output"][0]
    assert CIPHER.open("o1", item["encrypted_content"], purpose=REASONING) == "deep thought"


def test_interrupted_reasoning_is_sealed_too() -> None:
    tc = make({"model": "m", "input": "hi"}, reasoning_summary=True,
              seal_reasoning=lambda text: CIPHER.seal("o1", text, purpose=REASONING))
    tc.start()
    for chunk in reasoning_chunks(["half a "], [])[:2]:
        tc.feed(chunk)
    tc.interrupt()
    item = tc.response["output"][0]
    assert item["summary"] == [{"type": "summary_text", "text": "half a "}]
    assert CIPHER.open("o1", item["encrypted_content"], purpose=REASONING) == "half a "


def test_reasoning_tokens_reported_or_estimated() -> None:
    assert usage_from_chat(usage_dict(3, 10, reasoning=4))[
        "output_tokens_details"]["reasoning_tokens"] == 4
    sglang = {"prompt_tokens": 3, "completion_tokens": 10, "reasoning_tokens": 6}
    assert usage_from_chat(sglang)["output_tokens_details"]["reasoning_tokens"] == 6
    # vLLM and llama.cpp report none: the count of reasoning chunks stands in.
    plain = {"prompt_tokens": 3, "completion_tokens": 10}
    tc = make({"model": "m", "input": "hi"})
    run(reasoning_chunks(["a", "b", "c"], ["x"], usage=plain), tc)
    assert tc.response["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    tc = make({"model": "m", "input": "hi"})
    run(reasoning_chunks(["a", "b", "c"], ["x"], usage=usage_dict(3, 10, reasoning=0)), tc)
    assert tc.response["usage"]["output_tokens_details"]["reasoning_tokens"] == 0


# -- 5. effort -----------------------------------------------------------------------------


@pytest.mark.parametrize(("effort", "kwarg", "expected_kwargs", "expected_effort"), [
    ("high", None, None, "high"),
    ("none", None, None, "none"),
    ("none", "enable_thinking", {"enable_thinking": False}, None),
    ("minimal", "enable_thinking", {"enable_thinking": False}, None),
    ("low", "enable_thinking", {"enable_thinking": True}, "low"),
    ("high", "thinking", {"thinking": True}, "high"),
])
def test_effort_and_thinking_switch(effort: str, kwarg: str | None,
                                    expected_kwargs: dict[str, bool] | None,
                                    expected_effort: str | None) -> None:
    settings = Settings(thinking_kwarg=kwarg)
    body = build_chat_request({"reasoning": {"effort": effort}}, [], model="m",
                              settings=settings)
    assert body.get("chat_template_kwargs") == expected_kwargs
    assert body.get("reasoning_effort") == expected_effort
    plain = build_chat_request({"reasoning": {"summary": "auto"}}, [], model="m",
                               settings=settings)
    assert "chat_template_kwargs" not in plain and "reasoning_effort" not in plain


# -- 4. event names per client -------------------------------------------------------------


@pytest.mark.parametrize(("headers", "style"), [
    ({"User-Agent": "OpenAI/Python 3.57.0", "X-Stainless-Lang": "python"}, "openai"),
    ({"User-Agent": "OpenAI/JS 6.49.0", "X-Stainless-Lang": "js"}, "openai"),
    ({"User-Agent": "ai-sdk/open-responses/1.0.39 ai-sdk/provider-utils/4 runtime/node"},
     "openai"),
    ({"User-Agent": "codex_exec/0.171.0 (Debian 12.0.0; x86_64)", "originator": "codex_exec"},
     "openai"),
    ({"User-Agent": "python-httpx/0.28.1"}, "spec"),  # openresponses-py
    ({"User-Agent": "Bun/1.3.0"}, "spec"),  # the compliance suite
    ({}, "spec"),
])
def test_auto_event_style(headers: dict[str, str], style: str) -> None:
    from multidict import CIMultiDict

    assert reasoning_event_style("auto", CIMultiDict(headers)) == style
    assert reasoning_event_style("spec", CIMultiDict(headers)) == "spec"
    assert reasoning_event_style("openai", CIMultiDict(headers)) == "openai"
