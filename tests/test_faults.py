"""Upstream faults ORP must turn into deliberate answers: retries before the first byte, a
well-formed failed stream (kept in the store) after it, and clean client disconnects.

Complements tests/test_e2e_http.py (status mapping, HTML pages, refused connections, stalls,
malformed chunks, resets, line caps), which runs without retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from orp_proxy.config import Settings
from orp_proxy.upstream.client import RetryPolicy, retry_after_seconds
from orp_proxy.upstream.mock import MockUpstream, Scenario, encode_sse, text_chunks
from tests.conftest import Proxy
from tests.sse_check import parse_sse
from tests.test_e2e_http import error_of, failed_stream

StartProxy = Callable[[Settings], Awaitable[Proxy]]


def with_retries(settings: Settings, retries: int = 2, backoff: float = 0.05,
                 max_wait: float = 5.0) -> Settings:
    return dataclasses.replace(settings, upstream_retries=retries, retry_backoff=backoff,
                               retry_max_wait=max_wait)


async def get_stored(proxy: Proxy, response_id: str) -> dict[str, Any]:
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{response_id}")) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


# -- connect timeout ----------------------------------------------------------------------


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A loopback port that never completes a connection.

    A listening socket with a backlog of 0 whose one queue slot is taken by a connection
    nobody accepts: Linux then drops every further SYN, so `connect()` hangs exactly as it does
    towards a host behind a filtering firewall. (Loopback only; no packet leaves the machine.)
    """
    server = socket.socket()
    filler = socket.socket()
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        filler.connect(("127.0.0.1", port))  # completes: it takes the only queue slot
        probe = socket.socket()
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the simulation works on this kernel
            probe.connect(("127.0.0.1", port))
        probe.close()
        yield port
    finally:
        filler.close()
        server.close()


async def test_connect_timeout_is_504(start_proxy: StartProxy, settings: Settings) -> None:
    with unaccepting_listener() as port:
        proxy = await start_proxy(dataclasses.replace(
            settings, upstream_url=f"http://127.0.0.1:{port}/v1", connect_timeout=0.3))
        started = time.monotonic()
        status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True})
        elapsed = time.monotonic() - started
    error = error_of(status, data)
    assert (status, error["code"]) == (504, "upstream_connect_timeout")
    assert 0.25 < elapsed < 3.0


async def test_connect_timeout_is_retried_within_the_budget(start_proxy: StartProxy,
                                                            settings: Settings) -> None:
    with unaccepting_listener() as port:
        proxy = await start_proxy(with_retries(dataclasses.replace(
            settings, upstream_url=f"http://127.0.0.1:{port}/v1", connect_timeout=0.2),
            retries=2, backoff=0.05))
        started = time.monotonic()
        status, _, data = await proxy.post({"model": "m", "input": "x"})
        elapsed = time.monotonic() - started
    assert (status, error_of(status, data)["code"]) == (504, "upstream_connect_timeout")
    assert elapsed >= 3 * 0.2  # three attempts, each running into the connect timeout


# -- retries before the first byte ----------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_503_with_retry_after_is_honoured_then_succeeds(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream, stream: bool) -> None:
    proxy = await start_proxy(with_retries(settings))
    mock.enqueue(Scenario(status=503, headers={"Retry-After": "1"}))
    started = time.monotonic()
    status, _, data = await proxy.post({"model": "m", "input": "hello", "stream": stream})
    elapsed = time.monotonic() - started
    assert status == 200, data
    assert len(mock.requests) == 2
    assert elapsed >= 1.0  # waited as long as the upstream asked
    if stream:
        events, done = parse_sse(data)  # one clean stream: the failed attempt left no trace
        assert done and events[-1]["type"] == "response.completed"
        assert sum(e["type"] == "response.created" for e in events) == 1
    else:
        assert json.loads(data)["status"] == "completed"


async def test_429_without_retry_after_uses_backoff(start_proxy: StartProxy, settings: Settings,
                                                    mock: MockUpstream) -> None:
    proxy = await start_proxy(with_retries(settings, retries=2, backoff=0.2))
    mock.enqueue(Scenario(status=429), Scenario(status=429))
    started = time.monotonic()
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    elapsed = time.monotonic() - started
    assert status == 200, data
    assert len(mock.requests) == 3
    # Equal jitter: at least half of 0.2 then half of 0.4 seconds.
    assert elapsed >= 0.1 + 0.2


async def test_retries_exhausted_give_the_mapped_error(start_proxy: StartProxy,
                                                       settings: Settings,
                                                       mock: MockUpstream) -> None:
    proxy = await start_proxy(with_retries(settings, retries=2))
    mock.enqueue(*[Scenario(status=503, headers={"Retry-After": "0"}) for _ in range(3)])
    status, headers, data = await proxy.post({"model": "m", "input": "x", "stream": True})
    error = error_of(status, data)
    assert (status, error["code"], error["type"]) == (502, "upstream_overloaded", "server_error")
    assert headers["Retry-After"] == "0"
    assert len(mock.requests) == 3


async def test_503_without_retries_passes_retry_after(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(Scenario(status=503, headers={"Retry-After": "30"}))
    status, headers, data = await proxy.post({"model": "m", "input": "x"})
    assert (status, error_of(status, data)["code"]) == (502, "upstream_overloaded")
    assert headers["Retry-After"] == "30"
    assert len(mock.requests) == 1


async def test_retry_after_beyond_the_cap_goes_to_the_client(start_proxy: StartProxy,
                                                             settings: Settings,
                                                             mock: MockUpstream) -> None:
    proxy = await start_proxy(with_retries(settings, retries=3, max_wait=2.0))
    mock.enqueue(Scenario(status=429, headers={"Retry-After": "120"}))
    started = time.monotonic()
    status, headers, data = await proxy.post({"model": "m", "input": "x"})
    assert time.monotonic() - started < 1.0  # no pointless wait
    assert (status, error_of(status, data)["code"]) == (429, "rate_limit_exceeded")
    assert headers["Retry-After"] == "120"
    assert len(mock.requests) == 1


@pytest.mark.parametrize("upstream_status", [500, 502, 504, 400])
async def test_errors_that_may_have_cost_tokens_are_not_retried(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream,
        upstream_status: int) -> None:
    proxy = await start_proxy(with_retries(settings, retries=3))
    mock.enqueue(Scenario(status=upstream_status))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert status >= 400 and error_of(status, data)
    assert len(mock.requests) == 1  # the default answer after it would have been a 200


async def test_read_timeout_before_the_first_byte_is_not_retried(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(with_retries(dataclasses.replace(settings, read_timeout=0.3),
                                           retries=3))
    mock.enqueue(Scenario(first_byte_delay=2.0))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True})
    assert (status, error_of(status, data)["code"]) == (504, "upstream_timeout")
    assert len(mock.requests) == 1


def reserved_port() -> socket.socket:
    """A bound, not listening, socket: connecting to its port is refused until it is closed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_connection_refused_is_retried_until_the_upstream_is_up(
        start_proxy: StartProxy, settings: Settings) -> None:
    placeholder = reserved_port()
    port = int(placeholder.getsockname()[1])
    proxy = await start_proxy(with_retries(dataclasses.replace(
        settings, upstream_url=f"http://127.0.0.1:{port}/v1"), retries=4, backoff=0.3))
    late = MockUpstream()
    runner = web.AppRunner(late.app())
    await runner.setup()

    async def come_up() -> None:
        await asyncio.sleep(0.05)  # after the first attempt, before the first retry (≥ 0.15 s)
        placeholder.close()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()

    try:
        starter = asyncio.create_task(come_up())
        status, _, data = await proxy.post({"model": "m", "input": "late"})
        await starter
        assert status == 200, data
        assert json.loads(data)["output"][0]["content"][0]["text"] == "You said: late"
        assert len(late.requests) == 1
    finally:
        await runner.cleanup()


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(retries=3, backoff=0.2, max_wait=1.0)
    for _ in range(200):
        assert 0.1 <= (policy.delay(0, None, 0.0) or 0) <= 0.2
        assert 0.2 <= (policy.delay(1, None, 0.0) or 0) <= 0.4
    assert policy.delay(3, None, 0.0) is None  # retries used up
    assert policy.delay(2, None, 0.7) is None  # 0.4-0.8 s would overrun the 1 s budget
    assert policy.delay(0, 2.0, 0.0) is None  # Retry-After beyond the budget
    assert 0.5 <= (policy.delay(0, 0.5, 0.0) or 0) <= 0.6  # Retry-After plus a little jitter
    assert RetryPolicy(retries=0).delay(0, None, 0.0) is None


def test_retry_after_parsing() -> None:
    now = time.time()
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("-3") == 0.0
    in_ten = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.5 <= (retry_after_seconds(in_ten, now=now) or 0) <= 10.5
    assert retry_after_seconds(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(bad) is None


# -- after the first byte: failed, and stored as failed --------------------------------------


STALL = Scenario(chunks=text_chunks(["a", "b", "c"]), stall_after=3)
BAD_UTF8 = Scenario(raw=encode_sse(text_chunks(["ab"], finish_reason=None), send_done=False)
                    + b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"}}]}\n\n')
BAD_JSON = Scenario(raw=encode_sse(text_chunks(["ab"], finish_reason=None), send_done=False)
                    + b"data: {not json\n\n")
NO_FINISH = Scenario(chunks=text_chunks(["a", "b"], finish_reason=None), send_done=False)
RESET = Scenario(chunks=text_chunks(["a", "b", "c", "d"]), reset_after=3)
ERROR_CHUNK = Scenario(raw=encode_sse(text_chunks(["ab"], finish_reason=None), send_done=False)
                       + b'data: {"error": {"message": "worker crashed"}}\n\n')


@pytest.mark.parametrize(("scenario", "code"), [
    (STALL, "upstream_timeout"),
    (BAD_UTF8, "upstream_invalid_utf8"),
    (BAD_JSON, "upstream_invalid_json"),
    (NO_FINISH, "upstream_incomplete"),
    (RESET, "upstream_connection_lost"),
    (ERROR_CHUNK, "upstream_error"),
], ids=["stall", "invalid-utf8", "invalid-json", "no-finish", "tcp-reset", "error-chunk"])
async def test_failure_after_the_first_byte_is_stored_as_failed(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream, scenario: Scenario,
        code: str) -> None:
    proxy = await start_proxy(with_retries(dataclasses.replace(settings, read_timeout=0.3),
                                           retries=3))
    mock.enqueue(scenario)
    events, got = await failed_stream(proxy)
    assert got == code
    assert len(mock.requests) == 1  # a stream that had started is never sent again
    sent = events[-1]["response"]
    stored = await get_stored(proxy, sent["id"])
    assert stored["status"] == "failed"
    assert stored["error"] == {"code": code, "message": events[-2]["error"]["message"]}
    assert stored["output"] == sent["output"]
    assert stored["output"][0]["content"][0]["text"] == "ab"  # what had arrived is kept


async def test_invalid_utf8_in_json_mode_is_502(proxy: Proxy, mock: MockUpstream) -> None:
    mock.enqueue(dataclasses.replace(BAD_UTF8))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert (status, error_of(status, data)["code"]) == (502, "upstream_invalid_utf8")


# -- client disconnects ------------------------------------------------------------------


def _idle_connection(task: asyncio.Task[Any]) -> bool:
    """A server's keep-alive connection waiting for its next request (e.g. the one ORP's
    upstream probe keeps to the mock): not work left behind by a request."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    handler = frame.f_locals.get("self") if frame is not None else None
    return isinstance(handler, RequestHandler) and not handler._request_in_progress


def _others(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t not in before and
            t is not asyncio.current_task() and not _idle_connection(t)}


async def poll(condition: Callable[[], object], seconds: float) -> None:
    """Return once `condition()` is true, or after `seconds` (the caller asserts)."""
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)


async def no_tasks_left(before: set[asyncio.Task[Any]]) -> None:
    """Every task that appeared since `before` (request handlers, the mock's, ORP's) ends."""
    await poll(lambda: not _others(before), 3.0)
    left = _others(before)
    assert not left, [t.get_name() + ": " + repr(t.get_coro()) for t in left]


@contextlib.asynccontextmanager
async def streaming_post(proxy: Proxy, body: dict[str, Any]
                         ) -> AsyncIterator[aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.server.make_url("/v1/responses"), json=body)
        try:
            yield resp
        finally:
            resp.close()


def stored_rows(settings: Settings) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(settings.db_path)) as db:
        return list(db.execute("SELECT id, status FROM responses"))


async def test_disconnect_while_waiting_for_the_first_byte(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(settings)
    mock.enqueue(Scenario(first_byte_delay=5.0))
    before = set(asyncio.all_tasks())
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(
            proxy.server.make_url("/v1/responses"),
            json={"model": "m", "input": "x", "stream": True}))
        await poll(lambda: mock.requests, 5.0)  # ORP now waits for the upstream's headers
        await asyncio.sleep(0.1)
        closed_at = asyncio.get_running_loop().time()
        task.cancel()  # drops the client's connection
        with contextlib.suppress(asyncio.CancelledError):
            await task
    seen = await mock.wait_for_disconnect(timeout=2.0)
    assert seen - closed_at < 0.1
    await no_tasks_left(before)
    # The client never received an id, so there is nothing it could retrieve: nothing stored.
    assert stored_rows(settings) == []


@pytest.mark.parametrize("after_token", [False, True], ids=["before-token", "after-token"])
async def test_disconnect_mid_stream_keeps_the_partial_response(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream,
        after_token: bool) -> None:
    proxy = await start_proxy(settings)
    # The role chunk arrives at once (ORP sends response.created), the tokens slowly.
    mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(100)]),
                          delay=0.5 if not after_token else 0.05))
    before = set(asyncio.all_tasks())
    async with streaming_post(proxy, {"model": "m", "input": "x", "stream": True}) as resp:
        assert resp.status == 200
        head = await resp.content.readuntil(b"response.in_progress")
        created = json.loads(head.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        response_id = created["response"]["id"]
        if after_token:
            await resp.content.readuntil(b'"delta":"t1 "')
        closed_at = asyncio.get_running_loop().time()
    seen = await mock.wait_for_disconnect(timeout=2.0)
    assert seen - closed_at < 0.1
    await no_tasks_left(before)
    stored = await get_stored(proxy, response_id)
    assert stored["status"] == "incomplete"
    assert stored["incomplete_details"] == {"reason": "client_disconnected"}
    if after_token:
        text = stored["output"][0]["content"][0]["text"]
        assert text.startswith("t0 t1 ") and len(text) < len("t0 ") * 100
        assert stored["output"][0]["status"] == "incomplete"
    else:
        assert stored["output"] == []


async def test_disconnect_in_json_mode(start_proxy: StartProxy, settings: Settings,
                                       mock: MockUpstream) -> None:
    proxy = await start_proxy(settings)
    mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(100)]), delay=0.05))
    before = set(asyncio.all_tasks())
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(proxy.server.make_url("/v1/responses"),
                                                json={"model": "m", "input": "x"}))
        await poll(lambda: mock.requests, 5.0)
        await asyncio.sleep(0.3)  # a few tokens in
        closed_at = asyncio.get_running_loop().time()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    seen = await mock.wait_for_disconnect(timeout=2.0)
    assert seen - closed_at < 0.1
    await no_tasks_left(before)
    [(response_id, status)] = stored_rows(settings)
    assert status == "incomplete"
    stored = await get_stored(proxy, response_id)
    assert stored["output"][0]["content"][0]["text"].startswith("t0 ")
