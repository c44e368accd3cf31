"""SSE keep-alive comments for idle streams, from one sweeper task per worker.

Load balancers drop connections that stay silent longer than their idle timeout (often 60 s),
and a model may think for longer than that before its first token. Rather than a timer per
stream (or per token), every open stream registers here and counts its writes; one task per
worker looks at all streams about once a second and writes `: keep-alive` to those whose count
has not moved for `interval` seconds. The hot path pays one integer increment per write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from orp_proxy.ops import metrics
from orp_proxy.protocol.sse import KEEPALIVE_BLOCK

log = logging.getLogger("orp.keepalive")


class LiveStream:
    """One open SSE response. The stream's owner bumps `writes` after each write."""

    __slots__ = ("_quiet_since", "_seen", "request", "response", "writes")

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, now: float
                 ) -> None:
        self.request = request
        self.response = response
        self.writes = 0
        self._seen = 0
        self._quiet_since = now


class StreamRegistry:
    """The open SSE streams of one worker; `run()` is the sweeper (interval 0: no sweeping)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._live: set[LiveStream] = set()

    def __len__(self) -> int:
        return len(self._live)

    def open(self, request: web.BaseRequest, response: web.StreamResponse) -> LiveStream:
        """Register a prepared response (headers sent)."""
        live = LiveStream(request, response, asyncio.get_running_loop().time())
        self._live.add(live)
        metrics.STREAMS_IN_FLIGHT.inc()
        return live

    def close(self, live: LiveStream) -> None:
        """Unregister, before the stream's last write: nothing may follow `[DONE]`."""
        if live in self._live:
            self._live.remove(live)
            metrics.STREAMS_IN_FLIGHT.dec()

    async def sweep(self, now: float) -> int:
        """Write a keep-alive to every stream quiet for `interval` seconds; returns how many."""
        sent = 0
        for live in list(self._live):
            if live.writes != live._seen:
                live._seen = live.writes
                live._quiet_since = now
                continue
            if now - live._quiet_since < self.interval or live not in self._live:
                continue
            transport = live.request.transport
            # A client that has not read what is already buffered gains nothing from more bytes,
            # and skipping it keeps this task from ever waiting on one slow reader.
            if transport is None or transport.is_closing() or transport.get_write_buffer_size():
                continue
            live._quiet_since = now
            try:
                await live.response.write(KEEPALIVE_BLOCK)
            except (ConnectionError, RuntimeError):
                # The stream's own task notices the disconnect and unregisters.
                continue
            sent += 1
        return sent

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.interval / 4)
        while True:
            await asyncio.sleep(tick)
            try:
                await self.sweep(loop.time())
            except Exception:  # pragma: no cover - a bug here must not stop keep-alives
                log.exception("keep-alive sweep failed")


STREAMS = web.AppKey("orp_streams", StreamRegistry)


def streams_ctx(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry that installs the registry and runs its sweeper."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        registry = StreamRegistry(interval)
        app[STREAMS] = registry
        task = (asyncio.create_task(registry.run(), name="orp-sse-keepalive")
                if interval > 0 else None)
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx
