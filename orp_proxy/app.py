"""The application factory: `orp_proxy.app:create_app` (gunicorn) and `orp-proxy serve`.

Per-worker resources live in `cleanup_ctx`: one `ClientSession` for all upstream streaming, one
SQLite connection, the periodic purge of expired responses, and (with no upstream configured)
the bundled mock upstream on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .config import Settings, load_settings
from .handlers import error_middleware, setup_routes
from .state import GATEWAY, Gateway
from .store import SQLiteStore
from .upstream import UpstreamClient

log = logging.getLogger("orp.app")

SETTINGS = web.AppKey("settings", Settings)


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    mock_runner: web.AppRunner | None = None
    base_url = settings.upstream_url
    if base_url is None:
        from .mock_upstream import start_mock_upstream

        _, mock_runner, base_url = await start_mock_upstream("127.0.0.1", 0)
        log.warning("ORP_UPSTREAM_URL is not set: answering from the bundled mock upstream "
                    "at %s", base_url)
    session = aiohttp.ClientSession(
        # No total timeout: a stream may rightly last longer than any fixed bound.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                      sock_read=settings.read_timeout),
        connector=aiohttp.TCPConnector(limit=settings.pool_limit, keepalive_timeout=60),
        auto_decompress=True,
    )
    store = await SQLiteStore.open(settings.db_path,
                                     owner_secret=settings.resolved_owner_secret())
    try:
        upstream = UpstreamClient(session, base_url, settings.resolved_upstream_key(),
                                  max_line_bytes=settings.max_line_bytes)
        app[GATEWAY] = Gateway(settings=settings, upstream=upstream, store=store)
        yield
    finally:
        await session.close()
        await store.close()
        if mock_runner is not None:
            await mock_runner.cleanup()


async def _purge_loop(gateway: Gateway) -> None:
    while True:
        await asyncio.sleep(gateway.settings.purge_interval)
        try:
            purged = await gateway.store.purge_expired()
        except Exception:
            log.exception("purging expired responses failed")
            continue
        if purged:
            log.info("purged %d expired responses", purged)


async def _purge_ctx(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    task = None
    if gateway.settings.store_ttl_seconds > 0:
        task = asyncio.create_task(_purge_loop(gateway), name="orp-purge")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_app(settings: Settings) -> web.Application:
    """The application for explicit settings (tests, the CLI)."""
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[error_middleware])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_gateway_ctx)
    app.cleanup_ctx.append(_purge_ctx)
    setup_routes(app)
    return app


async def create_app() -> web.Application:
    """gunicorn entry point: settings from the environment."""
    return build_app(load_settings())
