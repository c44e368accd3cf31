"""Tool outputs must answer a call of their context (history + input): 400 `input[i].call_id`
otherwise, on every backend (vLLM and llama.cpp would accept the orphan silently)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from orp_proxy.errors import ApiError
from orp_proxy.protocol.calls import check_outputs_answer_calls
from orp_proxy.upstream.mock import MockUpstream
from tests.conftest import Proxy

WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def call(call_id: str, kind: str = "function_call") -> dict[str, Any]:
    if kind == "custom_tool_call":
        return {"type": kind, "call_id": call_id, "name": "apply_patch", "input": "x"}
    return {"type": kind, "call_id": call_id, "name": "get_weather", "arguments": "{}"}


def output(call_id: str, kind: str = "function_call_output") -> dict[str, Any]:
    return {"type": kind, "call_id": call_id, "output": "sunny"}


USER = {"type": "message", "role": "user", "content": "hi"}
COMPACTION = {"type": "compaction", "encrypted_content": "sealed"}


@pytest.mark.parametrize(("history", "items"), [
    ([], [USER, call("c1"), output("c1")]),
    ([USER, call("c1")], [output("c1")]),  # Codex over WebSocket: only the output
    ([], [output("c1"), call("c1")]),  # order is the translator's business
    ([call("c1"), call("c2")], [output("c2"), output("c1")]),
    ([], [call("c1", "custom_tool_call"), output("c1", "custom_tool_call_output")]),
    ([call("c1", "shell_call")], [output("c1", "shell_call_output")]),
    # After a compaction the calls it folded in cannot be seen: not checked.
    ([COMPACTION], [output("c9")]),
    ([], [COMPACTION, USER, output("c9")]),
    ([], [USER]),
])
def test_answered_outputs_pass(history: list[dict[str, Any]],
                               items: list[dict[str, Any]]) -> None:
    check_outputs_answer_calls(history, items)


@pytest.mark.parametrize(("history", "items", "param"), [
    ([], [USER, output("c1")], "input[1].call_id"),
    ([call("c1")], [output("c2")], "input[0].call_id"),
    ([], [call("c1"), output("c1"), output("c3")], "input[2].call_id"),
    ([], [output("c1", "custom_tool_call_output")], "input[0].call_id"),
    # A compaction later in the input does not excuse an earlier orphan.
    ([], [output("c1"), COMPACTION], "input[0].call_id"),
])
def test_orphan_outputs_are_400(history: list[dict[str, Any]], items: list[dict[str, Any]],
                                param: str) -> None:
    with pytest.raises(ApiError) as info:
        check_outputs_answer_calls(history, items)
    assert (info.value.status, info.value.param, info.value.code) == (400, param,
                                                                       "invalid_value")
    assert "No tool call found" in str(info.value)


async def test_http_orphan_never_reaches_the_upstream(proxy: Proxy, mock: MockUpstream) -> None:
    status, _, data = await proxy.post({"model": "m", "tools": [WEATHER], "input": [
        USER, call("c1"), output("c1"), output("c_orphan")]})
    error = json.loads(data)["error"]
    assert (status, error["param"], error["code"]) == (400, "input[3].call_id", "invalid_value")
    assert mock.requests == []


async def test_output_answering_the_previous_response(proxy: Proxy, mock: MockUpstream) -> None:
    status, _, data = await proxy.post({"model": "mock-tools", "tools": [WEATHER],
                                        "input": "Weather in Paris?"})
    assert status == 200, data
    first = json.loads(data)
    [fc] = [item for item in first["output"] if item["type"] == "function_call"]
    status, _, data = await proxy.post({"model": "mock-tools", "tools": [WEATHER],
                                        "previous_response_id": first["id"],
                                        "input": [output(fc["call_id"])]})
    assert status == 200, data
    status, _, data = await proxy.post({"model": "mock-tools", "tools": [WEATHER],
                                        "previous_response_id": first["id"],
                                        "input": [output("call_elsewhere")]})
    assert (status, json.loads(data)["error"]["param"]) == (400, "input[0].call_id")
    assert len(mock.requests) == 2


async def test_websocket_output_only_turn_continues(proxy: Proxy, mock: MockUpstream) -> None:
    """Codex over WebSocket: store false, the next turn sends only the function_call_output."""
    url = str(proxy.server.make_url("/v1/responses"))
    async with proxy.session.ws_connect(url) as ws:
        async def turn(**body: Any) -> dict[str, Any]:
            await ws.send_json({"type": "response.create", "model": "mock-tools",
                                "tools": [WEATHER], "store": False, "stream": True, **body})
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT
                event = json.loads(msg.data)
                if event["type"] in ("response.completed", "response.failed", "error"):
                    return dict(event)

        first = (await turn(input="Weather in Paris?"))["response"]
        [fc] = [item for item in first["output"] if item["type"] == "function_call"]
        second = await turn(previous_response_id=first["id"], input=[output(fc["call_id"])])
        assert second["type"] == "response.completed"
        envelope = await turn(previous_response_id=second["response"]["id"],
                              input=[output(fc["call_id"] + "x")])
        assert (envelope["status"], envelope["error"]["param"]) == (400, "input[0].call_id")
    assert len(mock.requests) == 2
