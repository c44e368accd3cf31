"""Shared fixtures: a scripted mock upstream and a real ORP server, both on 127.0.0.1, and the
response store's backends (SQLite, and a real PostgreSQL server from `tests/pg.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from orp_proxy.app import build_app
from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream
from tests import pg
from tests.sse_check import parse_sse

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def mock() -> MockUpstream:
    return MockUpstream()


@pytest.fixture
async def mock_url(mock: MockUpstream, aiohttp_server: ServerFactory) -> str:
    server = await aiohttp_server(mock.app(), host="127.0.0.1")
    return str(server.make_url("/v1"))


@pytest.fixture
def settings(tmp_path: Path, mock_url: str) -> Settings:
    # Open (auth_mode none) and without retries, so that each test sees exactly the upstream
    # answers it queued; tests of authentication and retries turn them on.
    return Settings(upstream_url=mock_url, db_path=str(tmp_path / "orp.sqlite3"),
                    read_timeout=5.0, connect_timeout=2.0, auth_mode="none", upstream_retries=0)


@dataclasses.dataclass
class Proxy:
    """A running ORP and a raw HTTP client for it."""

    server: TestServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    async def post(self, body: Any, *, headers: dict[str, str] | None = None,
                   path: str = "/v1/responses") -> tuple[int, CIMultiDict[str], bytes]:
        async with self.session.post(self.server.make_url(path), json=body,
                                     headers=headers) as resp:
            return resp.status, resp.headers.copy(), await resp.read()

    async def stream(self, body: dict[str, Any], **kwargs: Any
                     ) -> tuple[list[dict[str, Any]], bool]:
        status, headers, data = await self.post({**body, "stream": True}, **kwargs)
        assert status == 200, data
        assert headers["Content-Type"].startswith("text/event-stream")
        return parse_sse(data)


@pytest.fixture
async def start_proxy(aiohttp_server: ServerFactory
                      ) -> AsyncIterator[Callable[[Settings], Awaitable[Proxy]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(settings: Settings) -> Proxy:
        app: web.Application = build_app(settings)
        # TestServer runs with handler_cancellation=True, as our gunicorn worker and serve do.
        server = await aiohttp_server(app, host="127.0.0.1")
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Proxy(server, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def proxy(start_proxy: Callable[[Settings], Awaitable[Proxy]], settings: Settings
                ) -> Proxy:
    return await start_proxy(settings)


# -- store backends ------------------------------------------------------------------------

STORE_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.Cluster]:
    """One PostgreSQL server for the session (skipped, or failed under CI, without one)."""
    with pg.running_cluster(pg.require_postgres()) as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: pg.Cluster) -> Iterator[str]:
    """A fresh database of its own on the session's server, dropped after the test."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`ORP_STORE_URL` of an empty store, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orp.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url
