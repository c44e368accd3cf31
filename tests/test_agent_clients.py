"""Agent frameworks we did not write, end to end against ORP and the mock upstream: the OpenAI
Agents SDK (HTTP and WebSocket, run and streamed), LangChain (`ChatOpenAI` on the Responses
API), pydantic-ai, and LlamaIndex's `OpenAIResponses` (its own virtualenv: it pins openai<3).

`mock-tools` calls the first tool a request declares with `{"city": "Paris"}`, and answers
"The tool returned: ..." once the tool's output comes back: a tool round trip through each
client's own loop. Each test also checks what reached the upstream, so a client that silently
dropped something would fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import openai
import pytest

from orp_proxy.upstream.mock import MockUpstream
from tests.conftest import Proxy

CLIENTS = Path(__file__).resolve().parent / "clients"
ANSWER = "The tool returned: sunny in Paris"


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    ws = str(proxy.server.make_url("/v1")).replace("http://", "ws://", 1)
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0,
                              websocket_base_url=ws)


def tool_round_trip(mock: MockUpstream) -> None:
    """Two upstream requests: the question, then the call and its output."""
    assert len(mock.requests) == 2
    second = mock.requests[1].body["messages"]
    calls = [m for m in second if m["role"] == "assistant" and m.get("tool_calls")]
    results = [m for m in second if m["role"] == "tool"]
    assert len(calls) == 1 and len(results) == 1
    assert calls[0]["tool_calls"][0]["id"] == results[0]["tool_call_id"]
    assert results[0]["content"] == "sunny in Paris"


# -- OpenAI Agents SDK ------------------------------------------------------------------------


def _agent(model: Any) -> Any:
    from agents import Agent, ModelSettings, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return f"sunny in {city}"

    return Agent(name="weather", instructions="Be brief.", model=model, tools=[get_weather],
                 model_settings=ModelSettings(store=False, prompt_cache_retention="24h",
                                              verbosity="low"))


@pytest.mark.parametrize("transport", ["http", "websocket"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_openai_agents(proxy: Proxy, mock: MockUpstream, transport: str,
                             streamed: bool, caplog: pytest.LogCaptureFixture) -> None:
    from agents import OpenAIResponsesModel, Runner, set_tracing_disabled
    from agents.models.openai_responses import OpenAIResponsesWSModel

    caplog.set_level(logging.INFO, logger="orp.access")
    set_tracing_disabled(True)
    client = sdk(proxy)
    model_class = OpenAIResponsesWSModel if transport == "websocket" else OpenAIResponsesModel
    model = model_class(model="mock-tools", openai_client=client)
    agent = _agent(model)
    try:
        if streamed:
            result = Runner.run_streamed(agent, "Weather in Paris?")
            kinds = {event.type async for event in result.stream_events()}
            assert "raw_response_event" in kinds
        else:
            result = await Runner.run(agent, "Weather in Paris?")
    finally:
        if transport == "websocket":
            await model.close()
    assert result.final_output == ANSWER
    tool_round_trip(mock)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "orp.access"]
    # Both turns went over the transport under test (no fallback to the other); the upgrade
    # itself has a GET line of its own.
    assert [line["method"] for line in lines if line["method"] != "GET"] == (
        ["WS", "WS"] if transport == "websocket" else ["POST", "POST"])
    first = mock.requests[0].body
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    assert first["verbosity"] == "low"


# -- LangChain ---------------------------------------------------------------------------------


def _langchain(proxy: Proxy, model: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=proxy.url, api_key="sk-client",  # type: ignore[arg-type]
                      use_responses_api=True, max_retries=0,
                      model_kwargs={"user": "u-1", "prompt_cache_key": "thread-1"})


async def test_langchain_chat(proxy: Proxy, mock: MockUpstream) -> None:
    reply = await _langchain(proxy, "mock").ainvoke("hello there")
    assert reply.text == "You said: hello there"
    sent = mock.requests[0].body
    assert (sent["user"], sent["prompt_cache_key"]) == ("u-1", "thread-1")


async def test_langchain_tool_call(proxy: Proxy, mock: MockUpstream) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return f"sunny in {city}"

    llm = _langchain(proxy, "mock-tools").bind_tools([get_weather])
    messages: list[Any] = [HumanMessage("Weather in Paris?")]
    first = await llm.ainvoke(messages)
    [call] = first.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})
    messages += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    second = await llm.ainvoke(messages)
    assert second.text == ANSWER
    tool_round_trip(mock)


# -- pydantic-ai -------------------------------------------------------------------------------


def _pydantic_agent(proxy: Proxy, model_name: str, tools: bool) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(openai_client=sdk(proxy))
    agent = Agent(OpenAIResponsesModel(model_name, provider=provider), instructions="Be brief.")
    if tools:
        @agent.tool_plain
        def get_weather(city: str) -> str:
            """Get the weather for a city."""
            return f"sunny in {city}"
    return agent


async def test_pydantic_ai_chat(proxy: Proxy, mock: MockUpstream) -> None:
    result = await _pydantic_agent(proxy, "mock", tools=False).run("hello there")
    assert result.output == "You said: hello there"
    assert mock.requests[0].body["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_pydantic_ai_tool_call(proxy: Proxy, mock: MockUpstream) -> None:
    result = await _pydantic_agent(proxy, "mock-tools", tools=True).run("Weather in Paris?")
    assert result.output == ANSWER
    tool_round_trip(mock)


async def test_pydantic_ai_openai_model_name_streamed(start_proxy: Any, settings: Any,
                                                      mock: MockUpstream) -> None:
    """For OpenAI model names pydantic-ai adds `reasoning: {context: "all_turns"}` and
    `include: [reasoning.encrypted_content]` to every request."""
    import dataclasses

    proxy = await start_proxy(dataclasses.replace(settings, model_map={"gpt-5.4": "mock-tools"}))
    agent = _pydantic_agent(proxy, "gpt-5.4", tools=True)
    async with agent.run_stream("Weather in Paris?") as run:
        output = await run.get_output()
    assert output == ANSWER
    tool_round_trip(mock)


# -- LlamaIndex (its own virtualenv: llama-index-llms-openai pins openai<3) --------------------


async def test_llamaindex_openai_responses(start_proxy: Any, settings: Any,
                                           mock: MockUpstream) -> None:
    import dataclasses

    python = os.environ.get("LLAMAINDEX_PYTHON")
    if not python:
        pytest.skip("LLAMAINDEX_PYTHON unset: scripts/test creates that virtualenv and sets it")
    proxy = await start_proxy(dataclasses.replace(
        settings, model_map={"gpt-4.1": "mock", "gpt-4.1-mini": "mock-tools"}))
    proc = await asyncio.create_subprocess_exec(
        python, str(CLIENTS / "llamaindex_responses.py"), proxy.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    results = json.loads(out.decode().strip().splitlines()[-1])
    assert results == {
        "chat": "You said: hello there",
        "stream": "You said: hello again",
        "tool_call": {"name": "get_weather", "kwargs": {"city": "Paris"}},
        "tool_answer": ANSWER,
    }, results
    # Every request carried LlamaIndex's explicit nulls (include, user, ...) and passed.
    assert len(mock.requests) == 4
    tool_answer = mock.requests[3].body["messages"]
    assert [m["role"] for m in tool_answer] == ["user", "assistant", "tool"]
