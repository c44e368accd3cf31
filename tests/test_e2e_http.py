"""ORP over raw HTTP: error objects, limits, upstream failures, and what the upstream received."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from orp_proxy.config import Settings
from orp_proxy.upstream.mock import (
    MockUpstream,
    Scenario,
    encode_sse,
    text_chunks,
    tool_call_chunks,
    usage_dict,
)
from scripts import procs
from tests.conftest import Proxy

StartProxy = Callable[[Settings], Awaitable[Proxy]]


def error_of(status: int, body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return dict(error, status=status)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "m", "input": [{"type": "message", "role": "user",
                               "content": [{"type": "input_text", "text": "a"},
                                           {"type": "bogus"}]}]},
     "input[0].content[1].type", "invalid_value"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature", "decimal_above_max_value"),
    ({"model": "m", "input": "x", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "missing_required_parameter"),
    ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens",
     "invalid_type"),
    ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}],
      "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name", "invalid_value"),
    ({"model": "m"}, "input", "missing_required_parameter"),
])
async def test_bad_input_is_400_naming_the_parameter(proxy: Proxy, mock: MockUpstream,
                                                     body: dict[str, Any], param: str,
                                                     code: str) -> None:
    status, _, data = await proxy.post(body)
    error = error_of(status, data)
    assert (status, error["type"], error["param"], error["code"]) == (
        400, "invalid_request_error", param, code)
    assert not mock.requests  # nothing went upstream


async def test_missing_model_without_default(proxy: Proxy) -> None:
    status, _, data = await proxy.post({"input": "x"})
    assert error_of(status, data)["param"] == "model" and status == 400


async def test_default_model_is_used(start_proxy: StartProxy, settings: Settings,
                                     mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, default_model="fallback"))
    status, _, data = await proxy.post({"input": "x"})
    assert status == 200 and json.loads(data)["model"] == "fallback"
    assert mock.requests[-1].body["model"] == "fallback"


async def test_malformed_json_wrong_type_and_size(start_proxy: StartProxy, settings: Settings
                                                  ) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_body_bytes=1000))
    url = proxy.server.make_url("/v1/responses")
    cases = [
        (b'{"model": "m", "input": ', "application/json", 400, "invalid_json"),
        (b'\xff\xfe{}', "application/json", 400, "invalid_json"),
        (b'[1, 2]', "application/json", 400, None),
        (b'model=m', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"model": "m", "input": "' + b"x" * 2000 + b'"}', "application/json", 413,
         "request_too_large"),
    ]
    for raw, content_type, expected, code in cases:
        async with proxy.session.post(url, data=raw,
                                      headers={"Content-Type": content_type}) as resp:
            error = error_of(resp.status, await resp.read())
        assert resp.status == expected, (raw[:30], error)
        if code:
            assert error["code"] == code


async def test_unknown_route_and_method_get_error_objects(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.server.make_url("/v1/nothing")) as resp:
        assert error_of(resp.status, await resp.read())["code"] == "not_found"
        assert resp.status == 404
    async with proxy.session.put(proxy.server.make_url("/v1/responses")) as resp:
        assert resp.status == 405
        error_of(resp.status, await resp.read())


async def test_background_without_store_is_refused_clearly(proxy: Proxy) -> None:
    status, _, data = await proxy.post({"model": "m", "input": "x", "background": True,
                                        "store": False})
    error = error_of(status, data)
    assert status == 400 and error["param"] == "background"


# -- what the upstream receives -----------------------------------------------------------


async def test_upstream_receives_the_exact_translation(start_proxy: StartProxy,
                                                       settings: Settings,
                                                       mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(
        settings, model_map={"smart": "vendor/model-7b"}, upstream_api_key="sk-upstream"))
    body = {
        "model": "smart",
        "instructions": "Answer in French.",
        "input": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                         {"type": "input_image",
                                          "image_url": "https://img/x.png"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        ],
        "tools": [{"type": "function", "name": "get_weather",
                   "parameters": {"type": "object", "properties": {}}}],
        "max_output_tokens": 100,
        "reasoning": {"effort": "low"},
    }
    status, headers, _ = await proxy.post(body, headers={"Authorization": "Bearer sk-client",
                                                         "X-Request-Id": "req-42"})
    assert status == 200
    assert headers["X-Request-Id"] == "req-42"
    received = mock.requests[-1]
    assert received.body == {
        "model": "vendor/model-7b",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "https://img/x.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}],
        "max_tokens": 100,
        "reasoning_effort": "low",
    }
    # ORP's own key goes upstream, never the client's.
    assert received.headers["Authorization"] == "Bearer sk-upstream"
    assert received.headers["X-Request-Id"] == "req-42"


# -- outcomes -----------------------------------------------------------------------------


async def test_length_becomes_incomplete(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["cut"], finish_reason="length")))
    events, _ = await proxy.stream({"model": "m", "input": "x", "max_output_tokens": 16})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_disallowed_tool_call_never_reaches_the_client(proxy: Proxy, mock: MockUpstream
                                                             ) -> None:
    tools = [{"type": "function", "name": "get_sales"}, {"type": "function", "name": "send"}]
    choice = {"type": "allowed_tools", "tools": [{"type": "function", "name": "get_sales"}]}
    mock.enqueue(Scenario(chunks=tool_call_chunks([("c1", "send", '{"to":"x"}')])),
                 Scenario(chunks=tool_call_chunks([("c1", "send", '{"to":"x"}')])))
    events, _ = await proxy.stream({"model": "m", "input": "x", "tools": tools,
                                    "tool_choice": choice})
    assert not any(e["type"].startswith("response.function_call") for e in events)
    assert not any(e["type"] == "response.output_item.added" for e in events)
    assert events[-2]["error"]["code"] == "tool_not_allowed"
    assert events[-1]["type"] == "response.failed"
    status, _, data = await proxy.post({"model": "m", "input": "x", "tools": tools,
                                        "tool_choice": choice})
    # The spec's table: model_error is 500.
    error = error_of(status, data)
    assert (status, error["type"], error["code"]) == (500, "model_error", "tool_not_allowed")


async def test_upstream_json_answer_is_accepted(proxy: Proxy, mock: MockUpstream) -> None:
    completion = {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "whole"},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                              "total_tokens": 2}}
    mock.enqueue(Scenario(body=completion))
    events, _ = await proxy.stream({"model": "m", "input": "x"})
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "whole"


# -- upstream errors before the first byte -------------------------------------------------


@pytest.mark.parametrize(("upstream_status", "status", "code"), [
    (400, 400, "upstream_rejected_request"),
    (404, 404, "model_not_found"),
    (422, 400, "upstream_rejected_request"),
    (429, 429, "rate_limit_exceeded"),
    (401, 502, "upstream_auth_failed"),
    (500, 502, "upstream_error"),
    (503, 502, "upstream_overloaded"),
    (504, 504, "upstream_timeout"),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_status_mapping(proxy: Proxy, mock: MockUpstream, upstream_status: int,
                                       status: int, code: str, stream: bool) -> None:
    headers = {"Retry-After": "7"} if upstream_status == 429 else {}
    mock.enqueue(Scenario(status=upstream_status, headers=headers))
    got, got_headers, data = await proxy.post({"model": "m", "input": "x", "stream": stream})
    error = error_of(got, data)
    assert (got, error["code"]) == (status, code)
    if upstream_status == 429:
        assert got_headers["Retry-After"] == "7"


async def test_upstream_html_error_page_is_not_echoed(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(status=502, body=b"<html><body>nginx internal-host-7</body></html>",
                          content_type="text/html"))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert status == 502 and b"internal-host" not in data and b"<html" not in data


async def test_upstream_wrong_content_type(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(body=b"<html>login</html>", content_type="text/html"))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True})
    assert status == 502 and error_of(status, data)["code"] == "upstream_bad_response"


async def test_connection_refused_is_502(start_proxy: StartProxy, settings: Settings) -> None:
    dead = f"http://127.0.0.1:{procs.free_port()}/v1"
    proxy = await start_proxy(dataclasses.replace(settings, upstream_url=dead))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True})
    assert status == 502 and error_of(status, data)["code"] == "upstream_unavailable"


async def test_no_first_byte_is_504(start_proxy: StartProxy, settings: Settings,
                                    mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, read_timeout=0.3))
    mock.enqueue(Scenario(first_byte_delay=2.0))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True})
    assert status == 504 and error_of(status, data)["code"] == "upstream_timeout"


# -- upstream failures after the stream started --------------------------------------------


async def failed_stream(proxy: Proxy, **fields: Any) -> tuple[list[dict[str, Any]], str]:
    events, done = await proxy.stream({"model": "m", "input": "x", **fields})
    assert done
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    response = events[-1]["response"]
    assert response["status"] == "failed"
    assert response["error"]["code"] == events[-2]["error"]["code"]
    return events, str(events[-2]["error"]["code"])


async def test_stall_mid_stream(start_proxy: StartProxy, settings: Settings,
                                mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, read_timeout=0.3))
    mock.enqueue(Scenario(chunks=text_chunks(["a", "b", "c"]), stall_after=3))
    events, code = await failed_stream(proxy)
    assert code == "upstream_timeout"
    # what had arrived (role chunk, "a", "b": three writes) is kept in the failed response
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "ab"


async def test_malformed_chunk(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(raw=encode_sse(text_chunks(["a"], finish_reason=None), send_done=False)
                          + b"data: {not json\n\n"))
    assert (await failed_stream(proxy))[1] == "upstream_invalid_json"


async def test_error_chunk_mid_stream(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(raw=encode_sse(text_chunks(["a"], finish_reason=None), send_done=False)
                          + b'data: {"error": {"message": "CUDA out of memory"}}\n\n'))
    events, code = await failed_stream(proxy)
    assert code == "upstream_error" and "CUDA" in events[-2]["error"]["message"]


async def test_stream_ends_without_finish_or_done(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["a"], finish_reason=None), send_done=False))
    assert (await failed_stream(proxy))[1] == "upstream_incomplete"


async def test_done_without_final_newline_completes(proxy: Proxy, mock: MockUpstream) -> None:
    # The body ends right after `data: [DONE]`: no newline, nothing more; and no
    # finish_reason before it, so only `[DONE]` says that the answer is whole.
    body = encode_sse(text_chunks(["fine"], finish_reason=None), send_done=False) + \
        b"data: [DONE]"
    mock.enqueue(Scenario(raw=body), Scenario(raw=body))
    events, done = await proxy.stream({"model": "m", "input": "x"})
    assert done and events[-1]["type"] == "response.completed"
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert status == 200 and json.loads(data)["status"] == "completed"


@pytest.mark.parametrize(("reason", "code"), [("abort", "upstream_aborted"),
                                              ("error", "upstream_error")])
async def test_vllm_abort_and_error_finish_reasons_fail(proxy: Proxy, mock: MockUpstream,
                                                        reason: str, code: str) -> None:
    chunks = text_chunks(["half an ans"], finish_reason=reason)
    mock.enqueue(Scenario(chunks=chunks), Scenario(chunks=chunks))
    events, got = await failed_stream(proxy)
    assert got == code and reason in events[-2]["error"]["message"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "half an ans"
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert (status, error_of(status, data)["code"]) == (502, code)


async def test_tcp_reset_mid_stream(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["a", "b", "c", "d"]), reset_after=2))
    assert (await failed_stream(proxy))[1] == "upstream_connection_lost"


async def test_line_over_cap(start_proxy: StartProxy, settings: Settings,
                             mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_line_bytes=1024))
    mock.enqueue(Scenario(chunks=text_chunks(["x" * 5000])))
    assert (await failed_stream(proxy))[1] == "upstream_line_too_long"


async def test_quirky_but_valid_streams(proxy: Proxy, mock: MockUpstream) -> None:
    chunks = text_chunks(["caf\u00e9 ", "\u4e16\u754c ", "\U0001f600"], usage=usage_dict(1, 3))
    for scenario in (Scenario(chunks=chunks, crlf=True, keepalive_comments=True),
                     Scenario(chunks=chunks, split=1),
                     Scenario(chunks=chunks, split=[3, 50, 51, 52, 200])):
        mock.enqueue(scenario)
        events, _ = await proxy.stream({"model": "m", "input": "x"})
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == \
            "caf\u00e9 \u4e16\u754c \U0001f600"


async def test_concurrent_streams(proxy: Proxy) -> None:
    async def one(i: int) -> str:
        events, _ = await proxy.stream({"model": "mock", "input": f"number {i}"})
        return str(events[-1]["response"]["output"][0]["content"][0]["text"])

    texts = await asyncio.gather(*(one(i) for i in range(30)))
    assert texts == [f"You said: number {i}" for i in range(30)]


async def test_client_disconnect_closes_upstream(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(50)]), delay=0.05))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.server.make_url("/v1/responses"),
                                  json={"model": "m", "input": "x", "stream": True})
        await resp.content.readuntil(b"response.output_text.delta")
        closed_at = asyncio.get_running_loop().time()
        resp.close()
    seen = await mock.wait_for_disconnect(timeout=2.0)
    assert seen - closed_at < 0.1


@pytest.mark.parametrize("bad", [
    b'data: {"choices": [{"delta": "x"}]}\n\n',
    b'data: {"choices": {"0": {}}}\n\n',
    b'data: {"choices": [{"delta": {"content": ["a"]}}]}\n\n',
    b'data: {"choices": [], "usage": [1]}\n\n',
    b'data: {"choices": [{"delta": {"tool_calls": ["x"]}}]}\n\n',
    b'data: {"choices": [{"delta": {"content": "b"}, "logprobs": [{"token": "b"}]}]}\n\n',
])
async def test_malformed_chunk_shapes_fail_cleanly(proxy: Proxy, mock: MockUpstream,
                                                   bad: bytes) -> None:
    head = encode_sse(text_chunks(["a"], finish_reason=None), send_done=False)
    mock.enqueue(Scenario(raw=head + bad + b"data: [DONE]\n\n"),
                 Scenario(raw=head + bad + b"data: [DONE]\n\n"))
    # Logprobs asked for, so that a malformed `logprobs` is read, not ignored.
    events, code = await failed_stream(
        proxy, include=["message.output_text.logprobs"])  # a well-formed ending, not a cut
    assert code == "upstream_bad_response"
    stored = await proxy.session.get(
        proxy.server.make_url(f"/v1/responses/{events[-1]['response']['id']}"))
    assert (await stored.json())["status"] == "failed"
    status, _, data = await proxy.post({"model": "m", "input": "x",
                                        "include": ["message.output_text.logprobs"]})
    assert (status, error_of(status, data)["code"]) == (502, "upstream_bad_response")


async def test_other_choices_are_left_out_and_logged_once(
        proxy: Proxy, mock: MockUpstream, caplog: pytest.LogCaptureFixture) -> None:
    # n > 1 (or a misbehaving server): only choice 0 is the answer.
    chunks = [{"choices": [{"index": 0, "delta": {"content": "zero"}},
                           {"index": 1, "delta": {"content": "one"}}]},
              {"choices": [{"index": 1, "delta": {"content": "ONE"}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"},
                           {"index": 1, "delta": {}, "finish_reason": "stop"}]}]
    mock.enqueue(Scenario(chunks=chunks))
    with caplog.at_level("WARNING", logger="orp.exchange"):
        events, _ = await proxy.stream({"model": "m", "input": "x"})
    response = events[-1]["response"]
    assert response["status"] == "completed"
    assert [p["text"] for p in response["output"][0]["content"]] == ["zero"]
    notes = [r for r in caplog.records if "choice 0" in r.getMessage()]
    assert len(notes) == 1 and response["id"] in notes[0].getMessage()
