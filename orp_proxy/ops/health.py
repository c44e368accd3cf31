"""Health endpoints and draining: `GET /livez`, `GET /readyz`.

`/livez` answers as long as the worker's event loop does. `/readyz` answers 503 while the worker
is draining, or when the response store cannot commit a small write within a second; otherwise
200 (`degraded` when a configured model has deployments out; 503 when none is servable only if
`[routing] readyz_requires_model`). The upstream's state comes from a background probe of
`GET {upstream}/models` and is only reported: one upstream blip must not take every ORP
instance out of the load balancer at once.

Draining starts when SIGTERM reaches the worker (`drain_on_sigterm`, installed by the gunicorn
config; `orp-proxy serve` gets there through the application's shutdown), or while the
file named by `ORP_DRAIN_FILE` exists (checked once a second). Draining changes nothing else:
in-flight and new requests are served until the listener closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from orp_proxy.protocol.sse import dumps
from orp_proxy.state import GATEWAY

log = logging.getLogger("orp.health")

STORE_CHECK_TIMEOUT = 1.0
DRAIN_FILE_POLL = 1.0
_PROBE_TIMEOUT = 5.0


class Drain:
    """Whether this worker should be taken out of the load balancer."""

    def __init__(self) -> None:
        self.terminating = False  # SIGTERM or shutdown: never undone
        self.drain_file = False  # follows the drain file's existence

    def reason(self) -> str | None:
        """Why the worker is draining, or None when it is not."""
        if self.terminating:
            return "terminating"
        if self.drain_file:
            return "drain_file"
        return None


# Every live application's drain state in this process, for the SIGTERM hook, which runs in the
# gunicorn worker before the application exists.
_DRAINS: weakref.WeakSet[Drain] = weakref.WeakSet()


def begin_termination() -> None:
    """Mark every application of this process as draining (the worker got SIGTERM)."""
    for drain in list(_DRAINS):
        if not drain.terminating:
            drain.terminating = True
            log.info("SIGTERM: draining (readyz answers 503) until the listener closes")


def drain_on_sigterm(worker: Any) -> None:
    """gunicorn `post_worker_init` hook: on SIGTERM, mark the worker draining, then let the
    aiohttp worker stop as usual.

    That worker only acts on SIGTERM at its next once-a-second check, and then closes its
    listener; until then `/readyz` would still answer 200 without this.
    """
    loop = getattr(worker, "loop", None)
    if loop is None:  # pragma: no cover - not an aiohttp worker
        return

    def on_sigterm() -> None:
        begin_termination()
        worker.handle_exit(signal.SIGTERM, None)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


class UpstreamProbe:
    """The last result of `GET {upstream}/models`, refreshed in the background."""

    def __init__(self, url: str, auth: str | None) -> None:
        self.url = url
        self._headers = {"Authorization": auth} if auth else {}
        self.state: dict[str, Any] = {"state": "unknown"}

    async def check(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with session.get(self.url, headers=self._headers,
                                   timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT)) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            result: dict[str, Any] = {"state": "unreachable", "error": type(exc).__name__}
        else:
            result = {"state": "ok" if 200 <= status < 300 else "error", "status": status}
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        result["checked_at"] = int(time.time())
        if result["state"] != self.state["state"]:
            level = logging.INFO if result["state"] == "ok" else logging.WARNING
            log.log(level, "upstream probe: %s", dumps(result))
        self.state = result
        return result

    async def run(self, session: aiohttp.ClientSession, interval: float) -> None:
        while True:
            await self.check(session)
            await asyncio.sleep(interval)


async def _watch_drain_file(drain: Drain, path: str) -> None:
    while True:
        # One stat() a second of a local file: cheaper than handing it to a thread.
        present = os.path.exists(path)  # noqa: ASYNC240
        if present != drain.drain_file:
            drain.drain_file = present
            log.info("drain file %s %s", path, "appeared: draining" if present
                     else "removed: ready again")
        await asyncio.sleep(DRAIN_FILE_POLL)


DRAIN = web.AppKey("orp_drain", Drain)
PROBE = web.AppKey("orp_upstream_probe", UpstreamProbe)


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    settings = gateway.settings
    drain = app[DRAIN]
    _DRAINS.add(drain)
    upstream = gateway.upstream
    probe = UpstreamProbe(upstream.endpoint("models"), upstream.authorization)
    app[PROBE] = probe
    tasks = []
    if settings.drain_file:
        drain.drain_file = os.path.exists(settings.drain_file)  # noqa: ASYNC240
        tasks.append(asyncio.create_task(_watch_drain_file(drain, settings.drain_file),
                                         name="orp-drain-file"))
    if settings.upstream_probe_interval > 0 and not settings.routed:
        # With routed models the router keeps each deployment's state (and probes the ones
        # it took out); one upstream's probe would say nothing about the others.
        tasks.append(asyncio.create_task(
            probe.run(upstream.session, settings.upstream_probe_interval),
            name="orp-upstream-probe"))
    try:
        yield
    finally:
        _DRAINS.discard(drain)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _on_shutdown(app: web.Application) -> None:
    app[DRAIN].terminating = True


def _health_json(body: dict[str, Any], status: int) -> web.Response:
    return web.Response(body=dumps(body).encode(), status=status,
                        content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def livez(request: web.Request) -> web.Response:
    return _health_json({"status": "alive", "pid": os.getpid()}, 200)


async def readyz(request: web.Request) -> web.Response:
    drain = request.app[DRAIN]
    gateway = request.app[GATEWAY]
    body: dict[str, Any] = {"pid": os.getpid()}
    file = gateway.settings.file
    routing = file.routing if file is not None and file.models else None
    if routing is not None:
        body["models"] = gateway.router.state()
    else:
        probe = request.app.get(PROBE)
        body["upstream"] = probe.state if probe else {"state": "unknown"}
    reason = drain.reason()
    if reason is not None:
        # Answer at once: a draining worker must leave the pool even if its store hangs.
        return _health_json({"status": "draining", "reason": reason, **body}, 503)
    started = time.monotonic()
    writable = await gateway.store.check_writable(STORE_CHECK_TIMEOUT)
    body["store"] = {"writable": writable,
                     "latency_ms": round((time.monotonic() - started) * 1000, 1)}
    if not writable:
        return _health_json({"status": "not_ready", "reason": "store_not_writable", **body},
                            503)
    if routing is not None:
        states = {m["state"] for m in body["models"].values()}
        if states == {"down"} and routing.readyz_requires_model:
            return _health_json({"status": "not_ready", "reason": "no_model_servable", **body},
                                503)
        if states != {"ok"}:
            # Reported, still 200 by default: one backend blip must not take every ORP
            # instance out of the load balancer at once.
            return _health_json({"status": "degraded", **body}, 200)
    return _health_json({"status": "ready", **body}, 200)


def setup_health(app: web.Application) -> None:
    """Routes, the drain state, and (as a cleanup context, after the gateway's) the drain-file
    watcher and upstream probe."""
    app[DRAIN] = Drain()
    app.cleanup_ctx.append(_health_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
