"""The pure transcoder: chat chunks in, exact Open Responses events out (no sockets)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import ujson
from hypothesis import given, settings
from hypothesis import strategies as st

from orp_proxy.protocol.resource import build_response
from orp_proxy.protocol.sse_lines import DONE, SSELineBuffer
from orp_proxy.protocol.transcoder import ToolNotAllowed, Transcoder, _Text
from orp_proxy.upstream.mock import (
    encode_sse,
    reasoning_chunks,
    refusal_chunks,
    text_chunks,
    tool_call_chunks,
    usage_dict,
)
from tests.sse_check import check_events

TOOLS = [{"type": "function", "name": "get_weather"}, {"type": "function", "name": "send"}]


def counter_ids() -> Callable[[str], str]:
    counter = itertools.count()
    return lambda prefix: f"{prefix}_{next(counter)}"


def make(body: dict[str, Any] | None = None, **kwargs: Any) -> Transcoder:
    body = body or {"model": "m", "input": "hi", "tools": TOOLS}
    kwargs.setdefault("allowed_tools", {t["name"] for t in body.get("tools", [])})
    kwargs.setdefault("id_factory", counter_ids())
    return Transcoder(build_response(body, model="m", response_id="resp_1", created_at=1),
                      **kwargs)


def run(chunks: list[dict[str, Any]], tc: Transcoder | None = None) -> list[dict[str, Any]]:
    tc = tc or make()
    tc.start()
    for chunk in chunks:
        tc.feed(chunk)
    tc.finish()
    events = tc.take()
    check_events(events)
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_text_answer_lifecycle_exact() -> None:
    events = run(text_chunks(["Hel", "lo"], usage=usage_dict(3, 2)))
    assert types(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    added = events[2]
    assert added["item"] == {"id": "msg_0", "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []}
    assert events[3]["part"] == {"type": "output_text", "text": "", "annotations": [],
                                 "logprobs": []}
    assert [e["delta"] for e in events[4:6]] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["completed_at"] is not None
    assert final["output"] == [{
        "id": "msg_0", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
    }]
    assert final["usage"] == {
        "input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    # created/in_progress carry snapshots, not the live object
    assert events[0]["response"]["output"] == [] and events[0]["response"]["status"] == \
        "in_progress"


def test_usage_details_cached_and_reasoning_tokens() -> None:
    events = run(text_chunks(["x"], usage=usage_dict(10, 5, cached=4, reasoning=2)))
    usage = events[-1]["response"]["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 4}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 2}
    assert usage["total_tokens"] == 15


def test_no_usage_leaves_usage_null() -> None:
    assert run(text_chunks(["x"]))[-1]["response"]["usage"] is None


def test_refusal_part() -> None:
    events = run(refusal_chunks(["I can't", " help"]))
    assert "response.refusal.delta" in types(events)
    done = next(e for e in events if e["type"] == "response.refusal.done")
    assert done["refusal"] == "I can't help"
    item = events[-1]["response"]["output"][0]
    assert item["content"] == [{"type": "refusal", "refusal": "I can't help"}]
    added = next(e for e in events if e["type"] == "response.content_part.added")
    assert added["part"] == {"type": "refusal", "refusal": ""}


def test_text_then_refusal_are_two_parts_of_one_message() -> None:
    chunks = [*text_chunks(["a"], finish_reason=None), *refusal_chunks(["no"])]
    events = run(chunks)
    output = events[-1]["response"]["output"]
    assert len(output) == 1
    assert [p["type"] for p in output[0]["content"]] == ["output_text", "refusal"]
    assert [e["content_index"] for e in events if e["type"].endswith(".delta")] == [0, 1]


def test_tool_only_turn_opens_no_message() -> None:
    args = '{"city": "Paris \\"Ville\\" \\u00e9"}'
    events = run(tool_call_chunks([("call_a", "get_weather", args)], split_args=3))
    assert "response.content_part.added" not in types(events)
    output = events[-1]["response"]["output"]
    assert output == [{"id": "fc_0", "type": "function_call", "status": "completed",
                       "call_id": "call_a", "name": "get_weather", "arguments": args}]
    added = events[2]
    assert added["item"]["name"] == "get_weather" and added["item"]["arguments"] == ""
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == args and len(deltas) > 3
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == args


def test_interleaved_tool_calls_keep_their_own_arguments() -> None:
    calls = [("c1", "get_weather", '{"city":"Paris"}'), ("c2", "send", '{"to":"a@b.c"}'),
             ("c3", "get_weather", '{"city":"Rome"}')]
    events = run(tool_call_chunks(calls, split_args=4, interleave=True))
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in output] == calls
    by_item: dict[str, str] = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            by_item[e["item_id"]] = by_item.get(e["item_id"], "") + e["delta"]
    assert [by_item[o["id"]] for o in output] == [c[2] for c in calls]


def test_text_before_tool_call_closes_the_message_first() -> None:
    events = run(tool_call_chunks([("c1", "send", "{}")], text_before="Sending."))
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call"]
    first_call = types(events).index("response.output_item.added", 3)
    assert "response.output_item.done" in types(events)[:first_call]


def test_name_arriving_after_first_fragment() -> None:
    tc = make()
    tc.start()
    tc.feed({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "id": "c9", "function": {"arguments": '{"a"'}}]}}]})
    assert types(tc.take()) == ["response.created", "response.in_progress"]
    tc.feed({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"name": "send", "arguments": ":1}"}}]}}]})
    tc.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    tc.finish()
    events = tc.take()
    assert events[0]["type"] == "response.output_item.added"
    assert events[0]["item"]["call_id"] == "c9"
    assert tc.response["output"][0]["arguments"] == '{"a":1}'


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_item_comes_before_the_message(field: str) -> None:
    events = run(reasoning_chunks(["Let me ", "think."], ["Answer"], field=field))
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert output[0]["summary"] == []
    assert types(events)[2:9] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning.delta", "response.reasoning.delta", "response.reasoning.done",
        "response.content_part.done", "response.output_item.done",
    ]


def test_reasoning_events_openai_style() -> None:
    tc = make(reasoning_events="openai")
    tc.start()
    for chunk in reasoning_chunks(["hmm"], ["ok"]):
        tc.feed(chunk)
    tc.finish()
    names = types(tc.take())
    assert "response.reasoning_text.delta" in names and "response.reasoning_text.done" in names
    assert "response.reasoning.delta" not in names


def test_length_finish_is_incomplete_max_output_tokens() -> None:
    events = run(text_chunks(["partial"], finish_reason="length"))
    final = events[-1]
    assert final["type"] == "response.incomplete"
    response = final["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert response["completed_at"] is None


def test_length_after_reasoning_and_call_marks_only_the_last_item_incomplete() -> None:
    chunks = [*reasoning_chunks(["r"], [], finish_reason=None),
              *tool_call_chunks([("c1", "send", '{"x": 1')], finish_reason="length")]
    events = run(chunks)
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["reasoning", "function_call"]
    assert output[1]["status"] == "incomplete"
    assert events[-2]["type"] == "response.output_item.done"
    assert events[-2]["item"]["status"] == "incomplete"


def test_content_filter_is_incomplete_content_filter() -> None:
    events = run(text_chunks(["x"], finish_reason="content_filter"))
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_tool_outside_allowed_set_is_refused() -> None:
    tc = make(allowed_tools={"get_weather"})
    tc.start()
    with pytest.raises(ToolNotAllowed):
        for chunk in tool_call_chunks([("c1", "send", "{}")]):
            tc.feed(chunk)
    tc.fail("tool_not_allowed", "no", type="model_error")
    events = tc.take()
    check_events(events)
    assert not any(e["type"] == "response.output_item.added" for e in events)
    assert events[-2]["type"] == "error" and events[-1]["type"] == "response.failed"


def test_failure_mid_stream_keeps_partial_output() -> None:
    tc = make()
    tc.start()
    for chunk in text_chunks(["par", "tial"], finish_reason=None):
        tc.feed(chunk)
    tc.fail("upstream_connection_lost", "lost")
    events = tc.take()
    check_events(events)
    assert types(events)[-2:] == ["error", "response.failed"]
    assert events[-2]["error"] == {"type": "server_error", "code": "upstream_connection_lost",
                                   "message": "lost", "param": None}
    response = events[-1]["response"]
    assert response["status"] == "failed"
    assert response["error"] == {"code": "upstream_connection_lost", "message": "lost"}
    assert response["output"][0]["status"] == "incomplete"
    assert response["output"][0]["content"][0]["text"] == "partial"


def test_interrupt_settles_incomplete_without_events() -> None:
    tc = make()
    tc.start()
    tc.take()
    for chunk in tool_call_chunks([("c1", "send", '{"a": 1}')], finish_reason=None):
        tc.feed(chunk)
    tc.take()
    tc.interrupt()
    assert tc.take() == []
    assert tc.response["status"] == "incomplete"
    assert tc.response["incomplete_details"] == {"reason": "client_disconnected"}
    assert tc.response["output"][0]["arguments"] == '{"a": 1}'
    assert tc.response["output"][0]["status"] == "incomplete"


def test_retracted_terminal_is_replaced_by_failure() -> None:
    tc = make()
    tc.start()
    for chunk in text_chunks(["x"]):
        tc.feed(chunk)
    tc.finish()
    events = tc.take()
    events.pop()
    tc.retract_terminal()
    tc.fail("store_failed", "not saved")
    events.extend(tc.take())
    check_events(events)
    assert events[-1]["response"]["status"] == "failed"


def test_logprobs_pass_through_when_included() -> None:
    tc = make(include_logprobs=True)
    token = {"token": "hi", "logprob": -0.1, "bytes": [104, 105], "top_logprobs": []}
    tc.start()
    tc.feed({"choices": [{"delta": {"content": "hi"}, "logprobs": {"content": [token]}}]})
    tc.feed({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    tc.finish()
    events = tc.take()
    check_events(events)
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [token]
    assert tc.response["output"][0]["content"][0]["logprobs"] == [token]


@pytest.mark.parametrize("logprobs", [[{"token": "hi"}], {"content": "abc"}, {"content": [1]}])
def test_malformed_logprobs_are_the_upstreams_fault(logprobs: Any) -> None:
    """A ValueError (the pump's upstream_bad_response), never a crash or characters as tokens."""
    tc = make(include_logprobs=True)
    tc.start()
    with pytest.raises(ValueError, match="logprobs"):
        tc.feed({"choices": [{"delta": {"content": "hi"}, "logprobs": logprobs}]})


def test_empty_and_role_only_chunks_open_nothing() -> None:
    events = run([{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {}, "finish_reason": "stop"}]}])
    assert types(events) == ["response.created", "response.in_progress", "response.completed"]


def test_non_object_chunk_is_a_value_error() -> None:
    tc = make()
    with pytest.raises(ValueError):
        tc.feed([1, 2])


# -- property: any split of the same upstream bytes gives the same events -----------------


def transcode_bytes(pieces: list[bytes]) -> list[dict[str, Any]]:
    lines = SSELineBuffer()
    tc = make()
    tc.start()
    events = tc.take()
    for piece in pieces:
        for payload in lines.feed(piece):
            if payload != DONE:
                tc.feed(ujson.loads(payload))
        events.extend(tc.take())
    for payload in lines.flush():
        if payload != DONE:
            tc.feed(ujson.loads(payload))
    tc.finish()
    events.extend(tc.take())
    for event in events:
        if "response" in event:
            event["response"] = dict(event["response"], completed_at=None)
    return events


UPSTREAM = encode_sse(
    reasoning_chunks(["Th\u00e9 ", "plan \U0001f914"], [], finish_reason=None)
    + tool_call_chunks([("c1", "get_weather", '{"city": "K\u00f8benhavn \\"x\\""}'),
                        ("c2", "send", '{"to": "\u4e16\u754c"}')],
                       split_args=5, interleave=True, text_before="Caf\u00e9 \u2615",
                       usage=usage_dict(12, 30, cached=3, reasoning=7)),
    crlf=False, keepalive_comments=True,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(UPSTREAM)), max_size=40),
       st.booleans())
def test_resplitting_upstream_bytes_gives_identical_events(cuts: list[int], crlf: bool) -> None:
    body = UPSTREAM.replace(b"\n", b"\r\n") if crlf else UPSTREAM
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert transcode_bytes(pieces) == transcode_bytes([body])


def test_one_byte_reads_give_identical_events() -> None:
    assert transcode_bytes([UPSTREAM[i:i + 1] for i in range(len(UPSTREAM))]) == \
        transcode_bytes([UPSTREAM])


# -- the templated encoder must equal the generic one ------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=0, max_value=10**6), st.integers(0, 50),
       st.integers(0, 5))
def test_templated_text_delta_equals_generic_encoding(delta: str, seq: int, out: int,
                                                      content: int) -> None:
    import json

    from orp_proxy.protocol.sse import encode_event, encode_events

    event = {"type": "response.output_text.delta", "item_id": "msg_0a1b", "output_index": out,
             "content_index": content, "delta": delta, "logprobs": [], "sequence_number": seq}
    fast, generic = encode_events([event]), encode_event(event)
    head, _, data = fast.partition(b"\ndata: ")
    assert head == b"event: response.output_text.delta" and data.endswith(b"\n\n")
    assert data.count(b"\n") == 2  # one line of JSON, then the blank line
    assert json.loads(data) == json.loads(generic.partition(b"\ndata: ")[2]) == event


def test_lone_surrogate_in_a_batch_still_encodes_as_valid_utf8_json() -> None:
    import json

    from orp_proxy.protocol.sse import encode_events

    events = [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
               "content_index": 0, "delta": "ok", "logprobs": [], "sequence_number": 1},
              {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
               "content_index": 0, "delta": "bad \ud800", "logprobs": [], "sequence_number": 2}]
    data = encode_events(events)
    blocks = data.decode("utf-8").split("\n\n")[:-1]
    assert [json.loads(b.split("data: ")[1])["delta"] for b in blocks] == ["ok", "bad \ud800"]


def test_long_streams_keep_exact_text_and_arguments_across_collapses() -> None:
    pieces = [f"<{i}\u00e9>" for i in range(1000)]
    args = '{"list": [' + ",".join(str(i) for i in range(700)) + "]}"
    chunks = [*text_chunks(pieces, finish_reason=None),
              *refusal_chunks(pieces[:130], finish_reason=None),
              *tool_call_chunks([("c1", "send", args)], split_args=2)]
    events = run(chunks)
    output = events[-1]["response"]["output"]
    assert output[0]["content"][0]["text"] == "".join(pieces)
    assert output[0]["content"][1]["refusal"] == "".join(pieces[:130])
    assert output[1]["arguments"] == args
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "".join(pieces)


def test_a_call_without_name_closing_the_message_does_not_close_it_twice() -> None:
    tc = make()
    tc.start()
    tc.feed({"choices": [{"delta": {"content": "hello"}}]})
    tc.feed({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "id": "c1", "function": {"arguments": '{"a"'}}]}}]})
    tc.feed({"choices": [{"delta": {}, "finish_reason": "length"}]})
    tc.finish()
    events = tc.take()
    check_events(events)  # openresponses-py rejects an item completed twice
    assert [e["type"] for e in events].count("response.output_item.done") == 1
    assert tc.response["output"][0]["status"] == "completed"
    assert tc.response["status"] == "incomplete"


@pytest.mark.parametrize("chunk", [
    {"choices": [{"delta": "x"}]},
    {"choices": {"0": {}}},
    {"choices": ["x"]},
    {"choices": [{"delta": {"content": ["a", "b"]}}]},
    {"choices": [{"delta": {"reasoning_content": 7}}]},
    {"choices": [{"delta": {"refusal": {"no": 1}}}]},
    {"choices": [{"delta": {"tool_calls": ["x"]}}]},
    {"choices": [{"delta": {"tool_calls": {"index": 0}}}]},
    {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]},
    {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": 5}}]}}]},
    {"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"name": "send", "arguments": {"a": 1}}}]}}]},
    {"choices": [{"delta": {}, "finish_reason": 1}]},
    {"choices": [], "usage": [1]},
])
def test_malformed_chunk_shapes_are_value_errors(chunk: dict[str, Any]) -> None:
    tc = make()
    tc.start()
    with pytest.raises(ValueError):
        tc.feed(chunk)


def test_odd_usage_numbers_become_non_negative_ints() -> None:
    events = run([*text_chunks(["x"]), {"choices": [], "usage": {
        "prompt_tokens": -5, "completion_tokens": "7", "total_tokens": None,
        "prompt_tokens_details": [], "completion_tokens_details": {"reasoning_tokens": 2.0}}}])
    assert events[-1]["response"]["usage"] == {
        "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 2}}


# -- real backends' tool-call shapes (issue 12, item 1) ----------------------------------


def calls_of(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    output = events[-1]["response"]["output"]
    return [(o["call_id"], o["name"], o["arguments"]) for o in output
            if o["type"] == "function_call"]


def tool_chunk(*fragments: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"tool_calls": list(fragments)}}
    if finish:
        choice["finish_reason"] = finish
    return {"choices": [choice]}


def fragment(index: int | None, call_id: str | None, name: str | None,
             arguments: str) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {"arguments": arguments}}
    if index is not None:
        out["index"] = index
    if call_id is not None:
        out["id"] = call_id
    if name is not None:
        out["function"]["name"] = name
    return out


STOP = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}


def test_calls_without_index_are_separate_calls() -> None:
    # Gemini's and Mistral's OpenAI-compatible streams: no `index`, one whole call a chunk.
    events = run([tool_chunk(fragment(None, "a1", "get_weather", '{"city":"Oslo"}')),
                  tool_chunk(fragment(None, "a2", "send", '{"to":"x"}')), STOP])
    assert calls_of(events) == [("a1", "get_weather", '{"city":"Oslo"}'),
                                ("a2", "send", '{"to":"x"}')]


def test_calls_without_index_in_one_chunk_are_separate_calls() -> None:
    events = run([tool_chunk(fragment(None, "a1", "get_weather", '{"a":1}'),
                             fragment(None, "a2", "get_weather", '{"b":2}')), STOP])
    assert calls_of(events) == [("a1", "get_weather", '{"a":1}'),
                                ("a2", "get_weather", '{"b":2}')]


def test_same_index_for_every_call_with_new_ids_are_separate_calls() -> None:
    # Ollama numbers every call 0.
    events = run([tool_chunk(fragment(0, "call_x", "get_weather", '{"a":1}')),
                  tool_chunk(fragment(0, "call_y", "send", '{"b":2}')), STOP])
    assert calls_of(events) == [("call_x", "get_weather", '{"a":1}'),
                                ("call_y", "send", '{"b":2}')]
    # The first call is done before the second is added: nothing can reach it any more.
    names = types(events)
    assert names.index("response.output_item.done") < names.index(
        "response.output_item.added", names.index("response.output_item.added") + 1)


def test_new_name_without_ids_starts_a_new_call() -> None:
    events = run([tool_chunk(fragment(None, None, "get_weather", '{"a"')),
                  tool_chunk(fragment(None, None, None, ":1}")),
                  tool_chunk(fragment(None, None, "send", '{"b":2}')), STOP])
    assert [(n, a) for _, n, a in calls_of(events)] == [("get_weather", '{"a":1}'),
                                                        ("send", '{"b":2}')]


def test_fragments_repeating_id_and_name_stay_one_call() -> None:
    # Servers that repeat the id (and name) on every fragment of the same call.
    events = run([tool_chunk(fragment(0, "c1", "send", '{"to"')),
                  tool_chunk(fragment(0, "c1", "send", ': "x"}')),
                  tool_chunk(fragment(None, "c2", "send", "{}")),
                  tool_chunk(fragment(None, "c2", None, "")), STOP])
    assert calls_of(events) == [("c1", "send", '{"to": "x"}'), ("c2", "send", "{}")]


# -- finish_reason mapping (item 2) --------------------------------------------------------


@pytest.mark.parametrize(("reason", "status", "detail"), [
    ("stop", "completed", None),
    ("tool_calls", "completed", None),
    ("function_call", "completed", None),
    ("eos_token", "completed", None),
    ("length", "incomplete", "max_output_tokens"),
    ("max_tokens", "incomplete", "max_output_tokens"),
    ("model_length", "incomplete", "max_output_tokens"),
    ("content_filter", "incomplete", "content_filter"),
    ("abort", "failed", "upstream_aborted"),
    ("error", "failed", "upstream_error"),
    ("insufficient_system_resource", "failed", "upstream_overloaded"),
])
def test_every_finish_reason_has_its_outcome(reason: str, status: str,
                                             detail: str | None) -> None:
    tc = make()
    events = run(text_chunks(["partial"], finish_reason=reason), tc)
    response = events[-1]["response"]
    assert (events[-1]["type"], response["status"]) == (f"response.{status}", status)
    if status == "failed":
        assert events[-2]["type"] == "error" and events[-2]["error"]["code"] == detail
        assert response["error"]["code"] == detail and reason in response["error"]["message"]
        assert response["output"][0]["content"][0]["text"] == "partial"
    elif status == "incomplete":
        assert response["incomplete_details"] == {"reason": detail}
    assert tc.notices == []


def test_unknown_finish_reason_completes_and_is_noted() -> None:
    tc = make()
    events = run(text_chunks(["x"], finish_reason="frobnicated"), tc)
    assert events[-1]["type"] == "response.completed"
    assert len(tc.notices) == 1 and "frobnicated" in tc.notices[0]


# -- a call whose name never arrives (item 4) ---------------------------------------------


def test_tool_call_whose_name_never_arrives_fails() -> None:
    events = run([tool_chunk(fragment(0, "c1", None, '{"a":')),
                  tool_chunk(fragment(0, None, None, "1}")), STOP])
    assert types(events)[-2:] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "upstream_tool_call_without_name"
    assert events[-1]["response"]["output"] == []


def test_nameless_call_replaced_in_its_slot_fails() -> None:
    from orp_proxy.protocol.transcoder import StreamFailure

    tc = make()
    tc.start()
    tc.feed(tool_chunk(fragment(0, "c1", None, '{"a":1}')))
    with pytest.raises(StreamFailure) as failure:
        tc.feed(tool_chunk(fragment(0, "c2", "send", "{}")))
    assert failure.value.code == "upstream_tool_call_without_name"


def test_empty_nameless_fragment_is_ignored() -> None:
    # Nothing but an index: no call was made; the response completes.
    events = run([*text_chunks(["ok"], finish_reason=None),
                  tool_chunk({"index": 0, "function": {}}),
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
    assert events[-1]["type"] == "response.completed"


# -- only choice 0 is the answer (item 5) --------------------------------------------------


def test_choices_other_than_zero_are_left_out_and_noted_once() -> None:
    tc = make()
    events = run([
        {"choices": [{"index": 0, "delta": {"content": "zero"}},
                     {"index": 1, "delta": {"content": "ONE"}}]},
        {"choices": [{"index": 1, "delta": {"content": "ONE"}, "finish_reason": "length"}]},
        {"choices": [{"index": 2, "delta": {"tool_calls": [fragment(0, "c", "send", "{}")]}}]},
        {"choices": [{"index": 1, "delta": {}}, {"index": 0, "delta": {"content": "!"},
                                                 "finish_reason": "stop"}]},
    ], tc)
    response = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [o["type"] for o in response["output"]] == ["message"]
    assert response["output"][0]["content"][0]["text"] == "zero!"
    assert len(tc.notices) == 1 and "choice" in tc.notices[0]


# -- each event a snapshot of its moment (item 6) -----------------------------------------


def test_content_part_added_does_not_carry_later_logprobs() -> None:
    tc = make(include_logprobs=True)
    tokens = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []}
              for t in ("a", "b")]
    events = run([{"choices": [{"index": 0, "delta": {"content": "a"},
                                "logprobs": {"content": tokens[:1]}}]},
                  {"choices": [{"index": 0, "delta": {"content": "b"},
                                "logprobs": {"content": tokens[1:]}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}], tc)
    added = next(e for e in events if e["type"] == "response.content_part.added")
    assert added["part"] == {"type": "output_text", "text": "", "annotations": [],
                             "logprobs": []}
    done = next(e for e in events if e["type"] == "response.content_part.done")
    assert done["part"]["logprobs"] == tokens


def test_reasoning_item_carries_status() -> None:
    events = run([*reasoning_chunks(["hmm"], [], finish_reason=None),
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}])
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["status"] == "in_progress"
    assert events[-1]["response"]["output"][0]["status"] == "completed"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=5), st.booleans()), max_size=600))
def test_accumulated_text_is_the_pieces_joined(steps: list[tuple[str, bool]]) -> None:
    """However many pieces (joined in chunks, chunks merged) and wherever the value is read
    mid-way, it is exactly the pieces so far, in order."""
    text = _Text()
    so_far = ""
    for piece, look in steps:
        text.append(piece)
        so_far += piece
        if look:
            assert text.value() == so_far
        assert len(text.pieces) < 16 and len(text.chunks) < 9
    assert text.value() == so_far
    assert bool(text) == bool(steps)
