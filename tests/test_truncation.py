"""`truncation: "auto"`: after the upstream says the context does not fit, ORP drops the older
half of the turns (system and developer messages kept, a turn never split) and tries again;
`"disabled"` (the default) passes the upstream's 400 on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orp_proxy.protocol.truncation import drop_older_turns
from orp_proxy.upstream.mock import MockUpstream, Scenario
from tests.conftest import Proxy


def msg(role: str, text: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": text}


CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
SYSTEM = msg("developer", "rules")


def test_drops_the_older_half_by_whole_turns() -> None:
    turns = [msg("user", "u1"), msg("assistant", "a1"), msg("user", "u2"), CALL, OUTPUT,
             msg("assistant", "a2"), msg("user", "u3"), msg("assistant", "a3"), msg("user", "u4")]
    shorter = drop_older_turns([SYSTEM, *turns])
    assert shorter == [SYSTEM, msg("user", "u3"), msg("assistant", "a3"), msg("user", "u4")]
    again = drop_older_turns(shorter)
    assert again == [SYSTEM, msg("user", "u4")]
    assert drop_older_turns(again) is None


def test_a_call_is_never_separated_from_its_output() -> None:
    context = [msg("user", "u1"), CALL, OUTPUT, msg("assistant", "a"), msg("user", "u2"),
               CALL, OUTPUT]
    shorter = drop_older_turns(context)
    assert shorter == [msg("user", "u2"), CALL, OUTPUT]


@pytest.mark.parametrize("context", [[], [SYSTEM], [msg("user", "only")],
                                     [SYSTEM, msg("user", "u"), CALL, OUTPUT]])
def test_nothing_to_drop(context: list[dict[str, Any]]) -> None:
    assert drop_older_turns(context) is None


OVERFLOW = Scenario(status=400, body={"error": {
    "message": "This model's maximum context length is 64 tokens.",
    "type": "invalid_request_error", "code": "context_length_exceeded"}})
CONVERSATION = [msg("user", "one two three"), msg("assistant", "four five"),
                msg("user", "six seven"), msg("assistant", "eight"), msg("user", "nine")]


async def test_auto_retries_with_fewer_turns(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(OVERFLOW)
    status, _, data = await proxy.post({"model": "m", "instructions": "Be brief.",
                                        "truncation": "auto", "input": CONVERSATION})
    assert status == 200, data
    response = json.loads(data)
    assert response["truncation"] == "auto" and response["status"] == "completed"
    first, second = (r.body["messages"] for r in mock.requests)
    assert len(first) == 6
    assert second == [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "six seven"},
                      {"role": "assistant", "content": "eight"},
                      {"role": "user", "content": "nine"}]
    # The store keeps what the client sent, whole.
    async with proxy.session.get(proxy.server.make_url(
            f"/v1/responses/{response['id']}/input_items")) as resp:
        assert len((await resp.json())["data"]) == len(CONVERSATION)


async def test_auto_gives_up_when_one_turn_does_not_fit(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW)
    status, _, data = await proxy.post({"model": "m", "truncation": "auto",
                                        "input": CONVERSATION, "stream": True})
    error = json.loads(data)["error"]
    assert (status, error["code"]) == (400, "context_length_exceeded")
    assert [len(r.body["messages"]) for r in mock.requests] == [5, 3, 1]


@pytest.mark.parametrize("truncation", ["disabled", None])
async def test_disabled_passes_the_overflow_on(proxy: Proxy, mock: MockUpstream,
                                              truncation: str | None) -> None:
    mock.enqueue(OVERFLOW)
    status, _, data = await proxy.post({"model": "m", "truncation": truncation,
                                        "input": CONVERSATION})
    error = json.loads(data)["error"]
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "input")
    assert len(mock.requests) == 1
