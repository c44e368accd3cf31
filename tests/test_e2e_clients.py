"""Through a listening ORP with clients we did not write: the `openai` SDK and openresponses-py.

Every raw stream is also checked event by event with `openresponses-types` (tests/sse_check.py).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openresponses import AsyncOpenResponses

from orp_proxy.upstream.mock import (
    MockUpstream,
    Scenario,
    reasoning_chunks,
    refusal_chunks,
    text_chunks,
    tool_call_chunks,
    usage_dict,
)
from tests.conftest import Proxy
from tests.sse_check import check_response_object

WEATHER_TOOL = {
    "type": "function", "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0)


SCENARIOS: dict[str, Any] = {
    "text": lambda: text_chunks(["Hello", ", ", "world"], usage=usage_dict(5, 3)),
    "tools": lambda: tool_call_chunks(
        [("call_1", "get_weather", '{"city": "Paris"}'),
         ("call_2", "get_weather", '{"city": "Rome \\"RM\\""}')],
        split_args=3, interleave=True, usage=usage_dict(9, 12)),
    "reasoning": lambda: reasoning_chunks(["Think", "ing..."], ["The ", "answer"],
                                          usage=usage_dict(4, 9, reasoning=5)),
    "refusal": lambda: refusal_chunks(["I can't ", "do that"], usage=usage_dict(4, 4)),
}


async def test_openai_sdk_json(proxy: Proxy) -> None:
    client = sdk(proxy)
    response = await client.responses.create(model="mock", input="hello there",
                                             instructions="Be kind.", temperature=0.5)
    assert response.status == "completed"
    assert response.output_text == "You said: hello there"
    assert response.temperature == 0.5 and response.instructions == "Be kind."
    check_response_object(response.model_dump(mode="json"))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_openai_sdk_create_stream(proxy: Proxy, mock: MockUpstream, scenario: str
                                        ) -> None:
    mock.enqueue(Scenario(chunks=SCENARIOS[scenario]()))
    client = sdk(proxy)
    stream = await client.responses.create(model="m", input="go", tools=[WEATHER_TOOL],
                                           stream=True)
    seen = [event async for event in stream]
    assert seen[0].type == "response.created" and seen[-1].type == "response.completed"
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    final = seen[-1].response
    assert final.usage is not None and final.usage.total_tokens > 0
    if scenario == "tools":
        calls = [o for o in final.output if o.type == "function_call"]
        assert [(c.call_id, c.arguments) for c in calls] == [
            ("call_1", '{"city": "Paris"}'), ("call_2", '{"city": "Rome \\"RM\\""}')]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_openai_sdk_stream_helper(proxy: Proxy, mock: MockUpstream, scenario: str
                                        ) -> None:
    mock.enqueue(Scenario(chunks=SCENARIOS[scenario]()))
    client = sdk(proxy)
    async with client.responses.stream(model="m", input="go", tools=[WEATHER_TOOL]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert final.status == "completed"
    types = [o.type for o in final.output]
    expected = {"text": ["message"], "tools": ["function_call", "function_call"],
                "reasoning": ["reasoning", "message"], "refusal": ["message"]}[scenario]
    assert types == expected
    if scenario == "text":
        assert final.output_text == "Hello, world"
    if scenario == "reasoning":
        assert final.output_text == "The answer"
        assert final.usage is not None
        assert final.usage.output_tokens_details.reasoning_tokens == 5
    if scenario == "refusal":
        part = final.output[0].content[0]  # type: ignore[union-attr]
        assert part.type == "refusal" and part.refusal == "I can't do that"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_openresponses_strict_client(proxy: Proxy, mock: MockUpstream, scenario: str
                                           ) -> None:
    mock.enqueue(Scenario(chunks=SCENARIOS[scenario]()))
    async with AsyncOpenResponses(base_url=proxy.url, api_key="sk-client") as client:
        stream = await client.responses.create(
            {"model": "m", "input": "go", "tools": [WEATHER_TOOL], "stream": True})
        events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert stream.final_response is not None
    assert stream.final_response.status == "completed"


async def test_openresponses_strict_client_json(proxy: Proxy) -> None:
    async with AsyncOpenResponses(base_url=proxy.url, api_key="sk-client") as client:
        response = await client.responses.create({"model": "mock", "input": "hi"})
    assert response.status == "completed"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_raw_stream_every_event_validates(proxy: Proxy, mock: MockUpstream,
                                                scenario: str) -> None:
    mock.enqueue(Scenario(chunks=SCENARIOS[scenario](), split=1))  # one byte per write
    events, done = await proxy.stream({"model": "m", "input": "go", "tools": [WEATHER_TOOL]})
    assert done and events[-1]["type"] == "response.completed"


async def test_stream_and_json_give_the_same_response(proxy: Proxy, mock: MockUpstream
                                                      ) -> None:
    mock.enqueue(Scenario(chunks=SCENARIOS["reasoning"]()),
                 Scenario(chunks=SCENARIOS["reasoning"]()))
    events, _ = await proxy.stream({"model": "m", "input": "go"})
    status, _, body = await proxy.post({"model": "m", "input": "go"})
    assert status == 200
    import json

    streamed = events[-1]["response"]
    returned = json.loads(body)

    def shape(r: dict[str, Any]) -> Any:
        return [(o["type"], o.get("content")) for o in r["output"]], r["usage"], r["status"]

    assert shape(streamed) == shape(returned)
