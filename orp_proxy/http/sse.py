"""The SSE transport: a response's events written to a `web.StreamResponse`, then `[DONE]`."""

from __future__ import annotations

from aiohttp import web

from orp_proxy.exchange import ClientGone, Exchange
from orp_proxy.ops.keepalive import STREAMS, LiveStream, StreamRegistry
from orp_proxy.protocol.sse import DONE_BLOCK, encode_events
from orp_proxy.protocol.transcoder import Event

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and similar proxies must not buffer the stream
}

# Set once an SSE response is prepared: from then on an error cannot become an HTTP error
# response (it would land inside the stream body); the connection is closed instead.
STREAM_STARTED = web.RequestKey("orp_stream_started", bool)


class _EventStreamResponse(web.StreamResponse):
    """Headers go out with the first events, in one write: the transport prepares the
    response only when it has events to send (aiohttp's opt-in, as its `Response` does)."""

    _send_headers_immediately = False


class SSETransport:
    """Prepares the response on the first delivery; idle streams get keep-alive comments from
    the worker's sweeper (see `ops.keepalive`), which counts our writes."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.resp: web.StreamResponse = _EventStreamResponse(
            status=200, headers={**SSE_HEADERS, **headers})
        self.streams: StreamRegistry = request.app[STREAMS]
        self.live: LiveStream | None = None

    async def _start(self) -> LiveStream:
        await self.resp.prepare(self.request)
        self.request[STREAM_STARTED] = True
        live = self.live = self.streams.open(self.request, self.resp)
        return live

    async def send(self, events: list[Event]) -> None:
        live = self.live
        if live is None:
            live = await self._start()
        await self.resp.write(encode_events(events))
        live.writes += 1

    async def finish(self, events: list[Event]) -> None:
        if self.live is None:  # everything in one write: the opening events were held back
            await self._start()
        self.close()
        # The last events, `[DONE]` and the end of the chunked body in one write.
        await self.resp.write_eof(encode_events(events) + DONE_BLOCK)

    def close(self) -> None:
        if self.live is not None:
            self.streams.close(self.live)


async def stream_events(exchange: Exchange, request: web.Request, headers: dict[str, str]
                        ) -> web.StreamResponse:
    """Run `exchange` as server-sent events."""
    transport = SSETransport(request, headers)
    try:
        await exchange.run(transport)
    except ClientGone:
        pass  # kept as incomplete by the exchange; nobody is left to answer
    finally:
        transport.close()
    return transport.resp
