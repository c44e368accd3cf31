"""WebSocket mode: `GET /v1/responses` upgraded, one `response.create` turn after another.

Each turn runs the HTTP pipeline (`start_exchange`, the exchange pump, `settle`) and sends the
same event objects as the SSE transport, one JSON text frame per event and no `[DONE]`. Failures
before a response starts are the spec's error envelope (`{"type": "error", "status", "error"}`)
and leave the connection open.

Two tasks per connection: a reader that queues client messages (so a close from the client is
seen mid-turn, which then interrupts the turn), and a worker that runs the queued turns strictly
in order. The queue is short (4 messages, `ORP_WS_MAX_QUEUED_BYTES` in all): beyond it the reader
stops reading and TCP flow control holds the client back, so memory per connection stays bounded.
While the queue is full, a close frame is read only once the worker takes the next message; a
dropped connection still ends the turn at once, since it cancels the handler. Each turn takes a
slot of the worker's admission caps like an HTTP request (a 503 envelope past them).

Connection-local state keeps the latest responses of the connection with their whole context,
so `store: false` conversations continue on the same socket without the database; other ids
fall back to the store. A continuation that fails evicts the id it continued from (spec).

Transport fields clients send in `response.create`: `stream: true` (Codex, openai-agents),
`stream_options`, `background: false` are tolerated; `generate: false` is a warm-up answered
without the upstream; `stream_id` is echoed on every event of its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ujson
from aiohttp import WSCloseCode, WSMsgType, web

from orp_proxy.errors import SERVER_ERROR, ApiError
from orp_proxy.exchange import ClientGone
from orp_proxy.http.request import credential, request_id
from orp_proxy.ops.access import (
    CLIENT_CLOSED,
    WEBSOCKET_CLOSED,
    AccessRecord,
    write_access_line,
)
from orp_proxy.ops.admission import ADMISSION, Admission
from orp_proxy.ops.auth import UPSTREAM_AUTHORIZATION
from orp_proxy.pipeline import is_prewarm, load_history, start_exchange, warm_up
from orp_proxy.protocol.sse import json_bytes
from orp_proxy.protocol.transcoder import Event
from orp_proxy.protocol.validation import validate_create_body
from orp_proxy.state import GATEWAY, Gateway

log = logging.getLogger("orp.websocket")

# Responses kept per connection for continuation: the latest, plus a few for clients that branch
# (retry from an earlier turn). Their item lists share the item objects, so each costs little.
CACHED_RESPONSES = 8
# Client messages waiting behind the turn in progress before the reader stops reading.
QUEUED_TURNS = 4
# Server pings keep idle connections alive through proxies with 60 s idle timeouts.
HEARTBEAT_SECONDS = 30.0

LIMIT_CODE = "websocket_connection_limit_reached"

# `response.create` fields about the socket itself, handled here and not passed on.
_TRANSPORT_FIELDS = frozenset({"type", "stream", "stream_options", "background", "generate",
                               "stream_id"})


@dataclass
class _Remembered:
    """A response of this connection: its whole context (lineage input + output) in order."""

    items: list[dict[str, Any]]
    stored: bool


class _Recent:
    """The connection's latest responses, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Remembered] = OrderedDict()

    def get(self, response_id: str) -> _Remembered | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: _Remembered) -> None:
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def evict(self, response_id: str) -> None:
        self._entries.pop(response_id, None)


def error_envelope(error: ApiError) -> dict[str, Any]:
    """The spec's WebSocket error object (`error.code` is required there, never null)."""
    payload = error.payload()
    if payload["code"] is None:
        payload["code"] = error.type
    return {"type": "error", "status": error.status, "error": payload}


def _decode(data: str | bytes) -> Any:
    try:
        return ujson.loads(data)
    except (ValueError, OverflowError, RecursionError):
        raise ApiError(400, "The message is not valid JSON.", code="invalid_json") from None


class _Connection:
    """One upgraded connection: its owner, its queue of turns and its recent responses."""

    def __init__(self, gateway: Gateway, ws: web.WebSocketResponse, owner: str,
                 request_id: str, authorization: str | None, request: web.Request) -> None:
        self.gateway = gateway
        self.ws = ws
        self.request = request  # the upgrade: each turn's access line is logged against it
        self.owner = owner
        self.authorization = authorization  # pass-through mode: the upgrade's credential
        self.request_id = request_id
        self.recent = _Recent(CACHED_RESPONSES)
        # Client messages; None asks the worker to stop (server shutdown).
        self.queue: asyncio.Queue[str | bytes | None] = asyncio.Queue(QUEUED_TURNS)
        # Size of the queued messages (len: bytes, or characters of text), at most
        # ORP_WS_MAX_QUEUED_BYTES unless a single message is larger; `room` wakes the reader.
        self.queued_bytes = 0
        self.room = asyncio.Event()
        self.admission = request.app.get(ADMISSION) or Admission(0, 0)
        self.turns = 0
        self.stopping = False  # the server is shutting down
        self.closing = False  # the worker is closing the connection itself

    def stop(self) -> None:
        """Server shutdown: finish the turn in progress, then close with 1001 (going away)."""
        self.stopping = True
        with contextlib.suppress(asyncio.QueueFull):  # full: the worker is busy, sees the flag
            self.queue.put_nowait(None)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(), name="orp-ws-reader")
        worker = asyncio.create_task(self._work(), name="orp-ws-worker")
        try:
            await asyncio.wait((reader, worker), return_when=asyncio.FIRST_COMPLETED)
            if not self.closing:
                # The client left (or the worker ended): a turn in progress is interrupted.
                worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        finally:
            for task in (worker, reader):
                task.cancel()
            await asyncio.gather(worker, reader, return_exceptions=True)

    async def _read(self) -> None:
        cap = self.gateway.settings.ws_max_queued_bytes
        async for msg in self.ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                size = len(msg.data)
                # Beyond the cap the reader stops reading: TCP holds the client back.
                while self.queued_bytes and self.queued_bytes + size > cap:
                    self.room.clear()
                    await self.room.wait()
                self.queued_bytes += size
                await self.queue.put(msg.data)
            elif msg.type == WSMsgType.ERROR:
                log.debug("websocket %s: %s", self.request_id, self.ws.exception())
                return
        # The iteration ends on the client's close frame: a normal end of the connection.
        self.request[WEBSOCKET_CLOSED] = True

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gateway.settings.ws_max_age_seconds
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        data = await self.queue.get() if not self.stopping else None
                except TimeoutError:
                    break
                if data is not None:
                    self.queued_bytes -= len(data)
                    self.room.set()
                if data is None:
                    self.closing = True
                    await self.ws.close(code=WSCloseCode.GOING_AWAY,
                                        message=b"server shutting down")
                    return
                await self._turn(data)
            # A turn in progress at the deadline runs to its end; queued ones are not started.
            minutes = self.gateway.settings.ws_max_age_seconds / 60
            await self.send([error_envelope(ApiError(
                400, f"The WebSocket connection reached its limit of {minutes:g} minutes. Open a "
                "new connection to continue.", code=LIMIT_CODE))])
            self.closing = True
            await self.ws.close(code=WSCloseCode.OK, message=LIMIT_CODE.encode())
        except ClientGone:
            return
        except Exception:
            # A bug, not the client: say so with 1011 rather than vanish silently.
            log.exception("websocket %s failed", self.request_id)
            self.closing = True
            await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")

    async def send(self, events: list[Event]) -> None:
        """Deliver events, one text frame each (the exchange's `Transport`)."""
        try:
            for event in events:
                # A text frame from bytes encoded once (send_str would re-encode the str).
                await self.ws.send_frame(json_bytes(event), WSMsgType.TEXT)
        except ConnectionError:
            raise ClientGone() from None

    finish = send  # no `[DONE]` on this transport: the terminal event ends the turn

    # -- one turn ---------------------------------------------------------------------------

    async def _context(self, previous_id: str | None
                       ) -> tuple[list[dict[str, Any]], bool]:
        """The context to continue from, and whether it is also in the store."""
        if not previous_id:
            return [], True
        remembered = self.recent.get(previous_id)
        if remembered is not None:
            return remembered.items, remembered.stored
        # Not (or no longer) on this connection: only a stored response can be continued.
        return await load_history(self.gateway, self.owner, previous_id), True

    async def _turn(self, data: str | bytes) -> None:
        """One `response.create`, with its own access line and request metrics."""
        self.turns += 1
        record = AccessRecord(f"{self.request_id}.{self.turns}", time.monotonic(), stream=True)
        status, error_code = 200, None
        try:
            try:
                with self.admission.response(len(data)):
                    error = await self._run_turn(data, record)
            except ApiError as busy:  # only the admission raises: _run_turn returns its errors
                await self._fail(busy, None)
                error = busy
            if error is not None:
                status, error_code = error.status, error.code or f"http_{error.status}"
        except (ClientGone, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        finally:
            try:
                write_access_line(self.request, record, status, error_code, method="WS")
            except Exception:  # logging must never end a connection
                log.exception("writing the access line of turn %s failed", record.request_id)

    async def _run_turn(self, data: str | bytes, record: AccessRecord) -> ApiError | None:
        """The turn itself; returns the error sent as an envelope, if any."""
        rid = record.request_id
        previous_id: str | None = None
        stream_id: str | None = None
        try:
            message = _decode(data)
            if isinstance(message, dict) and isinstance(message.get("previous_response_id"), str):
                previous_id = message["previous_response_id"]
            if isinstance(message, dict) and isinstance(message.get("stream_id"), str):
                stream_id = message["stream_id"]
            body = validate_create_body(message, limits=self.gateway.limits, websocket=True)
            generate = body.get("generate") is not False and not is_prewarm(body)
            # Transport fields (validated, honoured here): not part of the response request.
            body = {key: value for key, value in body.items() if key not in _TRANSPORT_FIELDS}
            history, parent_stored = await self._context(previous_id)
            if not generate:
                warm = await warm_up(self.gateway, body, owner=self.owner, history=history,
                                     parent_stored=parent_stored)
            else:
                exchange = await start_exchange(self.gateway, body, owner=self.owner,
                                                history=history, request_id=rid,
                                                authorization=self.authorization,
                                                client_headers=self.request.headers)
        except ApiError as exc:
            await self._fail(exc, previous_id, stream_id)
            return exc
        except Exception:
            log.exception("websocket turn %s failed unexpectedly", rid)
            error = ApiError(500, "The gateway failed unexpectedly.", type=SERVER_ERROR,
                             code="internal_error")
            await self._fail(error, previous_id, stream_id)
            return error
        transport: _Connection | _Lane = self if stream_id is None else _Lane(self, stream_id)
        if not generate:
            await transport.finish(warm.events)
            self.recent.put(warm.response["id"], _Remembered(
                [*history, *warm.new_items], stored=warm.stored))
            return None
        record.exchange = exchange
        if exchange.persist is not None and not parent_stored:
            # Continuing a `store: false` response into a stored one: the store has no parent to
            # walk back to, so this response keeps the whole context as its input.
            exchange.persist.input_items = [*history, *exchange.new_items]
        response = await exchange.run(transport)
        if response["status"] == "failed":
            if previous_id:
                self.recent.evict(previous_id)
            return None
        self.recent.put(response["id"], _Remembered(
            [*history, *exchange.new_items, *response["output"]],
            stored=exchange.persist is not None))
        return None

    async def _fail(self, error: ApiError, previous_id: str | None,
                    stream_id: str | None = None) -> None:
        if previous_id:
            self.recent.evict(previous_id)
        envelope = error_envelope(error)
        if stream_id is not None:
            envelope["stream_id"] = stream_id
        await self.send([envelope])


class _Lane:
    """A turn sent with a `stream_id` (the SDK's WebSocket lane): every event of the turn
    carries it. Turns run one at a time anyway, so lanes need no scheduling of their own."""

    def __init__(self, connection: _Connection, stream_id: str) -> None:
        self._connection = connection
        self._stream_id = stream_id

    async def send(self, events: list[Event]) -> None:
        # Copies: the transcoder's events are not ours to change.
        await self._connection.send([{**event, "stream_id": self._stream_id}
                                     for event in events])

    finish = send


_CONNECTIONS = web.AppKey("orp_ws_connections", weakref.WeakSet[_Connection])


async def _stop_connections(app: web.Application) -> None:
    connections = app[_CONNECTIONS]
    for connection in list(connections):
        connection.stop()


def setup_websocket(app: web.Application) -> None:
    """Route `GET /v1/responses` here, and let shutdown close idle connections at once
    (otherwise they would hold the worker until the graceful timeout)."""
    connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
    app[_CONNECTIONS] = connections
    app.on_shutdown.append(_stop_connections)
    app.router.add_get("/v1/responses", websocket_handler, allow_head=False)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses`: the WebSocket transport (only as an upgrade)."""
    gateway = request.app[GATEWAY]
    ws = web.WebSocketResponse(max_msg_size=gateway.settings.max_body_bytes,
                               heartbeat=HEARTBEAT_SECONDS)
    if not ws.can_prepare(request).ok:
        raise ApiError(426, "GET /v1/responses is the WebSocket transport: send an upgrade "
                       "request (or POST to create a response over HTTP).",
                       code="websocket_upgrade_required", headers={"Upgrade": "websocket"})
    owner = gateway.store.owner_id(credential(request))
    await ws.prepare(request)
    connection = _Connection(gateway, ws, owner, request_id(request),
                             request.get(UPSTREAM_AUTHORIZATION), request)
    connections = request.app.get(_CONNECTIONS)
    if connections is not None:
        connections.add(connection)
    try:
        await connection.run()
    finally:
        with contextlib.suppress(Exception):
            await ws.close()
    if ws.closed and ws.close_code is not None and ws.close_code != WSCloseCode.ABNORMAL_CLOSURE:
        request[WEBSOCKET_CLOSED] = True
    return ws


__all__ = ["error_envelope", "setup_websocket", "websocket_handler"]
