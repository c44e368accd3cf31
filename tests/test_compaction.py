"""`POST /v1/responses/compact` and compaction items fed back as input (HTTP and WebSocket)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import openresponses_types.types as ort
import pytest
from openresponses import AsyncOpenResponses

from orp_proxy.config import ConfigError, Settings
from orp_proxy.http.compact import SUMMARY_REQUEST
from orp_proxy.protocol.summaries import SUMMARY_PREFIX, CompactionCipher, SealedSummaryError
from orp_proxy.store.sqlite import SQLiteStore
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, usage_dict
from tests.conftest import Proxy

StartProxy = Callable[[Settings], Awaitable[Proxy]]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "My name is Ada and I like Rust."},
    {"type": "message", "role": "assistant", "content": "Nice to meet you, Ada."},
    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "42 crates"},
    {"type": "message", "role": "user",
     "content": [{"type": "input_text", "text": "Count my crates."}]},
]
SUMMARY = "Ada likes Rust; the lookup tool found 42 crates."


def sdk(proxy: Proxy, key: str = "sk-client") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0)


def summary_scenario(text: str = SUMMARY) -> Scenario:
    return Scenario(chunks=text_chunks([text[:10], text[10:]], usage=usage_dict(120, 14,
                                                                              cached=20)))


def check_compaction(body: dict[str, Any]) -> dict[str, Any]:
    """A `CompactResource` by `openresponses-types`, ending in exactly one compaction item."""
    ort.CompactResource.model_validate(body)
    assert body["object"] == "response.compaction"
    assert set(body) == {"id", "object", "output", "created_at", "usage"}
    *kept, item = body["output"]
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    assert isinstance(item["encrypted_content"], str) and item["encrypted_content"]
    assert all(i["type"] == "message" and i["role"] == "user" for i in kept)
    return dict(item)


CLIENT = {"Authorization": "Bearer sk-client"}  # the credential `sdk()` uses


async def compact(proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
    status, _, data = await proxy.post(body, path="/v1/responses/compact", headers=CLIENT)
    assert status == 200, data
    result: dict[str, Any] = json.loads(data)
    check_compaction(result)
    return result


def upstream_messages(mock: MockUpstream, index: int = -1) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = mock.requests[index].body["messages"]
    return messages


# -- the endpoint ---------------------------------------------------------------------------


async def test_compact_with_the_openai_sdk(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    raw = await sdk(proxy).responses.with_raw_response.compact(
        model="mock", input=CONVERSATION, instructions="You are a crate counter.")
    parsed = raw.parse()
    assert parsed.object == "response.compaction" and parsed.output[-1].type == "compaction"
    body = json.loads(raw.text)
    item = check_compaction(body)
    # The user messages verbatim and in order, then the sealed summary.
    kept = [m["content"][0]["text"] for m in body["output"][:-1]]
    assert kept == ["My name is Ada and I like Rust.", "Count my crates."]
    assert SUMMARY not in json.dumps(body) and "Ada likes" not in item["encrypted_content"]
    assert body["usage"]["input_tokens"] == 120 and body["usage"]["output_tokens"] == 14
    assert body["usage"]["input_tokens_details"]["cached_tokens"] == 20
    # Upstream: instructions, the whole context, then the request for a summary.
    messages = upstream_messages(mock)
    assert messages[0] == {"role": "system", "content": "You are a crate counter."}
    assert messages[1] == {"role": "user", "content": "My name is Ada and I like Rust."}
    assert {"role": "tool", "tool_call_id": "call_1", "content": "42 crates"} in messages
    assert messages[-1] == {"role": "user", "content": SUMMARY_REQUEST}
    assert "tools" not in mock.requests[-1].body


async def test_compaction_item_replays_the_summary(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    window = (await compact(proxy, {"model": "mock", "input": CONVERSATION}))["output"]
    follow = await sdk(proxy).responses.create(
        model="mock", input=[*window, {"role": "user", "content": "How many crates?"}])
    assert follow.output_text == "You said: How many crates?"
    sent = upstream_messages(mock)
    assert sent == [
        {"role": "user", "content": "My name is Ada and I like Rust."},
        {"role": "user", "content": "Count my crates."},
        {"role": "user", "content": SUMMARY_PREFIX + SUMMARY},
        {"role": "user", "content": "How many crates?"},
    ]
    assert window[-1]["encrypted_content"] not in json.dumps(mock.requests[-1].body)
    # The store keeps the item as the client sent it: sealed, never the plain summary.
    items = await sdk(proxy).responses.input_items.list(follow.id, order="asc")
    stored = [i.model_dump(mode="json") for i in items.data]
    assert stored[2]["type"] == "compaction"
    assert stored[2]["encrypted_content"] == window[-1]["encrypted_content"]
    assert SUMMARY not in json.dumps(stored)
    # ... and a continuation replays it again from the stored lineage.
    await sdk(proxy).responses.create(model="mock", input="And now?",
                                      previous_response_id=follow.id)
    assert {"role": "user", "content": SUMMARY_PREFIX + SUMMARY} in upstream_messages(mock)


async def test_compact_from_previous_response_id(proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    first = await client.responses.create(model="mock", input="I live in Lyon.")
    second = await client.responses.create(model="mock", input="I have a cat.",
                                           previous_response_id=first.id)
    mock.enqueue(summary_scenario("Lives in Lyon, has a cat."))
    result = await compact(proxy, {"model": "mock", "previous_response_id": second.id,
                                   "input": "Summarise please."})
    assert [m["content"][0]["text"] for m in result["output"][:-1]] == [
        "I live in Lyon.", "I have a cat.", "Summarise please."]
    assert upstream_messages(mock) == [
        {"role": "user", "content": "I live in Lyon."},
        {"role": "assistant", "content": "You said: I live in Lyon."},
        {"role": "user", "content": "I have a cat."},
        {"role": "assistant", "content": "You said: I have a cat."},
        {"role": "user", "content": "Summarise please."},
        {"role": "user", "content": SUMMARY_REQUEST},
    ]
    # A new chain starts from the compacted window, as the spec's WebSocket section says.
    await client.responses.create(model="mock", input=[*result["output"],
                                                       {"role": "user", "content": "Where?"}])
    assert {"role": "user", "content": SUMMARY_PREFIX + "Lives in Lyon, has a cat."} in \
        upstream_messages(mock)


async def test_compacting_a_compacted_window_folds_the_old_summary(
        proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario("first summary"), summary_scenario("second summary"))
    window = (await compact(proxy, {"model": "mock", "input": CONVERSATION}))["output"]
    again = await compact(proxy, {"model": "mock",
                                  "input": [*window, {"role": "user", "content": "More."}]})
    # The summariser saw the old summary in place of its item; one compaction item remains.
    assert {"role": "user", "content": SUMMARY_PREFIX + "first summary"} in \
        upstream_messages(mock)
    assert [i["type"] for i in again["output"]] == ["message"] * 3 + ["compaction"]


async def test_strict_openresponses_client(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    client = AsyncOpenResponses(base_url=proxy.url, api_key="sk-client")
    # The strict client wants every item typed.
    typed = [{"type": "message", **item} if "role" in item else item for item in CONVERSATION]
    result = await client.responses.compact({"model": "mock", "input": typed})
    assert result.object == "response.compaction"
    body = result.model_dump(mode="json", exclude_none=True)
    check_compaction(body)
    follow = await client.responses.create({"model": "mock", "input": body["output"]})
    assert follow.status == "completed"
    assert {"role": "user", "content": SUMMARY_PREFIX + SUMMARY} in upstream_messages(mock)


async def test_compaction_item_over_websocket(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    window = (await compact(proxy, {"model": "mock", "input": CONVERSATION}))["output"]
    async with proxy.session.ws_connect(proxy.server.make_url("/v1/responses"),
                                        headers=CLIENT) as ws:
        await ws.send_json({"type": "response.create", "model": "mock", "store": False,
                            "input": [*window, {"role": "user", "content": "Go on."}]})
        while True:
            event = json.loads((await ws.receive(timeout=10)).data)
            if event["type"] == "response.completed":
                break
            assert event["type"] != "error", event
    assert upstream_messages(mock)[-2:] == [
        {"role": "user", "content": SUMMARY_PREFIX + SUMMARY},
        {"role": "user", "content": "Go on."}]


# -- errors ---------------------------------------------------------------------------------


def error_of(status: int, data: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error, status=status)


async def test_tampered_blob_is_400(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    window = (await compact(proxy, {"model": "mock", "input": CONVERSATION}))["output"]
    blob = window[-1]["encrypted_content"]
    middle = len(blob) // 2
    tampered = blob[:middle] + ("A" if blob[middle] != "A" else "B") + blob[middle + 1:]
    before = len(mock.requests)

    async def send(content: str, headers: dict[str, str] = CLIENT) -> tuple[int, bytes]:
        status, _, data = await proxy.post({"model": "mock", "input": [
            {"role": "user", "content": "hi"},
            {"type": "compaction", "encrypted_content": content}]}, headers=headers)
        return status, data

    for bad in (tampered, blob[:-8], "not a blob at all", ""):
        status, data = await send(bad)
        error = error_of(status, data)
        assert (status, error["param"], error["type"]) == (
            400, "input[1].encrypted_content", "invalid_request_error"), error
        assert error["code"] in ("invalid_encrypted_content", "empty_string")
    # Another caller cannot replay it either (the blob is bound to its owner).
    status, data = await send(blob, {"Authorization": "Bearer sk-someone-else"})
    assert (status, error_of(status, data)["code"]) == (400, "invalid_encrypted_content")
    assert len(mock.requests) == before  # nothing went upstream
    status, data = await send(blob)
    assert status == 200, data


async def test_blob_from_another_deployment_is_400(start_proxy: StartProxy, settings: Settings,
                                                   mock: MockUpstream) -> None:
    mock.enqueue(summary_scenario())
    one = await start_proxy(dataclasses.replace(settings, compaction_key="k" * 32))
    window = (await compact(one, {"model": "mock", "input": CONVERSATION}))["output"]
    # Same database (so the same owner hashes), another key.
    other = await start_proxy(dataclasses.replace(settings, compaction_key="o" * 32))
    status, _, data = await other.post({"model": "mock", "input": window}, headers=CLIENT)
    error = error_of(status, data)
    assert (status, error["param"], error["code"]) == (
        400, "input[2].encrypted_content", "invalid_encrypted_content")
    # After a rotation ("new,old") the old blobs still open.
    rotated = await start_proxy(dataclasses.replace(
        settings, compaction_key=f"{'n' * 40}, {'k' * 32}"))
    status, _, data = await rotated.post({"model": "mock", "input": window}, headers=CLIENT)
    assert status == 200, data


async def test_missing_model_is_400(proxy: Proxy, mock: MockUpstream) -> None:
    status, _, data = await proxy.post({"input": "hello"}, path="/v1/responses/compact")
    error = error_of(status, data)
    assert (status, error["param"], error["code"]) == (400, "model",
                                                       "missing_required_parameter")
    with pytest.raises(openai.BadRequestError):
        await sdk(proxy).responses.compact(model="", input="x")
    assert not mock.requests


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "m"}, 400, "input", "missing_required_parameter"),
    ({"model": "m", "input": "x", "stream": True}, 400, "stream", "unknown_parameter"),
    ({"model": "m", "previous_response_id": "resp_missing"}, 400, "previous_response_id",
     "previous_response_not_found"),
])
async def test_bad_compact_requests(proxy: Proxy, mock: MockUpstream, body: dict[str, Any],
                                    status: int, param: str, code: str) -> None:
    got, _, data = await proxy.post(body, path="/v1/responses/compact")
    error = error_of(got, data)
    assert (got, error["param"], error["code"]) == (status, param, code)
    assert not mock.requests


async def test_upstream_failures(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(status=429, headers={"Retry-After": "2"}),
                 summary_scenario("   "),
                 Scenario(chunks=text_chunks(["par"], finish_reason=None), send_done=False))
    body = {"model": "mock", "input": "x"}
    status, headers, data = await proxy.post(body, path="/v1/responses/compact")
    assert (status, error_of(status, data)["code"]) == (429, "rate_limit_exceeded")
    assert headers["Retry-After"] == "2"
    status, _, data = await proxy.post(body, path="/v1/responses/compact")
    assert (status, error_of(status, data)["code"]) == (502, "empty_summary")
    status, _, data = await proxy.post(body, path="/v1/responses/compact")
    assert (status, error_of(status, data)["code"]) == (502, "upstream_incomplete")


# -- the cipher -----------------------------------------------------------------------------


async def test_cipher_keys(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "a.sqlite3"))
    other = await SQLiteStore.open(str(tmp_path / "b.sqlite3"))
    try:
        derived = CompactionCipher.create(None, store.owner_id)
        blob = derived.seal("owner-1", "the summary")
        assert derived.open("owner-1", blob) == "the summary"
        # Bound to its owner, and to the deployment (another database: another random key).
        with pytest.raises(SealedSummaryError):
            derived.open("owner-2", blob)
        with pytest.raises(SealedSummaryError):
            CompactionCipher.create(None, other.owner_id).open("owner-1", blob)
        # The same database gives every worker the same key.
        assert CompactionCipher.create(None, store.owner_id).open("owner-1", blob) == "the summary"
        # Keys too short to be secrets stop start-up, without echoing them.
        with pytest.raises(ConfigError) as caught:
            CompactionCipher.create("short-secret", store.owner_id)
        assert "short-secret" not in str(caught.value)
        with pytest.raises(ConfigError):
            CompactionCipher.create(" , ", store)
    finally:
        await store.close()
        await other.close()
