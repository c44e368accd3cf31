"""The application's per-worker resources (orp_proxy.app, orp_proxy.ops.health): a start-up that
fails half-way closes what it opened, and the upstream probe uses the client's own URL and key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orp_proxy.app import build_app
from orp_proxy.config import ConfigError, Settings
from orp_proxy.upstream import mock as mock_upstream
from orp_proxy.upstream.mock import text_chunks
from tests.conftest import Proxy

StartProxy = Callable[[Settings], Awaitable[Proxy]]
ServerFactory = Callable[..., Awaitable[TestServer]]


# Also no traceback from aiosqlite's thread reporting to a loop that is already closed.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("bundled_mock", [False, True])
async def test_a_failed_start_closes_what_it_opened(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bundled_mock: bool) -> None:
    sessions: list[aiohttp.ClientSession] = []
    runners: list[web.AppRunner] = []

    real_session = aiohttp.ClientSession

    def recorded(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real_session(*args, **kwargs)
        sessions.append(session)
        return session

    real_start = mock_upstream.start_mock_upstream

    async def start_mock(*args: Any, **kwargs: Any) -> Any:
        started = await real_start(*args, **kwargs)
        runners.append(started[1])
        return started

    monkeypatch.setattr(aiohttp, "ClientSession", recorded)
    monkeypatch.setattr(mock_upstream, "start_mock_upstream", start_mock)
    broken = dataclasses.replace(
        settings, db_path=str(tmp_path / "no-such-directory" / "orp.sqlite3"),
        upstream_url=None if bundled_mock else settings.upstream_url, mock_upstream=bundled_mock)
    server = TestServer(build_app(broken), host="127.0.0.1")
    with pytest.raises(ConfigError, match="no-such-directory does not exist"):
        await server.start_server()
    await server.close()
    assert len(sessions) == 1 and sessions[0].closed
    assert len(runners) == (1 if bundled_mock else 0)
    assert all(runner.server is None for runner in runners)  # cleaned up: port closed


@dataclasses.dataclass
class Recording:
    """An upstream that records the path, query and credential of every request."""

    seen: list[tuple[str, str, str | None]] = dataclasses.field(default_factory=list)
    probed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.query_string,
                          request.headers.get("Authorization")))
        if request.method == "GET":
            self.probed.set()
            return web.json_response({"object": "list", "data": []})
        await request.read()
        body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                        for c in text_chunks(["ok"])) + b"data: [DONE]\n\n"
        return web.Response(body=body, content_type="text/event-stream")


async def test_the_probe_uses_the_upstream_clients_url_and_key(
        aiohttp_server: ServerFactory, start_proxy: StartProxy, settings: Settings,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = Recording()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recording.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    key_file = tmp_path / "key"
    key_file.write_text("sk-upstream-from-file\n")
    reads: list[int] = []
    real_resolve = Settings.resolved_upstream_key

    def counting(self: Settings) -> str | None:
        reads.append(1)
        return real_resolve(self)

    monkeypatch.setattr(Settings, "resolved_upstream_key", counting)
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=str(server.make_url("/v1/")) + "?api-version=7",
        upstream_api_key_file=str(key_file), upstream_probe_interval=0.05))
    status, _, data = await proxy.post({"model": "m", "input": "x"})
    assert status == 200, data
    async with asyncio.timeout(5):
        await recording.probed.wait()
    auth = "Bearer sk-upstream-from-file"
    assert ("/v1/chat/completions", "api-version=7", auth) in recording.seen
    assert ("/v1/models", "api-version=7", auth) in recording.seen
    assert len(reads) == 1  # the key file is read once per start, by the gateway
