"""The application factory: `orp_proxy.app:create_app` (gunicorn) and `orp-proxy serve`.

Per-worker resources live in `cleanup_ctx`: one `ClientSession` for all upstream streaming, the
store (one SQLite connection, or a small PostgreSQL pool), the periodic purge of expired
responses, and (with no upstream configured) the bundled mock upstream on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from orp_proxy.background import background_ctx
from orp_proxy.background import on_shutdown as background_on_shutdown
from orp_proxy.config import Settings, load_settings, upstream_key
from orp_proxy.http.middleware import error_middleware
from orp_proxy.http.routes import setup_routes
from orp_proxy.ops.access import access_middleware, setup_access_log
from orp_proxy.ops.admission import setup_admission
from orp_proxy.ops.auth import setup_auth
from orp_proxy.ops.health import setup_health
from orp_proxy.ops.keepalive import streams_ctx
from orp_proxy.ops.metrics import TimedStore, setup_metrics
from orp_proxy.protocol.validation import RequestLimits
from orp_proxy.routing import Router, Routes, SingleUpstream
from orp_proxy.state import GATEWAY, Gateway
from orp_proxy.store.factory import open_store
from orp_proxy.upstream.client import RetryPolicy, UpstreamClient
from orp_proxy.upstream.scrub import Scrubber

log = logging.getLogger("orp.app")

SETTINGS = web.AppKey("settings", Settings)


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Whatever was opened is closed again, also when a later step of the start-up fails.
    async with contextlib.AsyncExitStack() as opened:
        base_url = settings.upstream_url
        if not settings.routed and (settings.mock_upstream or base_url is None):
            from orp_proxy.upstream.mock import start_mock_upstream

            _, mock_runner, base_url = await start_mock_upstream("127.0.0.1", 0)
            opened.push_async_callback(mock_runner.cleanup)
            log.warning("ORP_MOCK_UPSTREAM: answering from the bundled echo mock upstream at %s "
                        "(a demo, not a backend)", base_url)
        session = aiohttp.ClientSession(
            # No total timeout: a stream may rightly last longer than any fixed bound.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                          sock_read=settings.read_timeout),
            connector=aiohttp.TCPConnector(limit=settings.pool_limit, keepalive_timeout=60),
            auto_decompress=True,
            # The session serves every client: a cookie one upstream answer set must not ride
            # along with another client's request (and matching cookies costs per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        opened.push_async_callback(session.close)
        router: Routes
        if settings.routed:
            router = _router(settings, session)
            upstream = next(iter(router.upstreams.values())).client
        else:
            assert base_url is not None
            key = settings.resolved_upstream_key()
            upstream = UpstreamClient(
                session, base_url, key, max_line_bytes=settings.max_line_bytes,
                retry=RetryPolicy(settings.upstream_retries, settings.retry_backoff,
                                  settings.retry_max_wait),
                scrub=None if settings.expose_upstream_errors else Scrubber(
                    [urlsplit(base_url).hostname or "", key or ""]),
                connect_timeout=settings.connect_timeout)
            router = SingleUpstream(upstream, settings.quirks, settings.upstream_model)
        opened.push_async_callback(router.close)  # before the session closes
        store = await open_store(settings)
        opened.push_async_callback(store.close)
        limits = RequestLimits(max_input_items=settings.max_input_items,
                               max_tools=settings.max_tools)
        app[GATEWAY] = Gateway(settings=settings, upstream=upstream, store=TimedStore(store),
                               router=router, limits=limits)
        yield


def _router(settings: Settings, session: aiohttp.ClientSession) -> Router:
    """The router of the configuration file's models, one client per upstream (all on the
    worker's one session)."""
    file = settings.file
    assert file is not None
    keys = {name: upstream_key(spec) for name, spec in file.upstreams.items()}
    # One scrubber for all: an error from one upstream may name another.
    scrub = None if settings.expose_upstream_errors else Scrubber(
        [urlsplit(spec.url).hostname or "" for spec in file.upstreams.values()]
        + [key for key in keys.values() if key])
    clients = {}
    for name, spec in file.upstreams.items():
        connect = spec.connect_timeout or settings.connect_timeout
        timeout = None
        if spec.connect_timeout is not None or spec.read_timeout is not None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect,
                                            sock_read=spec.read_timeout or settings.read_timeout)
        # No retries on the same upstream: the router fails over to another deployment.
        clients[name] = UpstreamClient(session, spec.url, keys[name],
                                       max_line_bytes=settings.max_line_bytes, scrub=scrub,
                                       connect_timeout=connect, timeout=timeout)
    return Router.from_config(file, clients, session, defaults=settings.quirks,
                              aliases=dict(settings.model_map))


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


async def _settle_gc(app: web.Application) -> None:
    """Once the worker is up: its startup objects (modules, settings, pools) move out of the
    collector's sight, and young collections run ten times less often. A stream allocates
    dicts and strings per token; with the default threshold the collector ran every few
    requests, re-examining the same long-lived objects each time. (No collection first: in a
    process that already runs a loop, as under tests, collecting could close a leaked
    transport's socket behind its selector's back.)"""
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def build_app(settings: Settings) -> web.Application:
    """The application for explicit settings (tests, the CLI)."""
    # handler_cancellation: a client that goes away cancels its handler at once, which closes
    # the upstream request. As a handler argument it holds under any runner, gunicorn's too.
    settings.check_upstream()  # the mock is a choice, never the fallback of a missing URL
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[error_middleware, access_middleware],
                          handler_args={"handler_cancellation": True})
    app[SETTINGS] = settings
    setup_auth(app, settings)  # after error_middleware, so 401s leave as error objects
    setup_admission(app, settings.max_inflight_bytes, settings.max_concurrent_responses)
    # aiosqlite logs every statement with its parameters (response content) at DEBUG: content
    # must stay out of the logs even with ORP_LOG_LEVEL=debug.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    app.cleanup_ctx.append(_gateway_ctx)
    app.cleanup_ctx.append(_purge_ctx)
    app.cleanup_ctx.append(background_ctx)  # needs the gateway; its runs outlive requests
    app.on_shutdown.append(background_on_shutdown)
    app.cleanup_ctx.append(streams_ctx(settings.sse_keepalive))
    setup_health(app)  # its cleanup context needs the gateway's
    setup_metrics(app)
    setup_access_log(app)
    setup_routes(app)
    app.on_startup.append(_settle_gc)
    return app


async def create_app() -> web.Application:
    """gunicorn entry point: settings from the environment."""
    return build_app(load_settings())
