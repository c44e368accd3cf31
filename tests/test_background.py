"""Background responses in one process (real ORP app, real mock upstream, real clients):
queued answers, the kept event log, resuming streams, cancel, orphaned runs, retention, limits;
each on SQLite and on PostgreSQL.

The cross-process cases (another worker resumes or cancels, SIGKILL of the running worker) are
in `test_gunicorn_background.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest

from orp_proxy.background import BACKGROUND
from orp_proxy.config import Settings
from orp_proxy.store import StoredResponse
from orp_proxy.store.base import StoredEvent
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, usage_dict
from tests.conftest import Proxy
from tests.sse_check import parse_sse

StartProxy = Callable[[Settings], Awaitable[Proxy]]

WORDS = [f"w{i} " for i in range(40)]
AUTH = {"Authorization": "Bearer sk-client"}  # the SDK's credential: the same owner
BG = {"model": "mock", "input": "x", "background": True}


@pytest.fixture
def settings(settings: Settings, store_url: str) -> Settings:
    """Every test here on both stores (`store_url` is parametrized: SQLite, PostgreSQL)."""
    return dataclasses.replace(settings, store_url=store_url)


@pytest.fixture
async def start_proxy(start_proxy: StartProxy, store_url: str
                      ) -> AsyncIterator[StartProxy]:
    """The servers are closed before the store's database is dropped (runs still writing
    their last events would otherwise wait for a database that is gone)."""
    servers = []

    async def start(settings: Settings) -> Proxy:
        proxy = await start_proxy(settings)
        servers.append(proxy.server)
        return proxy

    yield start
    for server in servers:
        await server.close()


def paced(words: list[str] = WORDS, delay: float = 0.03) -> Scenario:
    """An upstream answer of `words`, one event per `delay` seconds."""
    return Scenario(chunks=text_chunks(words, usage=usage_dict(3, len(words))), delay=delay)


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-client", max_retries=0)


async def _wait_status(proxy: Proxy, response_id: str, statuses: set[str],
                       timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{response_id}"),
                                     headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


async def _get_stream(proxy: Proxy, response_id: str, query: str = "stream=true"
                      ) -> tuple[int, bytes]:
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{response_id}?{query}"),
                                 headers=AUTH) as resp:
        return resp.status, await resp.read()


def _events(raw: bytes) -> list[dict[str, Any]]:
    """Events of a stream that may start after 0 (not checked from the start, unlike
    `parse_sse`)."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    return [json.loads(block.split("\ndata: ", 1)[1]) for block in text.split("\n\n")
            if block.startswith("event: ")]


async def test_json_answer_is_queued_then_completes(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS[:5]))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="hi", background=True)
    assert created.status == "queued" and created.background is True
    assert created.output == []
    while True:
        got = await client.responses.retrieve(created.id)
        if got.status not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.02)
    assert got.status == "completed" and got.background is True
    assert got.output_text == "".join(WORDS[:5])
    # Continuable like any stored response.
    follow = await client.responses.create(model="mock", input="more",
                                           previous_response_id=created.id)
    assert follow.status == "completed"
    assert mock.requests[-1].body["messages"][1]["content"] == "".join(WORDS[:5])


async def test_background_needs_store(proxy: Proxy) -> None:
    status, _, raw = await proxy.post({"model": "mock", "input": "x", "background": True,
                                       "store": False}, headers=AUTH)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "background"


async def test_stream_from_create_is_the_whole_lifecycle(proxy: Proxy, mock: MockUpstream
                                                         ) -> None:
    mock.enqueue(paced(WORDS[:6], 0.01))
    events, done = await proxy.stream(BG, headers=AUTH)
    assert done
    types = [e["type"] for e in events]
    assert types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0]["response"]["status"] == "queued"
    assert events[2]["response"]["status"] == "in_progress"
    assert types[-1] == "response.completed"
    assert all(e["response"]["background"] for e in events if "response" in e)
    # Replayed from the log (no starting_after: from 0): the same events.
    status, raw = await _get_stream(proxy, events[0]["response"]["id"])
    assert status == 200
    replayed, _ = parse_sse(raw)
    assert replayed == events


async def test_resume_mid_run_has_no_gap_and_no_duplicate(proxy: Proxy, mock: MockUpstream
                                                          ) -> None:
    mock.enqueue(paced(WORDS, 0.03))
    resp = await proxy.session.post(proxy.server.make_url("/v1/responses"), headers=AUTH,
                                    json={"model": "mock", "input": "x", "background": True,
                                          "stream": True})
    seen: list[dict[str, Any]] = []
    while len(seen) < 10:
        line = (await resp.content.readline()).decode()
        if line.startswith("data: {"):
            seen.append(json.loads(line[6:]))
    resp.close()  # the client goes away; the run goes on
    response_id = seen[0]["response"]["id"]
    last = seen[-1]["sequence_number"]
    status, raw = await _get_stream(proxy, response_id, f"stream=true&starting_after={last}")
    assert status == 200
    rest = _events(raw)
    assert [e["sequence_number"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    whole, _ = parse_sse(b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
        for e in seen + rest) + b"data: [DONE]\n\n")
    assert whole[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in whole if e["type"] == "response.output_text.delta")
    assert text == "".join(WORDS)


async def test_openai_sdk_stream_resume(proxy: Proxy, mock: MockUpstream) -> None:
    """`create(background, stream)`, 10 events, drop; `retrieve(stream, starting_after)`."""
    mock.enqueue(paced(WORDS, 0.02))
    client = sdk(proxy)
    stream = await client.responses.create(model="mock", input="x", background=True,
                                           stream=True)
    first = []
    async for event in stream:
        first.append(event)
        if len(first) == 10:
            break
    await stream.close()
    cursor = first[-1].sequence_number
    resumed = await client.responses.retrieve(first[0].response.id, stream=True,
                                              starting_after=cursor)
    rest = [event async for event in resumed]
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.output_text == "".join(WORDS)
    # The SDK's stream helper resumes from a response id too (it reads from 0 and skips).
    async with client.responses.stream(response_id=first[0].response.id,
                                       starting_after=cursor) as helper:
        helped = [event async for event in helper]
        final = await helper.get_final_response()
    assert helped[0].sequence_number == cursor + 1
    assert final.output_text == "".join(WORDS)


async def test_json_while_running_shows_status_and_output_so_far(proxy: Proxy,
                                                                 mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS, 0.05))
    _, _, raw = await proxy.post(BG, headers=AUTH)
    response_id = json.loads(raw)["id"]
    body = await _wait_status(proxy, response_id, {"in_progress"})
    deadline = time.monotonic() + 10
    while not body["output"] or not body["output"][0]["content"][0]["text"]:
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
        body = await _wait_status(proxy, response_id, {"in_progress", "completed"})
    if body["status"] == "in_progress":
        partial = body["output"][0]["content"][0]["text"]
        assert "".join(WORDS).startswith(partial)
        assert body["output"][0]["status"] == "in_progress"
    done = await _wait_status(proxy, response_id, {"completed"})
    assert done["output"][0]["content"][0]["text"] == "".join(WORDS)


async def test_cancel_mid_run(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS, 0.05))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="x", background=True)
    await _wait_status(proxy, created.id, {"in_progress"})
    await asyncio.sleep(0.2)  # some output first
    asked = time.monotonic()
    cancelled = await client.responses.cancel(created.id)
    answered = time.monotonic()
    assert cancelled.status == "cancelled"
    partial = cancelled.output[0].content[0].text  # type: ignore[union-attr]
    assert partial and "".join(WORDS).startswith(partial) and partial != "".join(WORDS)
    # The upstream connection was closed before the cancel answered.
    closed = await mock.wait_for_disconnect(-1, timeout=5)
    assert asked <= closed <= answered
    print(f"\nupstream closed {1000 * (closed - asked):.1f} ms after the cancel request")
    # Cancelling again returns it unchanged; so does GET; the stream ends with the terminal.
    again = await client.responses.cancel(created.id)
    assert again.model_dump() == cancelled.model_dump()
    _, raw = await _get_stream(proxy, created.id)
    events, _ = parse_sse(raw)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == partial


async def test_cancel_finished_returns_it_unchanged(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS[:3], 0.0))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="x", background=True)
    done = await _wait_status(proxy, created.id, {"completed"})
    status, _, raw = await proxy.post({}, headers=AUTH,
                                      path=f"/v1/responses/{created.id}/cancel")
    assert status == 200 and json.loads(raw) == done


async def test_cancel_refusals(proxy: Proxy, mock: MockUpstream) -> None:
    client = sdk(proxy)
    plain = await client.responses.create(model="mock", input="x")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(plain.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_unknown")
    # Not someone else's: another credential sees nothing.
    mock.enqueue(paced(WORDS, 0.05))
    created = await client.responses.create(model="mock", input="x", background=True)
    other = openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-other", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await other.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(created.id, stream=True)
    await client.responses.cancel(created.id)


async def test_stream_query_is_validated(proxy: Proxy) -> None:
    client = sdk(proxy)
    plain = await client.responses.create(model="mock", input="x")
    for query, param in (("stream=true", "stream"), ("stream=maybe", "stream"),
                         ("stream=true&starting_after=x", "starting_after"),
                         ("stream=true&starting_after=-1", "starting_after"),
                         # Past any stored sequence number (the stores' 32-bit column).
                         ("stream=true&starting_after=2147483648", "starting_after"),
                         ("stream=true&starting_after=99999999999999999999999",
                          "starting_after"),
                         ("starting_after=3", "starting_after")):
        status, raw = await _get_stream(proxy, plain.id, query)
        assert status == 400, (query, raw)
        assert json.loads(raw)["error"]["param"] == param, query
    status, _ = await _get_stream(proxy, "resp_nothing")
    assert status == 404


async def test_upstream_error_fails_the_response(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(status=400))
    events, _ = await proxy.stream(BG, headers=AUTH)
    assert [e["type"] for e in events] == ["response.created", "response.queued", "error",
                                           "response.failed"]
    stored = await _wait_status(proxy, events[0]["response"]["id"], {"failed"})
    assert stored["error"]["code"] == events[-1]["response"]["error"]["code"]


async def test_events_dropped_after_retention(start_proxy: StartProxy, settings: Settings,
                                              mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, background_event_retention=0))
    mock.enqueue(paced(WORDS[:4], 0.0))
    events, _ = await proxy.stream(BG, headers=AUTH)
    response_id = events[0]["response"]["id"]
    runs = proxy.server.app[BACKGROUND]
    owner = runs.gateway.store.owner_id("sk-client")
    for _ in range(500):  # the final flush follows the terminal event by one write
        run = await runs.store.get_run(owner, response_id)
        if run is not None and run.finished:
            break
        await asyncio.sleep(0.01)
    assert await runs.store.purge_events(time.time() + 1) == 1
    assert await runs.store.read_events(response_id, -1) == []
    # The response stays; a resume gets the terminal event rebuilt from it.
    status, raw = await _get_stream(proxy, response_id, "stream=true&starting_after=2")
    assert status == 200
    rest = _events(raw)
    assert [e["type"] for e in rest] == ["response.completed"]
    assert rest[0]["sequence_number"] == events[-1]["sequence_number"]
    assert rest[0]["response"]["output"] == events[-1]["response"]["output"]
    _, raw = await _get_stream(
        proxy, response_id, f"stream=true&starting_after={events[-1]['sequence_number']}")
    assert _events(raw) == []


async def test_orphaned_run_fails_when_its_lease_runs_out(start_proxy: StartProxy,
                                                          settings: Settings) -> None:
    """A run whose worker is gone (its lease expired): ended `failed` (`worker_lost`), with
    the output saved so far and the terminal events in the log."""
    proxy = await start_proxy(dataclasses.replace(settings, background_lease_seconds=0.3))
    runs = proxy.server.app[BACKGROUND]
    owner = runs.gateway.store.owner_id("sk-client")
    response = {"id": "resp_orphan", "object": "response", "created_at": 1, "status":
                "in_progress", "background": True, "previous_response_id": None,
                "error": None, "output": [{"id": "msg_1", "type": "message", "role":
                                           "assistant", "status": "in_progress",
                                           "content": [{"type": "output_text", "text": "so",
                                                        "annotations": [], "logprobs": []}]}]}
    await runs.store.start_run(
        StoredResponse(id="resp_orphan", owner=owner, previous_response_id=None, created_at=1,
                       status="in_progress", response=response, input_items=[]),
        [StoredEvent(0, json.dumps({"type": "response.created", "sequence_number": 0,
                                    "response": response}))],
        worker="elsewhere:1:dead", lease_until=time.time() - 1)
    body = await _wait_status(proxy, "resp_orphan", {"failed"})
    assert body["error"]["code"] == "worker_lost"
    assert body["output"][0]["content"][0]["text"] == "so"
    assert body["output"][0]["status"] == "incomplete"
    _, raw = await _get_stream(proxy, "resp_orphan")
    assert [e["type"] for e in _events(raw)] == ["response.created", "error", "response.failed"]


async def test_limits_answer_429(start_proxy: StartProxy, settings: Settings,
                                 mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, background_max_runs=1))
    mock.enqueue(paced(WORDS, 0.05))
    first = await proxy.post(BG, headers=AUTH)
    assert first[0] == 200
    status, headers, raw = await proxy.post({"model": "mock", "input": "x",
                                             "background": True}, headers=AUTH)
    assert status == 429 and headers["Retry-After"]
    assert json.loads(raw)["error"]["code"] == "too_many_background_responses"
    await sdk(proxy).responses.cancel(json.loads(first[2])["id"])

    owner_limited = await start_proxy(dataclasses.replace(settings,
                                                          background_max_per_owner=1))
    mock.enqueue(paced(WORDS, 0.05))
    first = await owner_limited.post(BG, headers=AUTH)
    assert first[0] == 200
    status, _, raw = await owner_limited.post({"model": "mock", "input": "x",
                                               "background": True}, headers=AUTH)
    assert status == 429, raw
    await sdk(owner_limited).responses.cancel(json.loads(first[2])["id"])


@pytest.mark.parametrize("limit", ["background_max_runs", "background_max_per_owner"])
async def test_limits_hold_for_requests_arriving_together(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream, limit: str) -> None:
    """Eight requests at once against a limit of one: one runs, seven are 429 (the checks
    count requests still being admitted, not only saved runs)."""
    proxy = await start_proxy(dataclasses.replace(settings, **{limit: 1}))
    for _ in range(8):
        mock.enqueue(paced(WORDS, 0.05))
    answers = await asyncio.gather(*(proxy.post(BG, headers=AUTH) for _ in range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] + [429] * 7, statuses
    for status, _, raw in answers:
        if status == 200:
            await sdk(proxy).responses.cancel(json.loads(raw)["id"])


async def test_continuing_from_a_running_response_is_refused(proxy: Proxy,
                                                            mock: MockUpstream) -> None:
    """Its answer is not there yet: a 400 naming previous_response_id, not a context without
    it; once it has finished, the continuation works."""
    mock.enqueue(paced(WORDS, 0.05))
    status, _, raw = await proxy.post(BG, headers=AUTH)
    assert status == 200, raw
    running = json.loads(raw)["id"]
    status, _, raw = await proxy.post({"model": "mock", "input": "next",
                                       "previous_response_id": running}, headers=AUTH)
    error = json.loads(raw)["error"]
    assert (status, error["param"], error["code"]) == (
        400, "previous_response_id", "previous_response_in_progress"), raw
    await _wait_status(proxy, running, {"completed"})
    status, _, raw = await proxy.post({"model": "mock", "input": "next",
                                       "previous_response_id": running}, headers=AUTH)
    assert status == 200, raw


async def test_background_prewarm_is_refused(proxy: Proxy, mock: MockUpstream) -> None:
    """A warm-up asks for no generation; a background run would generate (and spend)."""
    status, _, raw = await proxy.post({**BG, "prompt_cache_options": {"prewarm": True}},
                                      headers=AUTH)
    assert (status, json.loads(raw)["error"]["param"]) == (400, "background"), raw
    assert mock.requests == []


async def test_metrics_count_background_responses(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS[:2], 0.0))
    events, _ = await proxy.stream(BG, headers=AUTH)
    await _wait_status(proxy, events[0]["response"]["id"], {"completed"})
    async with proxy.session.get(proxy.server.make_url("/metrics")) as resp:
        text = await resp.text()
    assert 'orp_background_finished_total{status="completed"}' in text
    assert "orp_background_responses{" in text


async def test_delete_while_running_stops_the_run(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(paced(WORDS, 0.05))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="x", background=True)
    await _wait_status(proxy, created.id, {"in_progress"})
    await client.responses.delete(created.id)
    await mock.wait_for_disconnect(-1, timeout=5)
    await asyncio.sleep(0.2)  # a run that went on would write the response back by now
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    assert proxy.server.app[BACKGROUND].runs == {}


async def test_a_run_taken_over_elsewhere_stops_here(proxy: Proxy, mock: MockUpstream) -> None:
    """This worker stalled past its lease and another worker took the run over: the next
    write is refused, and the run stops here instead of contradicting the log."""
    mock.enqueue(paced(WORDS, 0.05))
    client = sdk(proxy)
    created = await client.responses.create(model="mock", input="x", background=True)
    await _wait_status(proxy, created.id, {"in_progress"})
    runs = proxy.server.app[BACKGROUND]
    taken = await runs.store.claim_expired_runs("elsewhere:2:alive", time.time() + 3600,
                                                time.time() + 3600)
    assert [info.response_id for info in taken] == [created.id]
    await mock.wait_for_disconnect(-1, timeout=5)
    for _ in range(100):
        if not runs.runs:
            break
        await asyncio.sleep(0.02)
    assert runs.runs == {}
    owner = runs.gateway.store.owner_id("sk-client")
    run = await runs.store.get_run(owner, created.id)
    assert run is not None and run.worker == "elsewhere:2:alive" and not run.finished
