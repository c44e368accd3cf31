"""Resource limits against hostile or greedy clients: the body-read deadline (408), the worker's
admission caps on request bytes and running responses (503 with Retry-After), and the bound on
what one WebSocket connection may queue."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from orp_proxy.config import Settings
from orp_proxy.http import websocket as ws_module
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks
from tests.conftest import Proxy

StartProxy = Callable[[Settings], Awaitable[Proxy]]


async def _raw_post(proxy: Proxy, body: bytes, declared: int | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST /v1/responses on a raw connection: headers (Content-Length `declared`, default
    the body's length) and `body`, which may be only the start of what was declared."""
    host, port = proxy.server.host, proxy.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    length = len(body) if declared is None else declared
    writer.write(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % length + body)
    await writer.drain()
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, json.loads(body)


@contextlib.asynccontextmanager
async def _trickling(proxy: Proxy, declared: int) -> AsyncIterator[asyncio.StreamReader]:
    """A client that sends the headers of a `declared`-byte body, then one byte every 0.1 s."""
    reader, writer = await _raw_post(proxy, b"{", declared)

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(declared - 1):
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()

    task = asyncio.create_task(trickle())
    try:
        yield reader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()


async def test_a_body_that_trickles_in_gets_408(start_proxy: StartProxy,
                                               settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, body_read_timeout=0.5))
    async with _trickling(proxy, 1000) as reader:
        status, headers, body = await _read_response(reader)
    assert status == 408 and headers["connection"].lower() == "close"
    assert body["error"]["code"] == "request_timeout"
    assert set(body["error"]) == {"type", "code", "message", "param"}
    # An ordinary request is not affected.
    status, _, _ = await proxy.post({"model": "m", "input": "hi"})
    assert status == 200


async def test_request_bytes_in_flight_are_capped(start_proxy: StartProxy,
                                                  settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_inflight_bytes=10_000))
    async with _trickling(proxy, 8_000):  # 8000 bytes announced and reserved, still arriving
        await asyncio.sleep(0.2)  # let the proxy read its headers
        status, headers, data = await proxy.post({"model": "m", "input": "x" * 3_000})
        assert status == 503 and headers["Retry-After"] == "1"
        error = json.loads(data)["error"]
        assert (error["type"], error["code"]) == ("server_error", "server_overloaded")
        status, _, _ = await proxy.post({"model": "m", "input": "small"})
        assert status == 200  # fits beside the one in flight
    for _ in range(100):  # the trickling request's bytes are given back once it ends
        status, _, _ = await proxy.post({"model": "m", "input": "x" * 3_000})
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


async def test_running_responses_are_capped_for_http_and_websocket(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_concurrent_responses=1))
    mock.enqueue(Scenario(chunks=text_chunks(["held ", "open"]), stall_after=1))
    url = proxy.server.make_url("/v1/responses")
    async with proxy.session.post(url, json={"model": "m", "input": "a", "stream": True}) as held:
        assert held.status == 200
        await held.content.readline()  # the stream is running
        status, headers, data = await proxy.post({"model": "m", "input": "b"})
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(data)["error"]["code"] == "server_overloaded"
        async with proxy.session.ws_connect(url) as ws:
            await ws.send_json({"type": "response.create", "model": "m", "input": "c"})
            envelope = json.loads((await ws.receive(timeout=10)).data)
            assert envelope["type"] == "error" and envelope["status"] == 503
            assert envelope["error"]["code"] == "server_overloaded"
    for _ in range(100):  # the slot is free again once the held stream is gone
        status, _, _ = await proxy.post({"model": "m", "input": "d"})
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


async def test_a_websocket_connection_queues_a_bounded_number_of_bytes(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 10_000
    proxy = await start_proxy(dataclasses.replace(settings, ws_max_queued_bytes=cap))
    queued: list[int] = []
    real_init = ws_module._Connection.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        real_put = self.queue.put

        async def put(item: Any) -> None:
            await real_put(item)
            queued.append(self.queued_bytes)

        self.queue.put = put

    monkeypatch.setattr(ws_module._Connection, "__init__", recording_init)
    mock.enqueue(Scenario(chunks=text_chunks(["slow ", "first ", "turn"]), delay=0.3))
    message = {"type": "response.create", "model": "m", "input": "x" * 6_000}
    async with proxy.session.ws_connect(proxy.server.make_url("/v1/responses")) as ws:
        for _ in range(5):  # the first runs; without the bound, 4 would queue (24 kB)
            await ws.send_json(message)
        done = 0
        while done < 5:
            payload = json.loads((await ws.receive(timeout=20)).data)
            done += payload["type"] in ("response.completed", "response.failed", "error")
    assert len(queued) == 5
    assert max(queued) <= cap, queued
