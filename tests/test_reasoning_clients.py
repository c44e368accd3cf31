"""Reasoning with clients we did not write, against the mock's thinking model with tools: the
`openai` SDK, LangChain (`langchain-openai`), pydantic-ai, and the Vercel AI SDK (a node script,
tests/node/reasoning.mjs).

Each checks the client shows the reasoning where it looks for it, and that the reasoning it
sends back on the next turn reaches the upstream (the mock's next thought says how many earlier
thoughts it received).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest

from orp_proxy.upstream.mock import MockUpstream
from tests.conftest import Proxy

NODE_DIR = Path(__file__).resolve().parent / "node"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
THOUGHT_1 = "I recall 0 earlier thoughts. I need the tool get_weather first."
THOUGHT_2 = "I recall 1 earlier thoughts. The tool answered; I can reply now."


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0)


def recalled(mock: MockUpstream, index: int) -> list[str]:
    """The reasoning the upstream received on request `index`, per assistant message."""
    return [m.get("reasoning_content") or "" for m in mock.requests[index].body["messages"]
            if m["role"] == "assistant"]


# -- openai SDK ----------------------------------------------------------------------------


async def test_openai_sdk_stream_sees_reasoning_text_events(proxy: Proxy) -> None:
    client = sdk(proxy)
    async with client.responses.stream(model="mock-reasoning", input="hello there",
                                       reasoning={"effort": "low"}) as stream:
        deltas = [event.delta async for event in stream
                  if event.type == "response.reasoning_text.delta"]
        final = await stream.get_final_response()
    item = final.output[0]
    assert item.type == "reasoning" and item.content is not None
    assert "".join(deltas) == item.content[0].text != ""
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0


async def test_openai_sdk_summary_events(proxy: Proxy) -> None:
    client = sdk(proxy)
    async with client.responses.stream(model="mock-reasoning", input="hello there",
                                       reasoning={"summary": "auto"}) as stream:
        deltas = [event.delta async for event in stream
                  if event.type == "response.reasoning_summary_text.delta"]
        final = await stream.get_final_response()
    item = final.output[0]
    assert item.type == "reasoning"
    assert [s.text for s in item.summary] == ["".join(deltas)] and deltas


async def test_openai_sdk_include_round_trip_store_false(proxy: Proxy, mock: MockUpstream
                                                         ) -> None:
    client = sdk(proxy)
    kwargs: dict[str, Any] = {"model": "mock-reasoning", "tools": [WEATHER], "store": False,
                              "include": ["reasoning.encrypted_content"]}
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    async with client.responses.stream(input=history, **kwargs) as stream:
        first = await stream.get_final_response()
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    call = first.output[1]
    assert call.type == "function_call"
    # What an SDK user does: the output items (model_dump), then the tool result.
    history += [item.model_dump(exclude_none=True, warnings=False) for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    second = await client.responses.create(input=history, **kwargs)
    assert second.output[0].content[0].text == THOUGHT_2  # type: ignore[union-attr,index]
    assert recalled(mock, 1) == [THOUGHT_1]
    assert second.output_text == "The tool returned: sunny"


async def test_openai_sdk_websocket_round_trip(proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    kwargs: dict[str, Any] = {"model": "mock-reasoning", "tools": [WEATHER], "store": False,
                              "include": ["reasoning.encrypted_content"]}
    async with client.responses.connect() as connection:
        await connection.response.create(input="Weather in Paris?", **kwargs)
        first: Any = None
        async for event in connection:
            if event.type == "response.completed":
                first = event.response
                break
        call = first.output[1]
        await connection.response.create(
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            **kwargs)
        kinds = []
        async for event in connection:
            kinds.append(event.type)
            if event.type == "response.completed":
                second = event.response
                break
    assert "response.reasoning_text.delta" in kinds  # OpenAI's names for this client
    assert second.output[0].content[0].text == THOUGHT_2
    assert recalled(mock, 1) == [THOUGHT_1]


# -- LangChain -----------------------------------------------------------------------------


async def test_langchain_reasoning_block_and_replay(proxy: Proxy, mock: MockUpstream) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="mock-reasoning", base_url=proxy.url, api_key="sk-client",
                     use_responses_api=True, reasoning={"effort": "low", "summary": "auto"},
                     max_retries=0)
    tool_llm = llm.bind_tools([WEATHER])
    question = HumanMessage("Weather in Paris?")
    first = await tool_llm.ainvoke([question])
    blocks = [b for b in first.content_blocks if b["type"] == "reasoning"]
    assert [b.get("reasoning") for b in blocks] == [THOUGHT_1]
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    tool_result = ToolMessage("sunny", tool_call_id=first.tool_calls[0]["id"])
    second = await tool_llm.ainvoke([question, first, tool_result])
    assert recalled(mock, 1) == [THOUGHT_1]
    assert [b.get("reasoning") for b in second.content_blocks
            if b["type"] == "reasoning"] == [THOUGHT_2]
    # Streaming: the reasoning arrives as summary deltas and adds up to the same block.
    chunks = [chunk async for chunk in llm.astream("hello there")]
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    streamed = [b.get("reasoning") for b in merged.content_blocks if b["type"] == "reasoning"]
    assert len(streamed) == 1 and streamed[0].startswith("The user wrote"), streamed
    await llm.root_async_client.close()


# -- pydantic-ai ---------------------------------------------------------------------------


async def test_pydantic_ai_thinking_part_and_replay(proxy: Proxy, mock: MockUpstream) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, ThinkingPart
    from pydantic_ai.models.openai import OpenAIResponsesModel, OpenAIResponsesModelSettings
    from pydantic_ai.providers.openai import OpenAIProvider

    client = sdk(proxy)
    model = OpenAIResponsesModel("mock-reasoning", provider=OpenAIProvider(openai_client=client))
    agent = Agent(model, model_settings=OpenAIResponsesModelSettings(
        openai_reasoning_summary="detailed", openai_reasoning_effort="low"))

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return "sunny"

    result = await agent.run("Weather in Paris?")
    thoughts = [part.content for message in result.all_messages()
                if isinstance(message, ModelResponse) for part in message.parts
                if isinstance(part, ThinkingPart)]
    assert thoughts == [THOUGHT_1, THOUGHT_2]
    # The first turn's thinking went back upstream on the next request.
    assert recalled(mock, 1) == [THOUGHT_1]
    assert result.output == "The tool returned: sunny"
    await client.close()


# -- Vercel AI SDK -------------------------------------------------------------------------


def _node_ready() -> bool:
    return shutil.which("node") is not None and (NODE_DIR / "node_modules" / "ai").is_dir()


@pytest.mark.skipif(not _node_ready(),
                    reason="tests/node has no node_modules (`npm ci` there; .ci/run does it)")
@pytest.mark.parametrize("provider", ["open-responses", "openai"])
async def test_vercel_ai_sdk_reasoning_text(proxy: Proxy, mock: MockUpstream, provider: str
                                            ) -> None:
    """`@ai-sdk/open-responses` streams reasoning only from `response.reasoning_text.delta`
    (so it relies on `auto` naming events for it); `@ai-sdk/openai` reads only summaries."""
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "reasoning.mjs"), proxy.url, provider,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    for mode in ("generateText", "streamText"):
        assert report[mode]["reasoningText"].startswith("The user wrote"), report
        assert report[mode]["text"] == "You said: hello there", report
    assert len(mock.requests) == 2  # generateText and streamText, nothing retried
