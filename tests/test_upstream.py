"""Reading the upstream's body (orp_proxy.upstream.client): connection reuse when the body ends
after `[DONE]`, bounds on a non-streamed JSON answer, its shape, and error-message scrubbing.

The upstreams here are plain aiohttp servers on 127.0.0.1 that misbehave in one precise way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orp_proxy.config import Settings
from orp_proxy.state import GATEWAY
from orp_proxy.upstream import client as upstream_module
from orp_proxy.upstream.client import UpstreamStreamError, completion_as_chunk, status_error
from orp_proxy.upstream.mock import MockUpstream, Scenario
from orp_proxy.upstream.scrub import Scrubber
from tests.conftest import Proxy
from tests.test_e2e_http import error_of

StartProxy = Callable[[Settings], Awaitable[Proxy]]
ServerFactory = Callable[..., Awaitable[TestServer]]

CHUNK = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                      "finish_reason": "stop"}]}
DONE_BODY = b"data: " + json.dumps(CHUNK).encode() + b"\n\ndata: [DONE]\n\n"


@dataclasses.dataclass
class LateEnd:
    """An upstream that sends its whole stream, `[DONE]` included, and ends the body
    (the chunked terminator) only `end_delay` seconds later."""

    end_delay: float
    ports: list[int] = dataclasses.field(default_factory=list)
    ended: list[float] = dataclasses.field(default_factory=list)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        self.ports.append(request.transport.get_extra_info("peername")[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(DONE_BODY)
        await asyncio.sleep(self.end_delay)
        with contextlib.suppress(ConnectionError):  # the gateway gave up and hung up
            await resp.write_eof()
        self.ended.append(time.monotonic())
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


async def no_drains_left(proxy: Proxy) -> None:
    """Wait until the gateway has finished reading the ends of upstream bodies."""
    draining = proxy.server.app[GATEWAY].upstream._draining
    async with asyncio.timeout(5):
        await asyncio.gather(*draining)


async def late_end_proxy(aiohttp_server: ServerFactory, start_proxy: StartProxy,
                         settings: Settings, end_delay: float) -> tuple[LateEnd, Proxy]:
    late = LateEnd(end_delay)
    server = await aiohttp_server(late.app(), host="127.0.0.1")
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=str(server.make_url("/v1")), upstream_probe_interval=0))
    return late, proxy


@pytest.mark.parametrize("stream", [True, False])
async def test_a_body_ending_after_done_still_reuses_the_connection(
        aiohttp_server: ServerFactory, start_proxy: StartProxy, settings: Settings,
        stream: bool) -> None:
    late, proxy = await late_end_proxy(aiohttp_server, start_proxy, settings, 0.05)
    for _ in range(4):
        status, _, data = await proxy.post({"model": "m", "input": "x", "stream": stream})
        assert status == 200, data
        await no_drains_left(proxy)  # the body has ended and the connection went back to the pool
    assert len(late.ports) == 4 and len(set(late.ports)) == 1, late.ports


async def test_the_client_does_not_wait_for_the_end_of_the_upstream_body(
        aiohttp_server: ServerFactory, start_proxy: StartProxy, settings: Settings) -> None:
    late, proxy = await late_end_proxy(aiohttp_server, start_proxy, settings, 0.8)
    events, done = await proxy.stream({"model": "m", "input": "x"})
    answered = time.monotonic()
    assert done and events[-1]["type"] == "response.completed"
    await no_drains_left(proxy)
    assert late.ended and answered < late.ended[0], "the terminal event waited for the body"
    await proxy.stream({"model": "m", "input": "x"})
    assert len(set(late.ports)) == 1


async def test_a_body_that_does_not_end_is_closed_after_the_bound(
        aiohttp_server: ServerFactory, start_proxy: StartProxy, settings: Settings) -> None:
    late, proxy = await late_end_proxy(aiohttp_server, start_proxy, settings, 30.0)
    started = time.monotonic()
    events, done = await proxy.stream({"model": "m", "input": "x"})
    assert done and events[-1]["type"] == "response.completed"
    await no_drains_left(proxy)
    gave_up = time.monotonic() - started
    assert upstream_module._DRAIN_SECONDS <= gave_up < upstream_module._DRAIN_SECONDS + 3
    # That connection was closed, not pooled half-read: the next request opens another.
    await proxy.stream({"model": "m", "input": "x"})
    assert len(late.ports) == 2 and late.ports[0] != late.ports[1]


# -- a non-streamed JSON answer ------------------------------------------------------------


def completion(message: Any) -> dict[str, Any]:
    return {"object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_json_answer_over_the_limit_is_a_bad_response(
        aiohttp_server: ServerFactory, start_proxy: StartProxy, settings: Settings,
        chunked: bool) -> None:
    body = json.dumps(completion({"role": "assistant", "content": "x" * 5000})).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not chunked:  # with Content-Length: refused before reading
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for start in range(0, len(body), 512):
            await resp.write(body[start:start + 512])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app, host="127.0.0.1")
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=str(server.make_url("/v1")), max_line_bytes=2048))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    error = error_of(status, data)
    assert (status, error["code"]) == (502, "upstream_bad_response")
    assert "2048 bytes" in error["message"]


async def test_a_json_answer_within_the_limit_works(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(body=completion({"role": "assistant", "content": "whole"})))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert status == 200, data
    assert json.loads(data)["output"][0]["content"][0]["text"] == "whole"


@pytest.mark.parametrize("answer", [
    {"choices": ["x"]},
    {"choices": [None]},
    completion("just a string"),
    completion(["a"]),
    completion({"role": "assistant", "tool_calls": "abc"}),
    completion({"role": "assistant", "tool_calls": ["x"]}),
    completion({"role": "assistant", "tool_calls": [5]}),
    completion({"role": "assistant", "tool_calls": {"0": {}}}),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_json_answer_of_the_wrong_shape_is_a_bad_response(
        proxy: Proxy, mock: MockUpstream, answer: dict[str, Any], stream: bool) -> None:
    mock.enqueue(Scenario(body=answer))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": stream})
    if stream:
        assert status == 200
        failed = [json.loads(line[6:]) for line in data.split(b"\n")
                  if line.startswith(b"data: {")][-1]
        assert failed["type"] == "response.failed"
        assert failed["response"]["error"]["code"] == "upstream_bad_response"
    else:
        assert (status, error_of(status, data)["code"]) == (502, "upstream_bad_response")


def test_completion_as_chunk_shapes() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    chunk = completion_as_chunk(completion({"role": "assistant", "tool_calls": calls}))
    assert chunk["choices"][0]["delta"]["tool_calls"] == [{**calls[0], "index": 0}]
    assert completion_as_chunk(completion(None))["choices"][0]["delta"] == {}
    for bad in ({"choices": [1]}, completion(3), completion({"tool_calls": [[]]})):
        with pytest.raises(UpstreamStreamError) as caught:
            completion_as_chunk(bad)
        assert caught.value.code == "upstream_bad_response"


# -- error messages ------------------------------------------------------------------------


def test_a_key_split_by_the_cut_is_not_half_shown() -> None:
    key = "sk-ABCDEFGHIJKLMNOP"
    # A long URL that scrubbing shortens to "[url]", so that the end of the part that was
    # scrubbed (where the cut split the key) lands within the message the client sees.
    prefix, suffix = "failed at http://internal/", " with key "
    cut_at = upstream_module._SCRUB_LIMIT
    # The cut leaves "sk-AB": too short for the key pattern, and not the whole literal key.
    head = prefix + "p" * (cut_at - 5 - len(prefix) - len(suffix)) + suffix
    message = head + key + " and more"
    assert message[len(head):cut_at] == "sk-AB"
    error = status_error(400, json.dumps({"error": {"message": message}}).encode(), {},
                         Scrubber([key]))
    assert "sk-" not in error.message and "ABC" not in error.message, error.message
    assert "[url] with key" in error.message


def test_a_stream_error_chunk_is_read_without_reencoding() -> None:
    chunk = {"error": {"message": "overloaded at 10.0.0.7:8000"}}
    assert upstream_module._stream_error(chunk, Scrubber()) == \
        "The upstream reported an error: overloaded at [address]"
    assert upstream_module._error_message(chunk) == "overloaded at 10.0.0.7:8000"
    assert upstream_module._error_message(b"<html>") is None
