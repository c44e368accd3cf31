"""Tests of the scripted Chat Completions mock upstream (orp_proxy.upstream.mock)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from orp_proxy.upstream.mock import (
    KNOWN_MODELS,
    MOCK_UPSTREAM_KEY,
    MockUpstream,
    Scenario,
    completion_from_chunks,
    encode_sse,
    reasoning_chunks,
    refusal_chunks,
    start_mock_upstream,
    text_chunks,
    tool_call_chunks,
    usage_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = "/v1/chat/completions"
USER_HI = [{"role": "user", "content": "hello there"}]
Client = TestClient[Any, Any]


def sse_payloads(data: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body: parsed JSON, or the string `[DONE]`."""
    out: list[Any] = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:].decode()
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def deltas(payloads: list[Any]) -> list[dict[str, Any]]:
    return [p["choices"][0]["delta"] for p in payloads if isinstance(p, dict) and p["choices"]]


def finish_reasons(payloads: list[Any]) -> list[str]:
    return [
        p["choices"][0]["finish_reason"]
        for p in payloads
        if isinstance(p, dict) and p["choices"] and p["choices"][0]["finish_reason"]
    ]


@pytest.fixture
def mock() -> MockUpstream:
    return MockUpstream()


@pytest.fixture
async def client(mock: MockUpstream, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(mock.app())


async def stream(client: Client, **body: Any) -> tuple[int, bytes]:
    body.setdefault("messages", USER_HI)
    async with client.post(CHAT, json={"stream": True, **body}) as resp:
        return resp.status, await resp.read()


# --------------------------------------------------------------------------- builders


def test_text_chunks_wire_shape() -> None:
    chunks = text_chunks(["Hel", "lo"], usage=usage_dict(3, 2), model="m")
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000}
    assert chunks == [
        {**base, "model": "m", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**base, "model": "m", "choices": [
            {"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {**base, "model": "m", "choices": [
            {"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {**base, "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "model": "m", "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}},
    ]
    bare = text_chunks(["x"], finish_reason=None, role_chunk=False)
    assert [c["choices"][0]["delta"] for c in bare] == [{"content": "x"}]


def test_usage_dict_details() -> None:
    usage = usage_dict(10, 5, cached=4, reasoning=3)
    assert usage["total_tokens"] == 15
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_tool_call_fragments_only_first_has_id_and_name() -> None:
    arguments = '{"q": "a\\"b\\u00e9c"}'
    chunks = tool_call_chunks([("call_1", "search", arguments)], split_args=7)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1]]
    assert fragments[0] == {
        "index": 0, "id": "call_1", "type": "function",
        "function": {"name": "search", "arguments": ""},
    }
    pieces = [f["function"]["arguments"] for f in fragments[1:]]
    assert all(set(f) == {"index", "function"} for f in fragments[1:])
    assert all(set(f["function"]) == {"arguments"} for f in fragments[1:])
    assert "".join(pieces) == arguments
    # The second cut falls inside the \u00e9 escape.
    assert pieces == ['{"q": "', 'a\\"b\\u0', '0e9c"}']
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_call_split_inside_backslash_escape() -> None:
    arguments = '{"k":"x\\ny"}'
    pieces = [
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for c in tool_call_chunks([("c", "f", arguments)], split_args=8)[2:-1]
    ]
    assert pieces == ['{"k":"x\\', 'ny"}']


def test_tool_calls_interleave_and_text_before() -> None:
    calls = [("c0", "a", '{"x": 1}'), ("c1", "b", '{"y": 22}')]
    chunks = tool_call_chunks(calls, split_args=4, interleave=True, text_before="Let me look.")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Let me look."}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[2:-1]]
    assert [f["index"] for f in fragments] == [0, 1, 0, 1, 0, 1, 1]
    assert [f.get("id") for f in fragments if "id" in f] == ["c0", "c1"]
    message = completion_from_chunks(chunks)["choices"][0]["message"]
    assert message["content"] == "Let me look."
    assert [(t["id"], t["function"]["name"], t["function"]["arguments"])
            for t in message["tool_calls"]] == calls
    sequential = tool_call_chunks(calls, split_args=4)
    assert [c["choices"][0]["delta"]["tool_calls"][0]["index"]
            for c in sequential[1:-1]] == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_chunks(field: str) -> None:
    chunks = reasoning_chunks(["Think", "ing"], ["Done"], field=field, usage=usage_dict(1, 3))
    assert deltas(chunks)[1:] == [{field: "Think"}, {field: "ing"}, {"content": "Done"}, {}]
    message = completion_from_chunks(chunks)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Done", field: "Thinking"}
    with pytest.raises(ValueError):
        reasoning_chunks([], [], field="thoughts")


def test_refusal_chunks() -> None:
    chunks = refusal_chunks(["No", "pe"])
    assert deltas(chunks) == [{"role": "assistant", "refusal": ""}, {"refusal": "No"},
                              {"refusal": "pe"}, {}]
    completion = completion_from_chunks(chunks)
    assert completion["choices"][0]["message"] == {
        "role": "assistant", "content": None, "refusal": "Nope"}
    assert completion["choices"][0]["finish_reason"] == "stop"


def test_encode_sse_exact_bytes() -> None:
    chunks: list[dict[str, Any]] = [{"a": 1}, {"b": "é"}]
    assert encode_sse(chunks) == b'data: {"a":1}\n\ndata: {"b":"\xc3\xa9"}\n\ndata: [DONE]\n\n'
    assert encode_sse(chunks, send_done=False) == b'data: {"a":1}\n\ndata: {"b":"\xc3\xa9"}\n\n'
    assert encode_sse(chunks[:1], crlf=True) == b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert encode_sse(chunks[:1], keepalive_comments=True) == (
        b'data: {"a":1}\n\n: keep-alive\n\ndata: [DONE]\n\n'
    )
    assert encode_sse(chunks[:1], keepalive_comments=True, crlf=True) == (
        b'data: {"a":1}\r\n\r\n: keep-alive\r\n\r\ndata: [DONE]\r\n\r\n'
    )


# --------------------------------------------------------------------------- scripted answers


async def test_scripted_chunks_sent_exactly(mock: MockUpstream, client: Client) -> None:
    chunks = text_chunks(["a", "b"])
    mock.enqueue(Scenario(chunks=chunks, keepalive_comments=True, crlf=True, send_done=False))
    async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        body = await resp.read()
    assert body == encode_sse(chunks, send_done=False, crlf=True, keepalive_comments=True)


async def test_queue_is_fifo_then_default(mock: MockUpstream, client: Client) -> None:
    mock.enqueue(Scenario(raw=b"first"), Scenario(raw=b"second"))
    assert (await stream(client, model="mock"))[1] == b"first"
    assert (await stream(client, model="mock"))[1] == b"second"
    assert "".join(d.get("content", "") for d in deltas(
        sse_payloads((await stream(client, model="mock"))[1]))) == "You said: hello there"


async def test_status_headers_and_error_body(mock: MockUpstream, client: Client) -> None:
    mock.enqueue(Scenario(status=503, headers={"Retry-After": "3"}))
    async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"

    mock.enqueue(Scenario(status=502, body=b"<html>bad gateway</html>", content_type="text/html"))
    async with client.post(CHAT, json={"model": "mock"}) as resp:
        assert (resp.status, resp.content_type) == (502, "text/html")
        assert await resp.read() == b"<html>bad gateway</html>"


async def test_body_override_on_200(mock: MockUpstream, client: Client) -> None:
    completion = completion_from_chunks(text_chunks(["hi"]))
    mock.enqueue(Scenario(body=completion))
    async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.content_length is not None
        assert await resp.json() == completion


async def test_raw_bytes_arrive_unchanged(mock: MockUpstream, client: Client) -> None:
    raw = b': comment\r\ndata: {"x":1}\r\n\r\ndata: \xff\xfe bad utf8\n\ndata: {"y"'
    mock.enqueue(Scenario(raw=raw))
    assert await stream(client, model="mock") == (200, raw)


async def test_one_byte_writes_arrive_intact(mock: MockUpstream, client: Client) -> None:
    chunks = text_chunks(["héllo", " wörld"])
    mock.enqueue(Scenario(chunks=chunks, split=1))
    assert (await stream(client, model="mock"))[1] == encode_sse(chunks)


async def test_split_at_offsets_with_delay(mock: MockUpstream, client: Client) -> None:
    raw = b"0123456789abcdefghij"
    mock.enqueue(Scenario(raw=raw, split=[3, 12, 12, 99], delay=0.05))
    reads: list[bytes] = []
    async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
        async for data in resp.content.iter_any():
            reads.append(data)
    assert b"".join(reads) == raw
    assert reads == [b"012", b"3456789ab", b"cdefghij"]


async def test_stall_then_disconnect_detected_quickly(
    mock: MockUpstream, client: Client
) -> None:
    chunks = text_chunks(["a", "b", "c"])
    mock.enqueue(Scenario(chunks=chunks, stall_after=2))
    resp = await client.post(CHAT, json={"model": "mock", "stream": True})
    first_two = encode_sse(chunks)[: sum(len(encode_sse([c], send_done=False))
                                         for c in chunks[:2])]
    assert await resp.content.readexactly(len(first_two)) == first_two
    await asyncio.sleep(0.05)
    assert mock.requests[-1].disconnected_at is None
    resp.close()
    closed_at = time.monotonic()
    seen = await mock.wait_for_disconnect(timeout=2)
    assert seen - closed_at < 0.05
    assert mock.requests[-1].finished_at is None


async def test_disconnect_detected_while_sleeping(
    mock: MockUpstream, client: Client
) -> None:
    mock.enqueue(Scenario(delay=5.0))  # the default echo, with long pauses between events
    resp = await client.post(CHAT, json={"model": "mock", "stream": True, "messages": USER_HI})
    await resp.content.readuntil(b"\n\n")
    resp.close()
    closed_at = time.monotonic()
    assert await mock.wait_for_disconnect(timeout=2) - closed_at < 0.05


async def test_disconnect_before_first_byte(
    mock: MockUpstream, client: Client
) -> None:
    mock.enqueue(Scenario(raw=b"late", first_byte_delay=5.0))
    task = asyncio.create_task(client.post(CHAT, json={"model": "mock", "stream": True}))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    closed_at = time.monotonic()
    assert await mock.wait_for_disconnect(timeout=2) - closed_at < 0.05


async def test_wait_for_disconnect_times_out(
    mock: MockUpstream, client: Client
) -> None:
    with pytest.raises(TimeoutError):
        await mock.wait_for_disconnect(timeout=0.05)
    await stream(client, model="mock")
    with pytest.raises(TimeoutError):
        await mock.wait_for_disconnect(timeout=0.05)
    assert mock.requests[-1].finished_at is not None


async def test_reset_after_gives_client_connection_error(
    mock: MockUpstream, client: Client
) -> None:
    chunks = text_chunks(["a", "b", "c"])
    mock.enqueue(Scenario(chunks=chunks, reset_after=2))
    received = b""
    with pytest.raises(aiohttp.ClientError):
        async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    assert b"[DONE]" not in received
    assert mock.requests[-1].disconnected_at is None


async def test_reset_before_body(mock: MockUpstream, client: Client) -> None:
    mock.enqueue(Scenario(raw=b"never", reset_after=0))
    with pytest.raises(aiohttp.ClientError):
        async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
            await resp.read()


async def test_first_byte_delay(mock: MockUpstream, client: Client) -> None:
    mock.enqueue(Scenario(raw=b"data: [DONE]\n\n", first_byte_delay=0.2))
    started = time.monotonic()
    async with client.post(CHAT, json={"model": "mock", "stream": True}) as resp:
        assert time.monotonic() - started >= 0.19
        assert await resp.read() == b"data: [DONE]\n\n"


async def test_scenario_without_content_shapes_default_answer(
    mock: MockUpstream, client: Client
) -> None:
    mock.enqueue(Scenario(crlf=True, send_done=False, headers={"X-Upstream": "1"}))
    request = {"model": "mock", "stream": True, "messages": USER_HI}
    async with client.post(CHAT, json=request) as resp:
        assert resp.headers["X-Upstream"] == "1"
        body = await resp.read()
    assert b"\r\n\r\n" in body and b"[DONE]" not in body
    assert "".join(d.get("content", "") for d in deltas(sse_payloads(body))) == (
        "You said: hello there"
    )


# --------------------------------------------------------------------------- recording


async def test_requests_recorded_with_headers(
    mock: MockUpstream, client: Client
) -> None:
    mock.enqueue(Scenario(raw=b""))
    body = {"model": "mock", "stream": True, "messages": USER_HI}
    before = time.monotonic()
    async with client.post(CHAT, json=body, headers={"Authorization": "Bearer k"}) as resp:
        await resp.read()
    await stream(client, model="mock")
    assert len(mock.requests) == 2
    record = mock.requests[0]
    assert record.body == body
    assert record.headers["authorization"] == "Bearer k"
    assert record.headers["Authorization"] == "Bearer k"
    assert "AUTHORIZATION" in record.headers
    assert record.headers.get("Content-Type") == "application/json"
    assert before <= record.received_at <= (record.finished_at or 0)
    assert record.disconnected_at is None
    mock.enqueue(Scenario())
    mock.reset()
    assert mock.requests == []
    assert b'"content":"You"' in (await stream(client, model="mock"))[1]


async def test_malformed_json_is_400(mock: MockUpstream, client: Client) -> None:
    mock.enqueue(Scenario(raw=b"kept"))
    for data in (b"{not json", b"[1, 2]", b"\xff"):
        async with client.post(CHAT, data=data) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert mock.requests == []
    assert (await stream(client, model="mock"))[1] == b"kept"


async def test_models_and_health(mock: MockUpstream, client: Client) -> None:
    async with client.get("/v1/models") as resp:
        listing = await resp.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(KNOWN_MODELS)
    async with client.get("/health") as resp:
        assert resp.status == 200
    assert mock.app()[MOCK_UPSTREAM_KEY] is mock


# --------------------------------------------------------------------------- default models


async def test_echo_stream_usage_only_when_asked(client: Client) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one two  three"}]}]
    _, body = await stream(client, model="anything", messages=messages)
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]"
    assert all("usage" not in p for p in payloads[:-1])
    pieces = [d["content"] for d in deltas(payloads)[1:] if "content" in d]
    assert pieces == ["You", " said:", " one", " two", "  three"]
    assert finish_reasons(payloads) == ["stop"]
    assert {p["model"] for p in payloads[:-1]} == {"anything"}

    _, body = await stream(client, model="mock", messages=messages,
                           stream_options={"include_usage": True}, max_tokens=3)
    payloads = sse_payloads(body)
    assert "".join(d.get("content", "") for d in deltas(payloads)) == "You said: one"
    assert finish_reasons(payloads) == ["length"]
    assert payloads[-2]["choices"] == []
    assert payloads[-2]["usage"]["prompt_tokens"] == 5
    assert payloads[-2]["usage"]["completion_tokens"] == 3


async def test_echo_pacing(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(MockUpstream(interval_ms=30).app())
    started = time.monotonic()
    await stream(client, model="mock", messages=[{"role": "user", "content": "a b c"}])
    # role chunk, 5 words, finish chunk, [DONE]: 7 pauses
    assert time.monotonic() - started >= 0.2


async def test_non_streaming_echo(client: Client) -> None:
    async with client.post(CHAT, json={"model": "mock", "messages": USER_HI}) as resp:
        assert resp.content_type == "application/json"
        completion = await resp.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {
        "role": "assistant", "content": "You said: hello there"}
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["prompt_tokens"] == 2
    assert completion["usage"]["completion_tokens"] == 4


async def test_mock_tools_calls_first_tool(client: Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
             {"type": "function", "function": {"name": "other"}}]
    _, body = await stream(client, model="mock-tools", tools=tools)
    payloads = sse_payloads(body)
    fragments = [t for d in deltas(payloads) for t in d.get("tool_calls", [])]
    assert fragments[0]["function"]["name"] == "get_weather"
    assert fragments[0]["id"].startswith("call_")
    assert all("id" not in f for f in fragments[1:])
    arguments = "".join(f["function"].get("arguments", "") for f in fragments)
    assert json.loads(arguments) == {"city": "Paris"}
    assert finish_reasons(payloads) == ["tool_calls"]

    async with client.post(CHAT, json={"model": "mock-tools", "messages": USER_HI,
                                       "tools": tools}) as resp:
        message = (await resp.json())["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}


async def test_mock_tools_answers_tool_result(client: Client) -> None:
    messages = [*USER_HI,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"}]
    async with client.post(CHAT, json={"model": "mock-tools", "messages": messages,
                                       "tools": [{"type": "function",
                                                  "function": {"name": "get_weather"}}]}) as resp:
        completion = await resp.json()
    assert "18C and sunny" in completion["choices"][0]["message"]["content"]
    assert completion["choices"][0]["finish_reason"] == "stop"


async def test_mock_reasoning(client: Client) -> None:
    _, body = await stream(client, model="mock-reasoning",
                           stream_options={"include_usage": True})
    payloads = sse_payloads(body)
    kinds = [next(iter(d)) for d in deltas(payloads)[1:-1]]
    first_text = kinds.index("content")
    assert first_text > 0
    assert set(kinds[:first_text]) == {"reasoning_content"}
    assert set(kinds[first_text:]) == {"content"}
    assert payloads[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"] == first_text


async def test_mock_refusal(client: Client) -> None:
    async with client.post(CHAT, json={"model": "mock-refusal", "messages": USER_HI}) as resp:
        message = (await resp.json())["choices"][0]["message"]
    assert message["content"] is None
    assert "sorry" in message["refusal"]


@pytest.mark.parametrize("status", [400, 429, 500])
@pytest.mark.parametrize("streamed", [True, False])
async def test_error_models(client: Client, status: int, streamed: bool) -> None:
    request = {"model": f"mock-error-{status}", "messages": USER_HI, "stream": streamed}
    async with client.post(CHAT, json=request) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert resp.headers.get("Retry-After") == ("2" if status == 429 else None)
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]


# --------------------------------------------------------------------------- bench mode


async def test_bench_stream(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(MockUpstream(bench_tokens=40).app())
    _, body = await stream(client, model="bench-x", stream_options={"include_usage": True})
    payloads = sse_payloads(body)
    texts = [d["content"] for d in deltas(payloads)[1:-1]]
    assert len(texts) == 40 and len(set(texts)) == 40
    assert deltas(payloads)[0] == {"role": "assistant", "content": ""}
    assert finish_reasons(payloads) == ["stop"]
    assert payloads[-2]["usage"]["completion_tokens"] == 40
    assert payloads[-1] == "[DONE]"
    assert {p["model"] for p in payloads[:-1]} == {"bench-x"}
    assert len({p["id"] for p in payloads[:-1]}) == 1

    _, body = await stream(client, model="bench", max_tokens=10)
    payloads = sse_payloads(body)
    assert len(deltas(payloads)) == 12
    assert finish_reasons(payloads) == ["length"]
    assert all("usage" not in p for p in payloads[:-1])

    _, body = await stream(client, model="bench", max_completion_tokens=500)
    assert len(deltas(sse_payloads(body))) == 42

    async with client.post(CHAT, json={"model": "bench", "max_tokens": 5}) as resp:
        completion = await resp.json()
    assert completion["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"
    assert completion["choices"][0]["finish_reason"] == "length"


async def test_bench_paced(aiohttp_client: AiohttpClient) -> None:
    mock = MockUpstream(bench_tokens=6, interval_ms=20)
    client = await aiohttp_client(mock.app())
    started = time.monotonic()
    _, body = await stream(client, model="bench")
    assert time.monotonic() - started >= 0.1
    assert len(deltas(sse_payloads(body))) == 8

    resp = await client.post(CHAT, json={"model": "bench", "stream": True})
    await resp.content.readuntil(b"\n\n")
    resp.close()
    closed_at = time.monotonic()
    assert await mock.wait_for_disconnect(timeout=2) - closed_at < 0.05


# --------------------------------------------------------------------------- running


async def test_start_mock_upstream_and_cleanup_with_stalled_client() -> None:
    mock, runner, url = await start_mock_upstream(bench_tokens=3)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/chat/completions",
                                json={"model": "bench", "stream": True}) as resp:
            assert len(deltas(sse_payloads(await resp.read()))) == 5
        mock.enqueue(Scenario(raw=b"data: {}\n\n", stall_after=1))
        resp = await session.post(url + "/chat/completions", json={"model": "m", "stream": True})
        await resp.content.readuntil(b"\n\n")
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 1.5
        with pytest.raises(aiohttp.ClientError):
            await resp.read()


def test_script_runs_from_checkout() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = os.path.join(REPO, "scripts", "mock_upstream.py")
    with subprocess.Popen(
        [sys.executable, script, "--port", "0"], stdout=subprocess.PIPE, text=True, cwd="/", env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on http://127.0.0.1:" in line
            health = line.split()[-1].removesuffix("/v1") + "/health"
            with urllib.request.urlopen(health, timeout=5) as resp:
                assert json.load(resp) == {"status": "ok"}
        finally:
            proc.terminate()
            assert proc.wait(timeout=5) == 0
