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
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks
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


async def test_an_upstream_cookie_never_rides_along_with_another_request(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    # One session serves every client: a cookie the upstream set while answering one client
    # must not be sent on the next client's request. (aiohttp keeps no cookies of an IP
    # address, so the upstream is named by host name here.)
    url = settings.upstream_url.replace("127.0.0.1", "localhost")
    proxy = await start_proxy(dataclasses.replace(settings, upstream_url=url))
    mock.enqueue(Scenario(chunks=text_chunks(["a"]),
                          headers={"Set-Cookie": "session=tenant-a; Path=/"}),
                 Scenario(chunks=text_chunks(["b"])))
    for _ in range(2):
        status, _, data = await proxy.post({"model": "m", "input": "x"})
        assert status == 200, data
    assert "cookie" not in mock.requests[-1].headers


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


# -- errors in the body: split, with status 200, vLLM's bare shape (issue 12, item 10) ------


async def test_an_error_body_split_over_several_reads_keeps_its_message(
        proxy: Proxy, mock: MockUpstream) -> None:
    body = {"error": {"message": "Unsupported value: 'logit_bias' is not supported here",
                      "type": "invalid_request_error", "param": None, "code": None}}
    raw = json.dumps(body).encode()
    for stream in (True, False):
        mock.enqueue(Scenario(status=400, body=raw, content_type="application/json",
                              split=[7, 40], delay=0.05))
        status, _, data = await proxy.post({"model": "m", "input": "x", "stream": stream})
        error = error_of(status, data)
        assert (status, error["code"]) == (400, "upstream_rejected_request")
        assert "'logit_bias' is not supported here" in error["message"], error


async def test_a_200_json_error_body_keeps_its_message(proxy: Proxy, mock: MockUpstream
                                                       ) -> None:
    body = {"error": {"message": "Model is overloaded, retry shortly", "code": "503"}}
    mock.enqueue(Scenario(body=body), Scenario(body=body))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    error = error_of(status, data)
    assert (status, error["code"]) == (502, "upstream_error")
    assert "Model is overloaded, retry shortly" in error["message"]
    events, _ = await proxy.stream({"model": "m", "input": "x"})
    assert events[-2]["error"]["code"] == "upstream_error"
    assert "Model is overloaded" in events[-2]["error"]["message"]


VLLM_ERROR = {"object": "error", "message": "Sampling failed: NaN in logits", "type":
              "InternalServerError", "param": None, "code": 500}


async def test_a_bare_vllm_error_chunk_mid_stream_fails_the_response(
        proxy: Proxy, mock: MockUpstream) -> None:
    head = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}}]}
    raw = (b"data: " + json.dumps(head).encode() + b"\n\n"
           + b"data: " + json.dumps(VLLM_ERROR).encode() + b"\n\ndata: [DONE]\n\n")
    mock.enqueue(Scenario(raw=raw), Scenario(raw=raw))
    events, _ = await proxy.stream({"model": "m", "input": "x"})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["error"]["code"] == "upstream_error"
    assert "NaN in logits" in events[-2]["error"]["message"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "par"
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert (status, error_of(status, data)["code"]) == (502, "upstream_error")


# -- context overflow and exception names (item 12) ---------------------------------------

CONTEXT_ERRORS = {
    "llama.cpp": {"error": {"code": 400, "message": "the request exceeds the available context "
                            "size, try increasing it", "type": "exceed_context_size_error",
                            "n_prompt_tokens": 5000, "n_ctx": 4096}},
    "litellm": {"error": {"message": "litellm.ContextWindowExceededError: litellm."
                          "BadRequestError: OpenAIException - Input is too long for requested "
                          "model.", "type": None, "param": None, "code": "400"}},
    "openai": {"error": {"message": "Your messages resulted in 130000 tokens. Please reduce "
                         "the length of the messages.", "type": "invalid_request_error",
                         "param": "messages", "code": "context_length_exceeded"}},
    "vllm": {"object": "error", "message": "This model's maximum context length is 4096 "
             "tokens. However, you requested 5000 tokens.", "type": "BadRequestError",
             "param": None, "code": 400},
}


@pytest.mark.parametrize("server", list(CONTEXT_ERRORS))
@pytest.mark.parametrize("stream", [True, False])
async def test_context_overflow_is_context_length_exceeded(
        proxy: Proxy, mock: MockUpstream, server: str, stream: bool) -> None:
    mock.enqueue(Scenario(status=400, body=CONTEXT_ERRORS[server]))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": stream})
    error = error_of(status, data)
    assert (status, error["type"], error["code"], error["param"]) == (
        400, "invalid_request_error", "context_length_exceeded", "input")


async def test_context_overflow_mid_stream_is_context_length_exceeded(
        proxy: Proxy, mock: MockUpstream) -> None:
    # llama.cpp reports errors inside the stream as a `data: {"error": ...}` chunk.
    raw = b"data: " + json.dumps(CONTEXT_ERRORS["llama.cpp"]).encode() + b"\n\n"
    mock.enqueue(Scenario(raw=raw), Scenario(raw=raw))
    events, _ = await proxy.stream({"model": "m", "input": "x"})
    assert events[-2]["error"]["code"] == "context_length_exceeded"
    assert events[-2]["error"]["type"] == "invalid_request_error"
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    error = error_of(status, data)
    assert (status, error["type"], error["code"]) == (400, "invalid_request_error",
                                                      "context_length_exceeded")


def test_exception_names_survive_scrubbing_hosts_do_not() -> None:
    scrub = Scrubber()
    message = ("litellm.RateLimitError: RateLimitError: OpenAIException - quota at "
               "gpu-7.cluster.internal:8000 and api.internal.corp; litellm.Timeout; "
               "openai.APIConnectionError; torch.OutOfMemoryError")
    assert scrub(message) == (
        "litellm.RateLimitError: RateLimitError: OpenAIException - quota at [host] and "
        "[host]; litellm.Timeout; openai.APIConnectionError; torch.OutOfMemoryError")
    # Capitalised domains are still domains.
    assert scrub("at GPU-7.Cluster.Internal and my.Service") == "at [host] and [host]"


async def test_litellm_error_names_reach_the_client(proxy: Proxy, mock: MockUpstream) -> None:
    body = {"error": {"message": "litellm.RateLimitError: quota exceeded on deployment",
                      "type": None, "param": None, "code": "429"}}
    mock.enqueue(Scenario(status=429, body=body))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    error = error_of(status, data)
    assert status == 429 and "litellm.RateLimitError: quota exceeded" in error["message"]
