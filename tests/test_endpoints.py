"""`GET /v1/models` (cached, authenticated) and `POST /v1/responses/input_tokens` (counted by
the upstream's `/tokenize`, or a clear 501)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream
from tests.conftest import Proxy

StartProxy = Callable[[Settings], Awaitable[Proxy]]
ServerFactory = Callable[..., Awaitable[TestServer]]

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


async def get_models(proxy: Proxy, headers: dict[str, str] | None = None
                     ) -> tuple[int, dict[str, Any]]:
    async with proxy.session.get(proxy.server.make_url("/v1/models"), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_models_lists_upstream_and_aliases_and_is_cached(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    # (The readiness probe also lists models: off, so that only /v1/models counts.)
    proxy = await start_proxy(dataclasses.replace(settings, model_map={"gpt-5": "mock"},
                                                  upstream_probe_interval=0))
    before = mock.model_listings
    status, body = await get_models(proxy)
    assert status == 200 and body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "mock" in ids and "gpt-5" in ids
    assert (await get_models(proxy))[1] == body
    assert mock.model_listings - before == 1  # the second answer came from the cache


async def test_models_cache_off(start_proxy: StartProxy, settings: Settings,
                                mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, models_cache_seconds=0,
                                                  upstream_probe_interval=0))
    before = mock.model_listings
    await get_models(proxy)
    await get_models(proxy)
    assert mock.model_listings - before == 2


async def test_models_needs_a_key(start_proxy: StartProxy, settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, auth_mode="keys",
                                                  api_keys="sk-gw-1"))
    status, body = await get_models(proxy)
    assert status == 401 and body["error"]["code"]
    status, body = await get_models(proxy, {"Authorization": "Bearer sk-gw-1"})
    assert status == 200 and body["data"]


async def test_models_with_the_openai_sdk(proxy: Proxy) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-x", max_retries=0)
    ids = [model.id async for model in client.models.list()]
    assert "mock" in ids


async def test_input_tokens_counts_what_the_request_would_use(proxy: Proxy,
                                                              mock: MockUpstream) -> None:
    body = {"model": "mock", "instructions": "Be brief and kind.", "tools": [WEATHER],
            "input": [{"role": "user", "content": "What is the weather in Paris today?"}]}
    status, _, data = await proxy.post(body, path="/v1/responses/input_tokens")
    assert status == 200, data
    counted = json.loads(data)
    assert counted["object"] == "response.input_tokens"
    status, _, data = await proxy.post(body)
    assert status == 200, data
    assert counted["input_tokens"] == json.loads(data)["usage"]["input_tokens"] == 11
    [sent] = mock.tokenize_requests
    assert sent["messages"] == mock.requests[0].body["messages"]
    assert sent["tools"] == mock.requests[0].body["tools"]
    assert sent["add_generation_prompt"] is True


async def test_input_tokens_with_the_openai_sdk(proxy: Proxy) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-x", max_retries=0)
    counted = await client.responses.input_tokens.count(model="mock", input="one two three")
    assert counted.input_tokens == 3


async def test_input_tokens_continues_a_stored_response(proxy: Proxy) -> None:
    status, _, data = await proxy.post({"model": "mock", "input": "alpha beta"})
    first = json.loads(data)
    status, _, data = await proxy.post({"model": "mock", "input": "gamma",
                                        "previous_response_id": first["id"]},
                                       path="/v1/responses/input_tokens")
    assert status == 200, data
    # "alpha beta" + "You said: alpha beta" + "gamma"
    assert json.loads(data)["input_tokens"] == 2 + 4 + 1


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "mock"}, 400, "input", "missing_required_parameter"),
    ({"model": "mock", "input": "x", "temperature": 9}, 400, "temperature",
     "decimal_above_max_value"),
    ({"model": "mock", "input": "x", "previous_response_id": "resp_no"}, 400,
     "previous_response_id", "previous_response_not_found"),
])
async def test_input_tokens_bad_requests(proxy: Proxy, body: dict[str, Any], status: int,
                                         param: str, code: str) -> None:
    got, _, data = await proxy.post(body, path="/v1/responses/input_tokens")
    error = json.loads(data)["error"]
    assert (got, error["param"], error["code"]) == (status, param, code)


async def test_input_tokens_without_tokenize_is_a_clear_501(
        start_proxy: StartProxy, settings: Settings, aiohttp_server: ServerFactory) -> None:
    """An upstream without /tokenize (OpenAI, LiteLLM): a 501 error object, not a 404/405."""
    app = web.Application()
    server = await aiohttp_server(app, host="127.0.0.1")
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=str(server.make_url("/v1")), upstream_probe_interval=0))
    status, _, data = await proxy.post({"model": "m", "input": "x"},
                                       path="/v1/responses/input_tokens")
    error = json.loads(data)["error"]
    assert (status, error["code"], error["type"]) == (501, "input_tokens_unavailable",
                                                      "invalid_request_error")
    assert "/tokenize" in error["message"]
