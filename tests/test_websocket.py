"""WebSocket mode (`GET /v1/responses` upgraded) with aiohttp's client, openresponses-py's and
the `openai` SDK's (`client.responses.connect()`).

Every event received is checked like an SSE stream: each against its `openresponses-types` model,
the turn as a whole with openresponses-py's lifecycle checker, sequence numbers from 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import openresponses_types.types as ort
import pytest
from openresponses import AsyncOpenResponses
from openresponses.streaming import StreamState
from openresponses.types.protocol import StreamingEventAdapter

from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, usage_dict
from tests.conftest import Proxy
from tests.sse_check import TERMINAL, check_event

StartProxy = Callable[[Settings], Awaitable[Proxy]]
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"},
        "strict": False}
WS = aiohttp.ClientWebSocketResponse


def ws_url(proxy: Proxy) -> str:
    return str(proxy.server.make_url("/v1/responses"))


async def receive_json(ws: WS, within: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=within)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    payload = json.loads(msg.data)
    assert isinstance(payload, dict)
    return payload


def check_envelope(payload: dict[str, Any], status: int, code: str,
                   param: str | None = None) -> dict[str, Any]:
    """The spec's WebSocket error envelope, validated by `openresponses-types`."""
    ort.WebSocketErrorEvent.model_validate(payload)
    assert set(payload) == {"type", "status", "error"}
    error = payload["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert (payload["status"], error["code"], error["param"]) == (status, code, param), payload
    assert error["message"] and "Traceback" not in error["message"]
    return error


async def read_turn(ws: WS) -> list[dict[str, Any]]:
    """One turn's events, up to its terminal event, every check applied; or a lone envelope."""
    first = await receive_json(ws)
    if first["type"] == "error" and "status" in first:
        return [first]
    events = [first]
    while events[-1]["type"] not in TERMINAL:
        events.append(await receive_json(ws))
    state = StreamState()
    for event in events:
        check_event(event)
        state.accept(StreamingEventAdapter.validate_python(event))
    assert state.terminal_seen
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    return events


async def turn(ws: WS, **body: Any) -> list[dict[str, Any]]:
    await ws.send_json({"type": "response.create", "model": "mock", **body})
    return await read_turn(ws)


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = events[-1]["response"]
    return response


def answer(events: list[dict[str, Any]]) -> str:
    return str(final(events)["output"][0]["content"][0]["text"])


def upstream_texts(mock: MockUpstream, index: int = -1) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in mock.requests[index].body["messages"]]


# -- turns ----------------------------------------------------------------------------------


async def test_sequential_responses_on_one_socket(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["Hel", "lo"], usage=usage_dict(3, 2))))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        first = await turn(ws, input="one")
        second = await turn(ws, input="two", instructions="Be brief.")
        assert [e["type"] for e in first] == [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", "response.output_text.delta",
            "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed"]
        assert answer(first) == "Hello" and final(first)["usage"]["total_tokens"] == 5
        assert answer(second) == "You said: two"
        assert final(first)["id"] != final(second)["id"]
        assert final(second)["instructions"] == "Be brief."
        # Nothing follows the terminal event (no [DONE] on WebSocket).
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)
    assert [upstream_texts(mock, i)[-1] for i in (0, 1)] == [("user", "one"), ("user", "two")]


async def test_store_false_continues_on_the_same_socket(proxy: Proxy, mock: MockUpstream
                                                        ) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        first = final(await turn(ws, input="My name is Ada.", store=False))
        second = await turn(ws, input="What is my name?", store=False,
                            previous_response_id=first["id"])
        assert final(second)["previous_response_id"] == first["id"]
        third = await turn(ws, input="Again?", store=False,
                           previous_response_id=final(second)["id"])
    assert final(third)["status"] == "completed"
    assert upstream_texts(mock) == [
        ("user", "My name is Ada."), ("assistant", "You said: My name is Ada."),
        ("user", "What is my name?"), ("assistant", "You said: What is my name?"),
        ("user", "Again?")]
    # Nothing reached the database.
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{first['id']}")) as resp:
        assert resp.status == 404


async def test_store_false_id_is_unknown_after_reconnecting(proxy: Proxy) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        gone = final(await turn(ws, input="hi", store=False))["id"]
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        [envelope] = await turn(ws, input="more", store=False, previous_response_id=gone)
        check_envelope(envelope, 400, "previous_response_not_found", "previous_response_id")
        assert gone in envelope["error"]["message"]
        # The connection stays usable: recover with the full context, as the spec suggests.
        recovered = await turn(ws, input=[{"role": "user", "content": "hi"},
                                          {"role": "user", "content": "more"}], store=False)
        assert answer(recovered) == "You said: more"


@pytest.mark.parametrize("failure", ["http_error", "failed_stream"])
async def test_failed_continuation_evicts_the_previous_id(proxy: Proxy, mock: MockUpstream,
                                                          failure: str) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        first = final(await turn(ws, input="hi", store=False))["id"]
        if failure == "http_error":
            mock.enqueue(Scenario(status=500))
            [envelope] = await turn(ws, input="next", store=False, previous_response_id=first)
            check_envelope(envelope, 502, "upstream_error")
        else:
            mock.enqueue(Scenario(chunks=text_chunks(["par"], finish_reason=None),
                                  send_done=False))
            events = await turn(ws, input="next", store=False, previous_response_id=first)
            assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        [envelope] = await turn(ws, input="retry", store=False, previous_response_id=first)
        check_envelope(envelope, 400, "previous_response_not_found", "previous_response_id")


async def test_invalid_continuation_turn_also_evicts(proxy: Proxy) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        first = final(await turn(ws, input="hi", store=False))["id"]
        [envelope] = await turn(ws, input="x", store=False, previous_response_id=first,
                                temperature=9)
        check_envelope(envelope, 400, "decimal_above_max_value", "temperature")
        [envelope] = await turn(ws, input="x", store=False, previous_response_id=first)
        check_envelope(envelope, 400, "previous_response_not_found", "previous_response_id")


async def test_store_true_falls_back_to_the_store(proxy: Proxy, mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        kept = final(await turn(ws, input="remember me"))
    assert kept["store"] is True
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        follow = await turn(ws, input="and now?", previous_response_id=kept["id"])
    assert final(follow)["status"] == "completed"
    assert upstream_texts(mock)[-3:] == [
        ("user", "remember me"), ("assistant", "You said: remember me"), ("user", "and now?")]
    # The same response is readable over HTTP.
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{kept['id']}")) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == kept["id"]


async def test_stored_child_of_an_unstored_parent_keeps_the_whole_context(
        proxy: Proxy, mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        parent = final(await turn(ws, input="secret plan", store=False))["id"]
        child = final(await turn(ws, input="step two", previous_response_id=parent))
    assert child["store"] is True and child["previous_response_id"] == parent
    # Over HTTP (no connection state) the stored child still carries its parent's context.
    status, _, _ = await proxy.post({"model": "mock", "input": "step three",
                                     "previous_response_id": child["id"]})
    assert status == 200
    assert upstream_texts(mock) == [
        ("user", "secret plan"), ("assistant", "You said: secret plan"),
        ("user", "step two"), ("assistant", "You said: step two"), ("user", "step three")]


async def test_turns_sent_during_a_turn_run_afterwards_in_order(proxy: Proxy,
                                                                mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks([f"w{i} " for i in range(8)]), delay=0.05))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        for body in ({"input": "slow"}, {"input": "second"}, {"input": "x", "stream": False},
                     {"input": "fourth"}):
            await ws.send_json({"type": "response.create", "model": "mock", **body})
        slow = await read_turn(ws)
        second = await read_turn(ws)
        [envelope] = await read_turn(ws)
        fourth = await read_turn(ws)
    assert answer(slow) == "".join(f"w{i} " for i in range(8))
    assert answer(second) == "You said: second" and answer(fourth) == "You said: fourth"
    check_envelope(envelope, 400, "unsupported_parameter", "stream")
    # One in flight at a time: each upstream request began after the previous turn ended.
    requests = mock.requests
    assert len(requests) == 3
    for before, after in itertools.pairwise(requests):
        assert before.finished_at is not None and after.received_at >= before.finished_at


async def test_stream_true_and_transport_fields_are_tolerated(proxy: Proxy,
                                                              mock: MockUpstream) -> None:
    # openai-agents and Codex always put `stream: true` into response.create.
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        events = await turn(ws, input="hi", stream=True, background=False, stream_options=None,
                            client_metadata={"turn_id": "t-1"}, generate=True)
    assert answer(events) == "You said: hi"
    assert set(mock.requests[0].body) >= {"model", "messages"}
    for field in ("generate", "client_metadata", "background"):
        assert field not in mock.requests[0].body
    assert mock.requests[0].body["stream_options"] == {"include_usage": True}


async def test_generate_false_warms_up_without_the_upstream(proxy: Proxy,
                                                            mock: MockUpstream) -> None:
    """Codex's session start: `generate: false` with the system prompt and tools, then turns
    that continue from it with only their new items."""
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        warm = await turn(ws, generate=False, store=False, stream=True, tools=[TOOL],
                          input=[{"role": "developer", "content": "You are terse."}])
        assert [e["type"] for e in warm] == ["response.created", "response.in_progress",
                                             "response.completed"]
        response = final(warm)
        assert response["status"] == "completed" and response["output"] == []
        assert response["usage"]["total_tokens"] == 0
        assert response["tools"][0]["name"] == TOOL["name"]
        assert mock.requests == []
        follow = await turn(ws, input="hello", store=False,
                            previous_response_id=response["id"])
        assert answer(follow) == "You said: hello"
    assert upstream_texts(mock) == [("system", "You are terse."), ("user", "hello")]
    # store: false: the warm-up never reached the database.
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{response['id']}")) as r:
        assert r.status == 404


async def test_stored_warm_up_continues_over_http(proxy: Proxy, mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        response = final(await turn(ws, generate=False, instructions="Be kind.",
                                    input=[{"role": "user", "content": "I am Ada."}]))
    assert mock.requests == []
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{response['id']}")) as r:
        assert r.status == 200 and (await r.json())["status"] == "completed"
    async with proxy.session.post(proxy.server.make_url("/v1/responses"), json={
            "model": "mock", "input": "Who am I?",
            "previous_response_id": response["id"]}) as r:
        assert r.status == 200, await r.text()
    assert upstream_texts(mock) == [("user", "I am Ada."), ("user", "Who am I?")]


async def test_warm_up_errors_are_envelopes(proxy: Proxy, mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        [envelope] = await turn(ws, generate=False, input="x", previous_response_id="resp_no")
        check_envelope(envelope, 400, "previous_response_not_found", "previous_response_id")
        [envelope] = await turn(ws, generate=False,
                                input=[{"type": "item_reference", "id": "msg_unknown"}])
        check_envelope(envelope, 400, "item_not_found", "input[0].id")
    assert mock.requests == []


async def test_stream_id_is_echoed_on_every_event(proxy: Proxy, mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        events = await turn(ws, input="hi", stream_id="lane-a")
        assert events and all(e["stream_id"] == "lane-a" for e in events)
        warm = await turn(ws, input="x", generate=False, stream_id="lane-b")
        assert all(e["stream_id"] == "lane-b" for e in warm)
        await ws.send_json({"type": "response.create", "model": "m", "input": "x",
                            "stream": False, "stream_id": "lane-c"})
        [envelope] = await read_turn(ws)
        assert envelope["stream_id"] == "lane-c"
        assert envelope["error"]["param"] == "stream"
        # Without a stream_id, no key (older clients validate events strictly).
        plain = await turn(ws, input="again")
        assert all("stream_id" not in e for e in plain)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "param", "code"), [
    ({"type": "response.create", "model": "m", "input": "x", "stream": False},
     "stream", "unsupported_parameter"),
    ({"type": "response.create", "model": "m", "input": "x", "stream_options": {"x": 1}},
     "stream_options.x", "unknown_parameter"),
    ({"type": "response.create", "model": "m", "input": "x", "background": True},
     "background", "unsupported_parameter"),
    ({"type": "response.create", "model": "m", "input": "x", "generate": 0},
     "generate", "invalid_type"),
    ({"model": "m", "input": "x"}, "type", "missing_required_parameter"),
    ({"type": "response.cancel", "model": "m", "input": "x"}, "type", "invalid_value"),
    # OpenAI's steering (the SDK) and appending (Codex) events: named, connection kept.
    ({"type": "response.steer", "previous_response_id": "resp_1", "input": "faster"}, "type",
     "unsupported_parameter"),
    ({"type": "response.append", "input": []}, "type", "unsupported_parameter"),
    ({"type": "response.create", "model": "m"}, "input", "missing_required_parameter"),
    ({"type": "response.create", "model": "m", "input": [{"type": "bogus"}]},
     "input[0].type", "invalid_value"),
    (["response.create"], None, "invalid_type"),
])
async def test_bad_messages_get_error_envelopes(proxy: Proxy, mock: MockUpstream,
                                                message: Any, param: str | None,
                                                code: str) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_json(message)
        [envelope] = await read_turn(ws)
        error = check_envelope(envelope, 400, code, param)
        assert error["type"] == "invalid_request_error"
        assert answer(await turn(ws, input="still here")) == "You said: still here"
    assert len(mock.requests) == 1


async def test_non_json_messages(proxy: Proxy) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_str("{not json")
        check_envelope((await read_turn(ws))[0], 400, "invalid_json")
        # Binary frames holding JSON are read like text frames.
        await ws.send_bytes(json.dumps({"type": "response.create", "model": "mock",
                                        "input": "bytes"}).encode())
        assert answer(await read_turn(ws)) == "You said: bytes"


async def test_upstream_errors_before_the_response_starts(proxy: Proxy,
                                                         mock: MockUpstream) -> None:
    mock.enqueue(Scenario(status=429, headers={"Retry-After": "3"}), Scenario(status=404))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        check_envelope((await turn(ws, input="x"))[0], 429, "rate_limit_exceeded")
        check_envelope((await turn(ws, input="x"))[0], 404, "model_not_found", "model")
        assert answer(await turn(ws, input="ok")) == "You said: ok"


async def test_get_without_upgrade_is_426(proxy: Proxy) -> None:
    async with proxy.session.get(ws_url(proxy)) as resp:
        assert resp.status == 426 and resp.headers["Upgrade"] == "websocket"
        error = (await resp.json())["error"]
    assert error["code"] == "websocket_upgrade_required"


async def test_oversized_message_closes_with_1009(start_proxy: StartProxy,
                                                  settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_body_bytes=4096))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": "x" * 5000})
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


# -- connection lifetime ----------------------------------------------------------------------


async def test_connection_limit_when_idle(start_proxy: StartProxy, settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, ws_max_age_seconds=1.0))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        started = asyncio.get_running_loop().time()
        assert answer(await turn(ws, input="quick")) == "You said: quick"
        envelope = await receive_json(ws, within=20)
        elapsed = asyncio.get_running_loop().time() - started
        error = check_envelope(envelope, 400, "websocket_connection_limit_reached")
        assert "new connection" in error["message"]
        assert 0.5 < elapsed < 15
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.OK


async def test_connection_limit_lets_the_turn_in_progress_finish(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    # The turn starts at once and lasts about 2 s; the limit falls in the middle of it.
    proxy = await start_proxy(dataclasses.replace(settings, ws_max_age_seconds=1.0))
    mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(10)]), delay=0.2))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": "long"})
        await ws.send_json({"type": "response.create", "model": "m", "input": "queued"})
        events = await read_turn(ws)
        assert final(events)["status"] == "completed"
        # The queued turn is not started: the limit comes next, then the close.
        check_envelope(await receive_json(ws), 400, "websocket_connection_limit_reached")
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
    assert len(mock.requests) == 1


async def test_shutdown_closes_connections_after_their_turn(proxy: Proxy,
                                                             mock: MockUpstream) -> None:
    async with proxy.session.ws_connect(ws_url(proxy)) as busy, \
            proxy.session.ws_connect(ws_url(proxy)) as idle:
        assert answer(await turn(idle, input="warm")) == "You said: warm"
        mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(6)]), delay=0.05))
        await busy.send_json({"type": "response.create", "model": "m", "input": "slow"})
        assert (await receive_json(busy))["type"] == "response.created"
        closing = asyncio.create_task(proxy.server.close())
        # The idle connection goes at once; the busy one finishes its turn first.
        assert (await idle.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert idle.close_code == aiohttp.WSCloseCode.GOING_AWAY
        events = [await receive_json(busy)]
        while events[-1]["type"] not in TERMINAL:
            events.append(await receive_json(busy))
        assert events[-1]["response"]["status"] == "completed"
        assert (await busy.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert busy.close_code == aiohttp.WSCloseCode.GOING_AWAY
        await closing


async def test_client_leaving_mid_turn_closes_upstream(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(100)]), delay=0.05))
    async with proxy.session.ws_connect(ws_url(proxy)) as ws:
        await ws.send_json({"type": "response.create", "model": "m", "input": "go"})
        created = await receive_json(ws)
        while (await receive_json(ws))["type"] != "response.output_text.delta":
            pass
    await mock.wait_for_disconnect(timeout=5.0)
    # The stored response keeps what had arrived, as incomplete.
    response_id = created["response"]["id"]
    for _ in range(100):
        async with proxy.session.get(
                proxy.server.make_url(f"/v1/responses/{response_id}")) as resp:
            if resp.status == 200:
                stored = await resp.json()
                break
        await asyncio.sleep(0.05)
    assert stored["status"] == "incomplete"
    assert stored["incomplete_details"] == {"reason": "client_disconnected"}


# -- clients we did not write ---------------------------------------------------------------


async def test_openresponses_client(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["Hi ", "Ada"], usage=usage_dict(4, 2))))
    client = AsyncOpenResponses(base_url=proxy.url, api_key="sk-client")
    async with client.websocket() as connection:
        first = await connection.create({"model": "mock", "input": "I am Ada", "store": False})
        seen = [event async for event in first]
        assert seen[0].type == "response.created" and seen[-1].type == "response.completed"
        assert first.error is None and first.final_response.status == "completed"
        follow = await connection.create({"model": "mock", "input": "Who am I?",
                                          "store": False,
                                          "previous_response_id": first.response_id})
        texts = [e.delta async for e in follow if e.type == "response.output_text.delta"]
        assert "".join(texts) == "You said: Who am I?"
        assert follow.final_response.previous_response_id == first.response_id
        lost = await connection.create({"model": "mock", "input": "x", "store": False,
                                        "previous_response_id": "resp_unknown"})
        assert [event async for event in lost] == []
        assert lost.error is not None and lost.error.status == 400
        assert lost.error.error.code == "previous_response_not_found"
        again = await connection.create({"model": "mock", "input": "after the error"})
        assert [e.type async for e in again][-1] == "response.completed"
    assert upstream_texts(mock)[-1] == ("user", "after the error")
    assert upstream_texts(mock, 1)[:2] == [("user", "I am Ada"), ("assistant", "Hi Ada")]


# -- authentication (the upgrade request goes through the HTTP auth middleware) ---------------


async def test_keys_mode_authenticates_the_upgrade(start_proxy: StartProxy, settings: Settings,
                                                   mock: MockUpstream) -> None:
    key_a, key_b = "ka-" + "a" * 30, "kb-" + "b" * 30
    proxy = await start_proxy(dataclasses.replace(settings, auth_mode="keys",
                                                  api_keys=f"{key_a},{key_b}"))
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await proxy.session.ws_connect(ws_url(proxy), headers=headers)
        assert caught.value.status == 401
    as_a = {"Authorization": f"Bearer {key_a}"}
    async with proxy.session.ws_connect(ws_url(proxy), headers=as_a) as ws:
        owned = final(await turn(ws, input="mine"))["id"]
    # A stored response belongs to the key that made it, on WebSocket as over HTTP.
    async with proxy.session.ws_connect(ws_url(proxy),
                                        headers={"Authorization": f"Bearer {key_b}"}) as ws:
        [envelope] = await turn(ws, input="theirs", previous_response_id=owned)
        check_envelope(envelope, 400, "previous_response_not_found", "previous_response_id")
    async with proxy.session.ws_connect(ws_url(proxy), headers=as_a) as ws:
        assert final(await turn(ws, input="again", previous_response_id=owned))["status"] == \
            "completed"
    # ORP's own upstream key is used, never the client's.
    assert all(key_a not in str(r.headers.get("Authorization")) for r in mock.requests)


async def test_passthrough_mode_sends_the_upgrade_credential_upstream(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, auth_mode="passthrough"))
    async with proxy.session.ws_connect(
            ws_url(proxy), headers={"Authorization": "Bearer client-token"}) as ws:
        await turn(ws, input="one")
        await turn(ws, input="two")
    assert [r.headers["Authorization"] for r in mock.requests] == ["Bearer client-token"] * 2


async def test_openai_sdk_websocket(proxy: Proxy, mock: MockUpstream) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0)

    async def until_done(conn: Any) -> list[Any]:
        seen = []
        async for event in conn:
            seen.append(event)
            if event.type in TERMINAL or event.type == "error":
                return seen
        raise AssertionError("the connection ended mid-turn")

    async with client.responses.connect() as conn:
        await conn.response.create(model="mock", input="hi", store=False)
        first = await until_done(conn)
        assert first[0].type == "response.created" and first[-1].type == "response.completed"
        await conn.response.create(model="mock", input="again", store=False,
                                   previous_response_id=first[-1].response.id)
        follow = (await until_done(conn))[-1]
        assert follow.type == "response.completed"
        assert follow.response.output_text == "You said: again"
        await conn.response.create(model="mock", input="x", store=False,
                                   previous_response_id="resp_nope")
        [error] = await until_done(conn)
        assert (error.type, error.status, error.error.code) == (
            "error", 400, "previous_response_not_found")
        # The SDK's warm-up and lanes (response.create's `generate` and `stream_id`).
        await conn.response.create(model="mock", input=[{"role": "developer",
                                                         "content": "Be terse."}],
                                   store=False, generate=False, stream_id="lane-1")
        warm = await until_done(conn)
        assert warm[-1].type == "response.completed" and warm[-1].response.output == []
        assert {event.stream_id for event in warm} == {"lane-1"}
        await conn.response.create(model="mock", input="and now?", store=False,
                                   previous_response_id=warm[-1].response.id,
                                   stream_id="lane-1")
        turn_events = await until_done(conn)
        assert turn_events[-1].response.output_text == "You said: and now?"
    assert upstream_texts(mock, 1)[:2] == [("user", "hi"), ("assistant", "You said: hi")]
    assert upstream_texts(mock, -1) == [("system", "Be terse."), ("user", "and now?")]


# -- observability ----------------------------------------------------------------------------


async def test_each_turn_gets_its_own_access_line(proxy: Proxy, mock: MockUpstream,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="orp.access")
    mock.enqueue(Scenario(chunks=text_chunks(["ok"], usage=usage_dict(4, 1))))
    headers = {"X-Request-Id": "conn-7", "Authorization": "Bearer sk-never-logged"}
    async with proxy.session.ws_connect(ws_url(proxy), headers=headers) as ws:
        answered = await turn(ws, input="first")
        refused = await turn(ws, input="x", temperature="hot")
    assert answered[-1]["type"] == "response.completed" and refused[0]["status"] == 400
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "orp.access"]
    turns = [line for line in lines if line["method"] == "WS"]
    assert [(t["request_id"], t["status"]) for t in turns] == [("conn-7.1", 200),
                                                               ("conn-7.2", 400)]
    assert turns[0]["model"] == "mock" and turns[0]["output_tokens"] == 1
    assert turns[0]["response_id"] == final(answered)["id"]
    assert turns[1]["error_code"] == "invalid_type"
    assert "sk-never-logged" not in caplog.text


async def test_a_normally_closed_connection_is_not_a_client_hang_up(
        proxy: Proxy, mock: MockUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """The client closes with 1000 after its turn: the upgrade's line says 101, not 499."""
    import logging

    from orp_proxy.ops.metrics import REQUESTS

    def count(status: str) -> float:
        return REQUESTS.labels("/v1/responses", status, "false")._value.get()

    hang_ups, upgrades = count("499"), count("101")
    caplog.set_level(logging.INFO, logger="orp.access")
    mock.enqueue(Scenario(chunks=text_chunks(["ok"])))
    async with proxy.session.ws_connect(ws_url(proxy),
                                        headers={"X-Request-Id": "conn-closed"}) as ws:
        answered = await turn(ws, input="first")
        await ws.close()
    assert answered[-1]["type"] == "response.completed"

    def upgrade_line() -> dict[str, Any] | None:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "orp.access"]
        found = [x for x in lines if x["request_id"] == "conn-closed"]
        return found[0] if found else None

    for _ in range(200):
        if upgrade_line() is not None:
            break
        await asyncio.sleep(0.01)
    line = upgrade_line()
    assert line is not None and line["method"] == "GET"
    assert line["status"] == 101 and "error_code" not in line, line
    assert (count("499"), count("101")) == (hang_ups, upgrades + 1)
