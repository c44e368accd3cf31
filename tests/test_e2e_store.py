"""Stored responses end to end: context replay, the stored-response endpoints, owners,
durability and retention, through a listening ORP with the `openai` SDK and raw HTTP; every
test runs once on SQLite and once on PostgreSQL.

What the upstream saw is read from the mock's recorded request bodies, so every replay test
asserts the exact Chat Completions `messages` the lineage turned into.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import openresponses_types.types as ort
import pytest

from orp_proxy.app import SETTINGS
from orp_proxy.config import Settings, StoreTarget
from orp_proxy.state import GATEWAY
from orp_proxy.store.factory import open_store
from orp_proxy.store.postgres import PostgresStore
from orp_proxy.store.sqlite import SQLiteStore, StoredResponse
from orp_proxy.upstream.mock import (
    MockUpstream,
    Scenario,
    encode_sse,
    text_chunks,
    tool_call_chunks,
    usage_dict,
)
from tests.conftest import Proxy
from tests.pg import store_rows
from tests.sse_check import check_response_object

StartProxy = Callable[[Settings], Awaitable[Proxy]]

KEY_A = "sk-owner-a-0123456789abcdef"
KEY_B = "sk-owner-b-fedcba9876543210"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function", "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}


Sdk = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def sdk() -> AsyncIterator[Sdk]:
    """`sdk(proxy, key=KEY_A)`: an `openai` client of that proxy, closed after the test."""
    clients: list[openai.AsyncOpenAI] = []

    def make(proxy: Proxy, key: str = KEY_A) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def bearer(key: str | None = KEY_A) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def echo(text: str) -> list[dict[str, Any]]:
    """One turn against the mock's default model: the user's text and the mock's echo."""
    return [user(text), assistant(f"You said: {text}")]


async def http(proxy: Proxy, method: str, path: str, *, key: str | None = KEY_A,
               body: Any = None, params: dict[str, str] | None = None) -> tuple[int, Any]:
    async with proxy.session.request(method, proxy.server.make_url(path), json=body,
                                     params=params, headers=bearer(key)) as resp:
        return resp.status, await resp.json(content_type=None)


def api_error(status: int, payload: Any, expected_status: int) -> dict[str, Any]:
    """The `error` object of an error answer, after checking the envelope."""
    assert status == expected_status, payload
    assert set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_previous_not_found(exc: openai.APIStatusError, previous_id: str) -> None:
    assert exc.status_code == 400
    assert (exc.type, exc.param, exc.code) == (
        "invalid_request_error", "previous_response_id", "previous_response_not_found")
    assert previous_id in exc.message


@pytest.fixture
def settings(settings: Settings, store_url: str) -> Settings:
    """The shared settings with the store on each backend in turn."""
    return dataclasses.replace(settings, store_url=store_url)


async def rows(target: StoreTarget, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the store's database directly (a second connection, as another process would)."""
    return await store_rows(target, sql, params)


def proxy_db(proxy: Proxy) -> StoreTarget:
    return proxy.server.app[SETTINGS].store_target()


def patch_save(monkeypatch: pytest.MonkeyPatch,
               make: Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]
               ) -> None:
    """Replace `save_response` of both backends by `make(original)`."""
    for cls in (SQLiteStore, PostgresStore):
        monkeypatch.setattr(cls, "save_response", make(cls.save_response))


def messages_of(mock: MockUpstream, index: int = -1) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = mock.requests[index].body["messages"]
    return messages


# -- context replay ------------------------------------------------------------------------


async def test_three_turn_chain_replays_history_with_only_current_instructions(
        sdk: Sdk, proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    first = await client.responses.create(model="mock", input="first question",
                                          instructions="Answer briefly.")
    # The middle turn streams: both transports must store what the next turn replays.
    stream = await client.responses.create(model="mock", input="second question",
                                           previous_response_id=first.id,
                                           instructions="Answer in French.", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    second = events[-1].response
    assert second.previous_response_id == first.id
    third = await client.responses.create(
        model="mock", previous_response_id=second.id,
        input=[{"type": "message", "role": "user", "content": "third question"}])
    assert third.output_text == "You said: third question"
    assert third.previous_response_id == second.id and third.instructions is None

    assert [request.body["messages"] for request in mock.requests] == [
        [{"role": "system", "content": "Answer briefly."}, user("first question")],
        [{"role": "system", "content": "Answer in French."},
         *echo("first question"), user("second question")],
        [*echo("first question"), *echo("second question"), user("third question")],
    ]


@pytest.mark.parametrize("with_text", [False, True])
async def test_tool_round_trip(sdk: Sdk, proxy: Proxy, mock: MockUpstream, with_text: bool) -> None:
    calls = [("call_w1", "get_weather", '{"city": "Paris"}'),
             ("call_w2", "get_weather", '{"city": "Rome"}')]
    mock.enqueue(Scenario(chunks=tool_call_chunks(
        calls, split_args=4, interleave=True, usage=usage_dict(10, 20),
        text_before="Let me check." if with_text else None)))
    client = sdk(proxy)
    first = await client.responses.create(model="mock", input="Weather in Paris and Rome?",
                                          tools=[WEATHER_TOOL])  # type: ignore[list-item]
    made = [(o.call_id, o.name, o.arguments) for o in first.output if o.type == "function_call"]
    assert made == calls

    second = await client.responses.create(
        model="mock", previous_response_id=first.id, tools=[WEATHER_TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": "call_w1", "output": "sunny, 21 C"},
               {"type": "function_call_output", "call_id": "call_w2", "output": "rain, 14 C"}])
    assert second.status == "completed"
    tool_calls = [{"id": call_id, "type": "function",
                   "function": {"name": name, "arguments": arguments}}
                  for call_id, name, arguments in calls]
    turn_one = [
        user("Weather in Paris and Rome?"),
        {"role": "assistant", "content": "Let me check." if with_text else None,
         "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_w2", "content": "rain, 14 C"},
    ]
    assert messages_of(mock, 1) == turn_one
    assert mock.requests[1].body["tools"][0]["function"]["name"] == "get_weather"

    # The tool outputs are part of the stored lineage too.
    await client.responses.create(model="mock", previous_response_id=second.id, input="thanks")
    assert messages_of(mock, 2) == [
        *turn_one, assistant("You said: Weather in Paris and Rome?"), user("thanks")]


async def test_branches_see_only_their_own_lineage(sdk: Sdk, proxy: Proxy, mock: MockUpstream
                                                   ) -> None:
    client = sdk(proxy)
    root = await client.responses.create(model="mock", input="root")
    # Both branches are written at the same time.
    branch_a, branch_b = await asyncio.gather(
        client.responses.create(model="mock", input="branch A", previous_response_id=root.id),
        client.responses.create(model="mock", input="branch B", previous_response_id=root.id))
    leaf_a, leaf_b = await asyncio.gather(
        client.responses.create(model="mock", input="A again", previous_response_id=branch_a.id),
        client.responses.create(model="mock", input="B again", previous_response_id=branch_b.id))
    assert leaf_a.output_text == "You said: A again"
    by_last = {request.body["messages"][-1]["content"]: request.body["messages"]
               for request in mock.requests}
    assert by_last["branch A"] == [*echo("root"), user("branch A")]
    assert by_last["branch B"] == [*echo("root"), user("branch B")]
    assert by_last["A again"] == [*echo("root"), *echo("branch A"), user("A again")]
    assert by_last["B again"] == [*echo("root"), *echo("branch B"), user("B again")]
    assert leaf_b.previous_response_id == branch_b.id


# -- GET / DELETE / input_items ----------------------------------------------------------


async def test_get_returns_exactly_what_was_sent(sdk: Sdk, proxy: Proxy, mock: MockUpstream
                                                 ) -> None:
    body = {"model": "mock", "input": "keep this", "instructions": "Be terse.",
            "temperature": 0.25, "metadata": {"ticket": "T-1"}}
    status, _, raw = await proxy.post(body, headers=bearer())
    assert status == 200
    sent = json.loads(raw)
    status, got = await http(proxy, "GET", f"/v1/responses/{sent['id']}")
    assert status == 200 and got == sent
    check_response_object(got)

    # A streamed response with several output items: GET equals the terminal event's response.
    mock.enqueue(Scenario(chunks=tool_call_chunks(
        [("call_9", "get_weather", '{"city": "Oslo"}')], text_before="Checking.",
        usage=usage_dict(3, 4))))
    events, done = await proxy.stream({"model": "mock", "input": "Oslo?",
                                       "tools": [WEATHER_TOOL]}, headers=bearer())
    assert done
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    status, got = await http(proxy, "GET", f"/v1/responses/{final['id']}")
    assert status == 200 and got == final

    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="via the SDK")
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()


# The spec's output item models, by type; those of messages, calls and call outputs require
# `status`.
ITEM_MODELS = {"message": ort.Message, "function_call": ort.FunctionCall,
               "function_call_output": ort.FunctionCallOutput, "reasoning": ort.ReasoningBody}


def check_listed_item(item: dict[str, Any]) -> None:
    ITEM_MODELS[item["type"]].model_validate(item)
    assert item["status"] == "completed", item


async def test_input_items_carry_status(proxy: Proxy) -> None:
    items = [user("weather?"),
             {"type": "reasoning", "summary": [{"type": "summary_text", "text": "use tool"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather",
              "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
    status, _, raw = await proxy.post({"model": "mock", "input": items,
                                       "tools": [WEATHER_TOOL]}, headers=bearer())
    assert status == 200, raw
    status, page = await http(proxy, "GET", f"/v1/responses/{json.loads(raw)['id']}/input_items",
                              params={"order": "asc"})
    assert status == 200
    assert [i["type"] for i in page["data"]] == ["message", "reasoning", "function_call",
                                                 "function_call_output"]
    for item in page["data"]:
        check_listed_item(item)

    # Items stored before every item had a status are listed with one.
    store = proxy.server.app[GATEWAY].store
    old = [{"id": "fc_old", "type": "function_call", "call_id": "c", "name": "f",
            "arguments": "{}"},
           {"id": "fco_old", "type": "function_call_output", "call_id": "c", "output": "x"},
           {"id": "rs_old", "type": "reasoning", "summary": []}]
    response = json.loads(raw)
    await store.save_response(StoredResponse(
        id="resp_old", owner=store.owner_id(KEY_A), previous_response_id=None,
        created_at=response["created_at"], status="completed",
        response=dict(response, id="resp_old"), input_items=old))
    status, page = await http(proxy, "GET", "/v1/responses/resp_old/input_items")
    assert status == 200 and len(page["data"]) == 3
    for item in page["data"]:
        check_listed_item(item)


async def test_delete(sdk: Sdk, proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    first = await client.responses.create(model="mock", input="one")
    second = await client.responses.create(model="mock", input="two",
                                           previous_response_id=first.id)

    status, body = await http(proxy, "DELETE", f"/v1/responses/{first.id}")
    assert (status, body) == (200, {"id": first.id, "object": "response", "deleted": True})
    error = api_error(*await http(proxy, "GET", f"/v1/responses/{first.id}"), 404)
    assert (error["type"], error["code"]) == ("not_found", "not_found")
    api_error(*await http(proxy, "DELETE", f"/v1/responses/{first.id}"), 404)
    api_error(*await http(proxy, "GET", f"/v1/responses/{first.id}/input_items"), 404)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="mock", input="x", previous_response_id=first.id)
    assert_previous_not_found(caught.value, first.id)
    assert await rows(proxy_db(proxy), "SELECT count(*) FROM items i JOIN responses r "
                "ON r.rid = i.response_rid WHERE r.id = ?", (first.id,)) == [(0,)]

    # The child survives its parent; its context starts after the gap.
    await client.responses.create(model="mock", input="three", previous_response_id=second.id)
    assert messages_of(mock) == [*echo("two"), user("three")]

    # The SDK's delete (no body expected) works too, and really deletes.
    await client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second.id)


async def test_input_items_pagination(sdk: Sdk, proxy: Proxy) -> None:
    client = sdk(proxy)
    texts = [f"part {i}" for i in range(5)]
    created = await client.responses.create(
        model="mock", input=[{"role": "user", "content": text} for text in texts])
    path = f"/v1/responses/{created.id}/input_items"

    status, page = await http(proxy, "GET", path)
    assert status == 200
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"}
    assert page["object"] == "list" and page["has_more"] is False
    # Newest first by default.
    assert [item["content"][0]["text"] for item in page["data"]] == texts[::-1]
    ids = [item["id"] for item in page["data"]][::-1]  # ids[i] is "part i"
    assert (page["first_id"], page["last_id"]) == (ids[4], ids[0])
    assert all(item["type"] == "message" and item["role"] == "user" for item in page["data"])

    async def ids_of(**params: str) -> tuple[list[str], bool]:
        status, page = await http(proxy, "GET", path, params=params)
        assert status == 200, page
        got = [item["id"] for item in page["data"]]
        assert (page["first_id"], page["last_id"]) == ((got[0], got[-1]) if got else (None, None))
        return got, page["has_more"]

    assert await ids_of(limit="2", order="asc") == (ids[0:2], True)
    assert await ids_of(limit="2", order="asc", after=ids[1]) == (ids[2:4], True)
    assert await ids_of(limit="2", order="asc", after=ids[3]) == ([ids[4]], False)
    assert await ids_of(limit="2", order="desc") == ([ids[4], ids[3]], True)
    assert await ids_of(limit="2", order="desc", after=ids[3]) == ([ids[2], ids[1]], True)
    assert await ids_of(limit="2", order="desc", after=ids[1]) == ([ids[0]], False)
    assert await ids_of(limit="100", order="asc", after=ids[0], before=ids[4]) == (
        ids[1:4], False)
    assert await ids_of(limit="2", order="asc", before=ids[3]) == (ids[1:3], True)
    assert await ids_of(limit="2", order="desc", before=ids[1]) == ([ids[3], ids[2]], True)
    assert await ids_of(limit="1", order="asc") == ([ids[0]], True)
    assert await ids_of(order="asc", after="msg_unknown") == ([], False)

    # The SDK pages through with `after` on its own.
    listed = [item.id async for item in client.responses.input_items.list(
        created.id, limit=2, order="asc")]
    assert listed == ids
    first_page = await client.responses.input_items.list(created.id, limit=3)
    assert [item.id for item in first_page.data] == ids[:1:-1] and first_page.has_more

    for params, param in [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                          ({"limit": "ten"}, "limit"), ({"limit": ""}, "limit"),
                          ({"order": "up"}, "order"), ({"order": "ASC"}, "order")]:
        error = api_error(*await http(proxy, "GET", path, params=params), 400)
        assert (error["type"], error["param"]) == ("invalid_request_error", param), params
    api_error(*await http(proxy, "GET", "/v1/responses/resp_nope/input_items"), 404)


# -- owners --------------------------------------------------------------------------------


@pytest.mark.parametrize("auth_mode", ["keys", "none"])
async def test_owner_isolation(sdk: Sdk, start_proxy: StartProxy, settings: Settings,
                               mock: MockUpstream, auth_mode: str) -> None:
    # Owners are the presented keys: gateway keys, or any bearer token when auth is off.
    proxy = await start_proxy(dataclasses.replace(settings, auth_mode=auth_mode,
                                                  api_keys=f"{KEY_A},{KEY_B}"))
    owner_a, owner_b = sdk(proxy, KEY_A), sdk(proxy, KEY_B)
    theirs = await owner_a.responses.create(model="mock", input="secret plans")
    input_id = str((await owner_a.responses.input_items.list(theirs.id)).data[0].id)
    output_id = str(theirs.output[0].id)

    with pytest.raises(openai.NotFoundError):
        await owner_b.responses.retrieve(theirs.id)
    with pytest.raises(openai.NotFoundError):
        await owner_b.responses.delete(theirs.id)
    with pytest.raises(openai.NotFoundError):
        await owner_b.responses.input_items.list(theirs.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await owner_b.responses.create(model="mock", input="x", previous_response_id=theirs.id)
    assert_previous_not_found(caught.value, theirs.id)
    for item_id in (input_id, output_id):
        with pytest.raises(openai.BadRequestError) as caught:
            await owner_b.responses.create(
                model="mock", input=[{"type": "item_reference", "id": item_id}])
        assert (caught.value.param, caught.value.code) == ("input[0].id", "item_not_found")
    # No credential at all: refused (keys), or an owner of its own (anonymous), never a
    # wildcard.
    anonymous = 401 if auth_mode == "keys" else 404
    for method, path in [("GET", f"/v1/responses/{theirs.id}"),
                         ("DELETE", f"/v1/responses/{theirs.id}"),
                         ("GET", f"/v1/responses/{theirs.id}/input_items")]:
        api_error(*await http(proxy, method, path, key=None), anonymous)
    requests_before = len(mock.requests)
    status, payload = await http(proxy, "POST", "/v1/responses", key=None, body={
        "model": "mock", "input": "x", "previous_response_id": theirs.id})
    error = api_error(status, payload, 401 if auth_mode == "keys" else 400)
    if auth_mode == "none":
        assert error["code"] == "previous_response_not_found"
    assert len(mock.requests) == requests_before  # refused before reaching the upstream

    # Nothing of the above touched the owner's response.
    assert (await owner_a.responses.retrieve(theirs.id)).model_dump() == theirs.model_dump()

    # The owner's own references resolve to the stored items, in place.
    again = await owner_a.responses.create(model="mock", input=[
        {"type": "item_reference", "id": input_id},
        {"id": output_id},  # `type` may be omitted on a reference
        {"role": "user", "content": "go on"}])
    assert messages_of(mock) == [*echo("secret plans"), user("go on")]
    listed = (await owner_a.responses.input_items.list(again.id, order="asc")).data
    assert [item.id for item in listed][:2] == [input_id, output_id]

    # The store keeps a keyed hash of the credential, never the credential itself.
    db = proxy_db(proxy)
    ((secret,),) = await rows(db, "SELECT value FROM meta WHERE key = 'owner_secret'")
    owners = {owner for (owner,) in await rows(db, "SELECT DISTINCT owner FROM responses")}
    assert owners == {hmac.new(bytes.fromhex(secret), KEY_A.encode(), hashlib.sha256
                               ).hexdigest()}
    if db.backend == "sqlite":
        files = [Path(db.path), Path(db.path + "-wal")]
        blob = b"".join(path.read_bytes() for path in files if path.exists())
        assert KEY_A.encode() not in blob and KEY_B.encode() not in blob
    for key in (KEY_A, KEY_B):
        assert await rows(db, "SELECT count(*) FROM responses r JOIN items i "
                          "ON i.response_rid = r.rid WHERE r.response LIKE ? OR i.body LIKE ? "
                          "OR r.owner LIKE ?", (f"%{key}%",) * 3) == [(0,)]
        assert await rows(db, "SELECT count(*) FROM meta WHERE value LIKE ?",
                          (f"%{key}%",)) == [(0,)]


async def test_store_false_writes_nothing(sdk: Sdk, proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    kept = await client.responses.create(model="mock", input="kept")
    forgotten = await client.responses.create(model="mock", input="forget me", store=False,
                                              previous_response_id=kept.id)
    assert forgotten.status == "completed" and forgotten.model_dump()["store"] is False
    assert forgotten.output_text == "You said: forget me"
    # store: false still reads the stored lineage it continues from.
    assert messages_of(mock) == [*echo("kept"), user("forget me")]

    events, done = await proxy.stream({"model": "mock", "input": "stream, forget me",
                                       "store": False}, headers=bearer())
    assert done and events[-1]["type"] == "response.completed"
    streamed = events[-1]["response"]
    assert streamed["store"] is False

    for response_id in (forgotten.id, streamed["id"]):
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list(response_id)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="mock", input="x",
                                          previous_response_id=response_id)
        assert_previous_not_found(caught.value, response_id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(
            model="mock", input=[{"type": "item_reference", "id": str(forgotten.output[0].id)}])
    assert caught.value.code == "item_not_found"
    assert await rows(proxy_db(proxy), "SELECT id FROM responses") == [(kept.id,)]


# -- durability ----------------------------------------------------------------------------


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> float:
    """Every save takes 0.3 s longer: a response sent before its save committed would be
    found missing by an immediate follow-up."""
    delay = 0.3

    def make(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def slow_save(self: Any, record: StoredResponse) -> None:
            await asyncio.sleep(delay)
            await original(self, record)

        return slow_save

    patch_save(monkeypatch, make)
    return delay


ENDINGS = {
    "response.completed": lambda: Scenario(chunks=text_chunks(["Hello", " there"],
                                                              usage=usage_dict(2, 2))),
    "response.incomplete": lambda: Scenario(chunks=text_chunks(["Hello", " there"],
                                                               finish_reason="length")),
    "response.failed": lambda: Scenario(raw=encode_sse(
        text_chunks(["Hello", " there"], finish_reason=None), send_done=False)
        + b'data: {"error": {"message": "overloaded"}}\n\n'),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_stored_before_the_terminal_event_reaches_the_client(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream, slow_disk: float,
        ending: str) -> None:
    # Two servers on one database file: the follow-up lands on "another worker".
    worker_1, worker_2 = await start_proxy(settings), await start_proxy(settings)
    mock.enqueue(ENDINGS[ending]())
    async with aiohttp.ClientSession() as session, session.post(
            worker_1.server.make_url("/v1/responses"), headers=bearer(),
            json={"model": "mock", "input": "hi", "stream": True}) as resp:
        assert resp.status == 200
        event = None
        while True:
            line = (await resp.content.readline()).decode()
            assert line, f"stream ended before {ending}"
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: ") and event == ending:
                terminal = json.loads(line[6:])["response"]
                break
        # The stream is still open here: [DONE] is unread.
        status, payload = await http(worker_2, "POST", "/v1/responses", body={
            "model": "mock", "input": "and then?", "previous_response_id": terminal["id"]})
        assert status == 200, payload
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert messages_of(mock) == [user("hi"), assistant("Hello there"), user("and then?")]

    # JSON: the body is only sent once the response is committed.
    status, _, raw = await worker_2.post({"model": "mock", "input": "json turn",
                                          "previous_response_id": payload["id"]},
                                         headers=bearer())
    assert status == 200
    status, follow = await http(worker_1, "POST", "/v1/responses", body={
        "model": "mock", "input": "last", "previous_response_id": json.loads(raw)["id"]})
    assert status == 200, follow
    assert messages_of(mock) == [user("hi"), assistant("Hello there"), *echo("and then?"),
                                 *echo("json turn"), user("last")]


# -- failures --------------------------------------------------------------------------------


async def test_unknown_previous_id(sdk: Sdk, proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="mock", input="x",
                                      previous_response_id="resp_does_not_exist")
    assert_previous_not_found(caught.value, "resp_does_not_exist")
    # Streaming requests are refused the same way, before any event.
    status, headers, raw = await proxy.post({"model": "mock", "input": "x", "stream": True,
                                             "previous_response_id": "resp_gone"},
                                            headers=bearer())
    assert headers["Content-Type"].startswith("application/json")
    error = api_error(status, json.loads(raw), 400)
    assert (error["param"], error["code"]) == ("previous_response_id",
                                               "previous_response_not_found")
    assert mock.requests == []


async def wait_stored(proxy: Proxy, response_id: str) -> dict[str, Any]:
    """The stored response, once it is there (an interrupted one is saved after the fact)."""
    deadline = time.monotonic() + 5.0
    while True:
        status, body = await http(proxy, "GET", f"/v1/responses/{response_id}")
        if status == 200:
            return dict(body)
        assert status == 404, body
        assert time.monotonic() < deadline, f"{response_id} was never stored"
        await asyncio.sleep(0.02)


async def test_interrupted_stream_is_stored_incomplete(sdk: Sdk, proxy: Proxy, mock: MockUpstream
                                                       ) -> None:
    pieces = [f"w{i} " for i in range(40)]
    mock.enqueue(Scenario(chunks=text_chunks(pieces), delay=0.05))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.server.make_url("/v1/responses"), headers=bearer(),
                                  json={"model": "mock", "input": "talk", "stream": True})
        response_id = None
        deltas = 0
        while deltas < 3:
            line = (await resp.content.readline()).decode()
            assert line
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "response.created":
                    response_id = event["response"]["id"]
                deltas += event["type"] == "response.output_text.delta"
        resp.close()
    assert response_id is not None
    await mock.wait_for_disconnect(timeout=5.0)

    stored = await wait_stored(proxy, response_id)
    check_response_object(stored)
    assert stored["status"] == "incomplete"
    assert stored["incomplete_details"] == {"reason": "client_disconnected"}
    (message,) = stored["output"]
    assert message["status"] == "incomplete"
    partial = message["content"][0]["text"]
    assert len(partial) >= len("w0 w1 w2 ") and "".join(pieces).startswith(partial)
    assert len(partial) < len("".join(pieces))

    # What was said before the disconnect is context for the next turn.
    await sdk(proxy).responses.create(model="mock", input="go on",
                                      previous_response_id=response_id)
    assert messages_of(mock) == [user("talk"), assistant(partial), user("go on")]


# -- retention -------------------------------------------------------------------------------


async def test_expired_responses_are_purged_on_their_own(
        sdk: Sdk, start_proxy: StartProxy, settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=1.0,
                                                  purge_interval=0.1))
    client = sdk(proxy)
    before = time.time()
    created = await client.responses.create(model="mock", input="short-lived")
    ((expires_at,),) = await rows(settings.store_target(), "SELECT expires_at FROM responses")
    assert before + 1.0 <= expires_at <= time.time() + 1.0
    deadline = time.monotonic() + 15
    while await rows(settings.store_target(), "SELECT count(*) FROM responses") != [(0,)]:
        assert time.monotonic() < deadline, "the purge never ran"
        await asyncio.sleep(0.05)
    assert time.time() >= expires_at  # not purged before its time
    assert await rows(settings.store_target(), "SELECT count(*) FROM items") == [(0,)]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="mock", input="x", previous_response_id=created.id)
    assert_previous_not_found(caught.value, created.id)


async def test_an_expired_response_is_gone_before_the_purge(
        sdk: Sdk, start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    # The purge runs hourly here: what hides the response is the reads' own expiry check.
    proxy = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=0.1,
                                                  purge_interval=3600))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="short-lived")
    db_path = proxy_db(proxy)
    ((expires_at, input_id),) = await rows(
        db_path, "SELECT r.expires_at, i.item_id FROM responses r JOIN items i "
        "ON i.response_rid = r.rid AND i.kind = 0 WHERE r.id = ?", (created.id,))
    output_id = str(created.output[0].id)
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.02)

    for method, path in [("GET", f"/v1/responses/{created.id}"),
                         ("GET", f"/v1/responses/{created.id}/input_items"),
                         ("DELETE", f"/v1/responses/{created.id}")]:
        error = api_error(*await http(proxy, method, path), 404)
        assert error["code"] == "not_found", (method, path)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="mock", input="x", previous_response_id=created.id)
    assert_previous_not_found(caught.value, created.id)
    for item_id in (input_id, output_id):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(
                model="mock", input=[{"type": "item_reference", "id": item_id}])
        assert (caught.value.param, caught.value.code) == ("input[0].id", "item_not_found")
    assert len(mock.requests) == 1  # every refusal came before the upstream
    assert await rows(db_path, "SELECT count(*) FROM responses WHERE id = ?",
                      (created.id,)) == [(1,)]


async def test_a_live_continuation_keeps_its_expired_turns(
        sdk: Sdk, start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    # Two servers on one file: turns of a minute and of an hour. The purge is run as if two
    # minutes had passed, so nothing here depends on how fast the machine is.
    brief = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=60,
                                                  purge_interval=3600))
    lasting = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=3600,
                                                    purge_interval=3600))
    first = await sdk(brief).responses.create(model="mock", input="first")
    second = await sdk(lasting).responses.create(model="mock", input="second",
                                                 previous_response_id=first.id)
    # A conversation nobody continues: it goes as a whole.
    lone = await sdk(brief).responses.create(model="mock", input="lone")
    await sdk(brief).responses.create(model="mock", input="lone again",
                                      previous_response_id=lone.id)

    store = await open_store(settings)
    try:
        assert await store.purge_expired(time.time() + 120) == 2
    finally:
        await store.close()
    client = sdk(lasting)
    await client.responses.create(model="mock", input="third", previous_response_id=second.id)
    assert messages_of(mock) == [*echo("first"), *echo("second"), user("third")]
    assert await rows(settings.store_target(), "SELECT count(*) FROM responses") == [(3,)]


async def orp_proxy_cli(*args: str) -> Any:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orp_proxy.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    return json.loads(out)


async def test_store_purge_command(sdk: Sdk, start_proxy: StartProxy, settings: Settings) -> None:
    # Two servers on one file: one keeps responses an hour, the other a few milliseconds.
    # Neither purges on its own within the test; the command does, while both keep the
    # database open.
    long_lived = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=3600,
                                                       purge_interval=3600))
    short_lived = await start_proxy(dataclasses.replace(settings, store_ttl_seconds=0.01,
                                                        purge_interval=3600))
    kept = await sdk(long_lived).responses.create(model="mock", input="kept")
    doomed = await sdk(short_lived).responses.create(model="mock", input="doomed")
    url = ["--store-url", settings.store_url or ""]
    stats = await orp_proxy_cli("store", "stats", *url)
    assert (stats["responses"], stats["items"]) == (2, 4)
    assert stats.get("journal_mode", "wal") == "wal"
    await asyncio.sleep(0.05)
    assert await orp_proxy_cli("store", "purge", *url) == {"purged": 1}
    assert await orp_proxy_cli("store", "purge", *url) == {"purged": 0}
    client = sdk(long_lived)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(doomed.id)
    assert (await client.responses.retrieve(kept.id)).id == kept.id
    stats = await orp_proxy_cli("store", "vacuum", *url)
    assert (stats["responses"], stats["items"]) == (1, 2)
    # The servers still read and write after the vacuum.
    fresh = await client.responses.create(model="mock", input="fresh",
                                          previous_response_id=kept.id)
    assert (await client.responses.retrieve(fresh.id)).id == fresh.id


# -- other endings -------------------------------------------------------------------------


async def test_incomplete_and_failed_responses_are_stored(sdk: Sdk, proxy: Proxy,
                                                         mock: MockUpstream) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["Cut ", "short"], finish_reason="length")))
    events, _ = await proxy.stream({"model": "mock", "input": "long story"}, headers=bearer())
    cut = events[-1]["response"]
    assert cut["status"] == "incomplete"
    status, got = await http(proxy, "GET", f"/v1/responses/{cut['id']}")
    assert status == 200 and got == cut

    mock.enqueue(Scenario(raw=encode_sse(text_chunks(["Half a"], finish_reason=None),
                                         send_done=False)
                          + b'data: {"error": {"message": "out of memory"}}\n\n'))
    events, _ = await proxy.stream({"model": "mock", "input": "again",
                                    "previous_response_id": cut["id"]}, headers=bearer())
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    status, got = await http(proxy, "GET", f"/v1/responses/{failed['id']}")
    assert status == 200 and got == failed

    # Both are context like any other turn.
    await sdk(proxy).responses.create(model="mock", input="and now?",
                                      previous_response_id=failed["id"])
    assert messages_of(mock) == [user("long story"), assistant("Cut short"), user("again"),
                                 assistant("Half a"), user("and now?")]


async def test_a_failed_save_is_never_reported_as_completed(
        sdk: Sdk, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    def make(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def broken_save(self: Any, record: StoredResponse) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        return broken_save

    patch_save(monkeypatch, make)
    events, done = await proxy.stream({"model": "mock", "input": "x"}, headers=bearer())
    assert done and [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "store_failed"
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(proxy).responses.create(model="mock", input="x")
    assert caught.value.status_code >= 500 and caught.value.code == "store_failed"
    # store: false does not touch the store, so it still works.
    kept = await sdk(proxy).responses.create(model="mock", input="x", store=False)
    assert kept.status == "completed"


async def test_interrupted_json_request_is_stored_incomplete(proxy: Proxy, mock: MockUpstream
                                                             ) -> None:
    mock.enqueue(Scenario(chunks=text_chunks([f"w{i} " for i in range(40)]), delay=0.05))
    # The answer takes 2 s; the client gives up after 1 s.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(proxy.server.make_url("/v1/responses"), headers=bearer(),
                               json={"model": "mock", "input": "talk"})
    await mock.wait_for_disconnect(timeout=5.0)
    deadline = time.monotonic() + 5
    while not (found := await rows(proxy_db(proxy), "SELECT id, status FROM responses")):
        assert time.monotonic() < deadline, "the interrupted response was never stored"
        await asyncio.sleep(0.02)
    ((response_id, status),) = found
    assert status == "incomplete"
    stored = await wait_stored(proxy, response_id)
    text = stored["output"][0]["content"][0]["text"]
    assert text.startswith("w0 ") and len(text) < len("".join(f"w{i} " for i in range(40)))


async def test_ids_with_a_nul_character_are_unknown_on_every_store(proxy: Proxy) -> None:
    """PostgreSQL text cannot hold NUL: such an id is simply unknown there, as on SQLite
    (404 or the 400 naming the parameter), never a 500."""
    auth = {"Authorization": f"Bearer {KEY_A}"}
    base = "/v1/responses/resp%00x"
    for method, path in (("GET", base), ("DELETE", base), ("GET", base + "/input_items"),
                         ("GET", base + "?stream=true"), ("POST", base + "/cancel"),
                         ("GET", "/v1/responses/resp_1/input_items?after=m%00")):
        async with proxy.session.request(method, proxy.server.make_url(path),
                                         headers=auth) as resp:
            assert resp.status == 404, (method, path, await resp.text())
    for body, param, code in (
            ({"previous_response_id": "resp\u0000x"}, "previous_response_id",
             "previous_response_not_found"),
            ({"input": [{"type": "item_reference", "id": "m\u0000"}]}, "input[0].id",
             "item_not_found")):
        status, _, data = await proxy.post({"model": "mock", "input": "x", **body},
                                           headers=auth)
        error = json.loads(data)["error"]
        assert (status, error["param"], error["code"]) == (400, param, code), data
