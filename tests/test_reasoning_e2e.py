"""Reasoning round trips through a listening ORP and the mock's thinking model with tools.

Three turns (think → call a tool; tool result → think → answer; new question → think → call),
carried over by `previous_response_id`, by resending the output items inline, and by
`encrypted_content` with `store: false` (HTTP and WebSocket). Each time the exact upstream
messages are asserted: every turn's reasoning on its own assistant message, nothing twice.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream
from tests.conftest import Proxy
from tests.test_websocket import StartProxy, check_envelope, read_turn, ws_url

WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
BASE = {"model": "mock-reasoning", "tools": [WEATHER]}
THOUGHT_1 = "I recall 0 earlier thoughts. I need the tool get_weather first."
THOUGHT_2 = "I recall 1 earlier thoughts. The tool answered; I can reply now."
THOUGHT_3 = "I recall 2 earlier thoughts. I need the tool get_weather first."


def outputs(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


def reasoning_of(response: dict[str, Any]) -> str:
    [item] = [i for i in response["output"] if i["type"] == "reasoning"]
    return "".join(part["text"] for part in item["content"])


def call_of(response: dict[str, Any]) -> dict[str, Any]:
    [item] = [i for i in response["output"] if i["type"] == "function_call"]
    return item


def tool_call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def expected_third_turn(call_1: str) -> list[dict[str, Any]]:
    """What the upstream must receive on the third turn (reasoning in both fields: the
    default)."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call(call_1)],
         "reasoning_content": THOUGHT_1, "reasoning": THOUGHT_1},
        {"role": "tool", "tool_call_id": call_1, "content": "sunny"},
        {"role": "assistant", "content": "The tool returned: sunny",
         "reasoning_content": THOUGHT_2, "reasoning": THOUGHT_2},
        {"role": "user", "content": "And tomorrow?"},
    ]


async def post(proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
    status, _, data = await proxy.post(body)
    assert status == 200, data
    response: dict[str, Any] = json.loads(data)
    return response


async def test_previous_response_id_replays_each_turns_reasoning(proxy: Proxy,
                                                                 mock: MockUpstream) -> None:
    first = await post(proxy, {**BASE, "input": "Weather in Paris?"})
    assert outputs(first) == ["reasoning", "function_call"]
    assert reasoning_of(first) == THOUGHT_1
    call_1 = call_of(first)["call_id"]
    second = await post(proxy, {**BASE, "previous_response_id": first["id"], "input": [
        {"type": "function_call_output", "call_id": call_1, "output": "sunny"}]})
    assert outputs(second) == ["reasoning", "message"]
    assert reasoning_of(second) == THOUGHT_2  # the mock saw the first thought come back
    assert mock.requests[1].body["messages"] == expected_third_turn(call_1)[:3]
    third = await post(proxy, {**BASE, "previous_response_id": second["id"],
                               "input": "And tomorrow?"})
    assert reasoning_of(third) == THOUGHT_3
    assert mock.requests[2].body["messages"] == expected_third_turn(call_1)
    # The store keeps the reasoning items as they were streamed.
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{first['id']}")) as got:
        stored = await got.json()
    assert stored["output"] == first["output"]


async def test_inline_items_replay_without_the_store(proxy: Proxy, mock: MockUpstream) -> None:
    history: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await post(proxy, {**BASE, "input": history, "store": False})
    call_1 = call_of(first)["call_id"]
    history += [*first["output"],
                {"type": "function_call_output", "call_id": call_1, "output": "sunny"}]
    second = await post(proxy, {**BASE, "input": history, "store": False})
    assert reasoning_of(second) == THOUGHT_2
    history += [*second["output"], {"role": "user", "content": "And tomorrow?"}]
    third = await post(proxy, {**BASE, "input": history, "store": False})
    assert reasoning_of(third) == THOUGHT_3
    assert mock.requests[2].body["messages"] == expected_third_turn(call_1)


def sealed_only(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as a client keeping only the opaque blob would send them back."""
    kept = []
    for item in items:
        if item["type"] == "reasoning":
            assert item["encrypted_content"]
            item = {"type": "reasoning", "id": item["id"], "summary": [],
                    "encrypted_content": item["encrypted_content"]}
        kept.append(item)
    return kept


async def test_encrypted_reasoning_with_store_false_over_http(proxy: Proxy,
                                                              mock: MockUpstream) -> None:
    body = {**BASE, "store": False, "include": ["reasoning.encrypted_content"]}
    history: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await post(proxy, {**body, "input": history})
    assert THOUGHT_1 not in first["output"][0]["encrypted_content"]
    call_1 = call_of(first)["call_id"]
    history += [*sealed_only(first["output"]),
                {"type": "function_call_output", "call_id": call_1, "output": "sunny"}]
    second = await post(proxy, {**body, "input": history})
    assert reasoning_of(second) == THOUGHT_2
    history += [*sealed_only(second["output"]), {"role": "user", "content": "And tomorrow?"}]
    third = await post(proxy, {**body, "input": history})
    assert reasoning_of(third) == THOUGHT_3
    assert mock.requests[2].body["messages"] == expected_third_turn(call_1)

    # A tampered blob, and one sealed for someone else, are refused before anything goes up.
    sent = len(mock.requests)
    tampered = json.loads(json.dumps(history))
    blob = tampered[1]["encrypted_content"]
    tampered[1]["encrypted_content"] = blob[:20] + ("A" if blob[20] != "A" else "B") + blob[21:]
    status, _, data = await proxy.post({**body, "input": tampered})
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == "input[1].encrypted_content", data
    assert error["code"] == "invalid_encrypted_content"
    compaction = await proxy.post({"model": "mock", "input": "x"},
                                  path="/v1/responses/compact")
    cmp_blob = json.loads(compaction[2])["output"][-1]["encrypted_content"]
    swapped = json.loads(json.dumps(history))
    swapped[1]["encrypted_content"] = cmp_blob  # a compaction blob passed as reasoning
    status, _, data = await proxy.post({**body, "input": swapped})
    assert status == 400 and json.loads(data)["error"]["param"] == "input[1].encrypted_content"
    assert len(mock.requests) == sent + 1  # only the compaction call went upstream


async def test_foreign_caller_cannot_open_a_blob(start_proxy: StartProxy, settings: Settings
                                                 ) -> None:
    import dataclasses

    proxy = await start_proxy(dataclasses.replace(settings, auth_mode="keys",
                                                  api_keys="key-one-123456,key-two-123456"))
    body = {**BASE, "store": False, "include": ["reasoning.encrypted_content"],
            "input": "Weather in Paris?"}
    status, _, data = await proxy.post(body, headers={"Authorization": "Bearer key-one-123456"})
    assert status == 200, data
    items = sealed_only(json.loads(data)["output"])
    follow = {**body, "input": [{"role": "user", "content": "hi"}, *items]}
    status, _, data = await proxy.post(follow,
                                       headers={"Authorization": "Bearer key-two-123456"})
    assert status == 400 and json.loads(data)["error"]["param"] == "input[1].encrypted_content"
    status, _, data = await proxy.post(follow,
                                       headers={"Authorization": "Bearer key-one-123456"})
    assert status == 200, data


async def test_encrypted_reasoning_with_store_false_over_websocket(proxy: Proxy,
                                                                   mock: MockUpstream) -> None:
    body = {"type": "response.create", **BASE, "store": False,
            "include": ["reasoning.encrypted_content"]}
    history: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(proxy)) as ws:
        await ws.send_json({**body, "input": history})
        first = (await read_turn(ws))[-1]["response"]
        call_1 = call_of(first)["call_id"]
        history += [*sealed_only(first["output"]),
                    {"type": "function_call_output", "call_id": call_1, "output": "sunny"}]
        await ws.send_json({**body, "input": history})
        second = (await read_turn(ws))[-1]["response"]
        assert reasoning_of(second) == THOUGHT_2
        history += [*sealed_only(second["output"]), {"role": "user", "content": "And tomorrow?"}]
        await ws.send_json({**body, "input": history})
        third = (await read_turn(ws))[-1]["response"]
        assert reasoning_of(third) == THOUGHT_3
        assert mock.requests[2].body["messages"] == expected_third_turn(call_1)
        # Continuing on the socket with previous_response_id and only the new items works too.
        await ws.send_json({**body, "previous_response_id": third["id"], "input": [
            {"type": "function_call_output", "call_id": call_of(third)["call_id"],
             "output": "rain"}]})
        fourth = (await read_turn(ws))[-1]["response"]
        assert reasoning_of(fourth) == "I recall 3 earlier thoughts. The tool answered; " \
            "I can reply now."
        tampered = json.loads(json.dumps(history))
        tampered[1]["encrypted_content"] = "gAAAA" + tampered[1]["encrypted_content"][5:-3]
        await ws.send_json({**body, "input": tampered})
        [envelope] = await read_turn(ws)
        check_envelope(envelope, 400, "invalid_encrypted_content", "input[1].encrypted_content")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "none"])
async def test_reasoning_field_setting_end_to_end(start_proxy: StartProxy, settings: Settings,
                                                  mock: MockUpstream, field: str) -> None:
    import dataclasses

    proxy = await start_proxy(dataclasses.replace(settings, upstream_reasoning_field=field))
    first = await post(proxy, {**BASE, "input": "Weather in Paris?"})
    await post(proxy, {**BASE, "previous_response_id": first["id"], "input": [
        {"type": "function_call_output", "call_id": call_of(first)["call_id"],
         "output": "sunny"}]})
    assistant = mock.requests[1].body["messages"][1]
    assert {k for k in assistant if k.startswith("reasoning")} == (
        set() if field == "none" else {field})


async def test_summary_stream_and_store(proxy: Proxy, mock: MockUpstream) -> None:
    del mock
    events, done = await proxy.stream({"model": "mock-reasoning", "input": "hello",
                                       "reasoning": {"summary": "auto", "effort": "low"}})
    assert done
    kinds = [e["type"] for e in events]
    assert "response.reasoning_summary_text.delta" in kinds
    assert "response.reasoning.delta" not in kinds
    deltas = "".join(e["delta"] for e in events
                     if e["type"] == "response.reasoning_summary_text.delta")
    final = events[-1]["response"]
    item = final["output"][0]
    assert item["summary"] == [{"type": "summary_text", "text": deltas}]
    assert item["content"] == [{"type": "reasoning_text", "text": deltas}]
    assert final["reasoning"] == {"effort": "low", "summary": "auto"}
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
