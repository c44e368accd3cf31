"""Background responses over HTTP: `POST /v1/responses` with `background: true`, resuming a
stream with `GET /v1/responses/{id}?stream=true&starting_after=N`, and
`POST /v1/responses/{id}/cancel` (see `orp_proxy.background` for how runs work)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from orp_proxy.background import BACKGROUND, BackgroundRuns, event_type
from orp_proxy.errors import NOT_FOUND, ApiError, invalid
from orp_proxy.http.request import credential, json_response, request_id
from orp_proxy.http.sse import SSE_HEADERS, STREAM_STARTED
from orp_proxy.ops.auth import UPSTREAM_AUTHORIZATION
from orp_proxy.ops.keepalive import STREAMS
from orp_proxy.pipeline import load_history, prepare_exchange
from orp_proxy.protocol.sse import DONE_BLOCK, encode_events
from orp_proxy.state import GATEWAY
from orp_proxy.store.base import RunInfo, StoredEvent


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"No response found with id '{response_id}'.", type=NOT_FOUND,
                    param="response_id", code="not_found")


def _runs(request: web.Request) -> BackgroundRuns:
    runs = request.app.get(BACKGROUND)
    if runs is None:
        raise invalid("Background responses are not supported with this response store.",
                      "background", "unsupported_parameter")
    return runs


class _EventStream:
    """An SSE response of already encoded events (a followed background run)."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        self.streams = request.app[STREAMS]
        self.live: Any = None

    async def write(self, data: bytes) -> None:
        if self.live is None:
            await self.resp.prepare(self.request)
            self.request[STREAM_STARTED] = True
            self.live = self.streams.open(self.request, self.resp)
        await self.resp.write(data)
        self.live.writes += 1

    async def follow(self, runs: BackgroundRuns, owner: str, response_id: str, after: int
                     ) -> web.StreamResponse:
        """Write the run's events after `after` as they come, then `[DONE]`."""
        try:
            async for events in runs.follow(owner, response_id, after):
                await self.write(_encode_stored(events))
            await self.write(b"")  # prepared even when nothing was left to send
            self.close()
            await self.resp.write(DONE_BLOCK)
            await self.resp.write_eof()
        except ConnectionError:
            pass  # the client went away; the run goes on
        finally:
            self.close()
        return self.resp

    def close(self) -> None:
        if self.live is not None:
            self.streams.close(self.live)
            self.live = None


def _encode_stored(events: list[StoredEvent]) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (event_type(e.body).encode(), e.body.encode())
                    for e in events)


async def create_background(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """`background: true`: saved as queued and answered at once (JSON: the queued response;
    stream: its events, following the run live). The run goes on without the client."""
    gateway = request.app[GATEWAY]
    if body.get("store") is False:
        raise invalid("'background': true requires 'store': true (a background response is "
                      "kept so that it can be retrieved).", "background", "invalid_value")
    runs = _runs(request)
    owner = gateway.store.owner_id(credential(request))
    rid = request_id(request)
    history = await load_history(gateway, owner, body.get("previous_response_id"))
    prepared = await prepare_exchange(gateway, body, owner=owner, history=history,
                                      client_headers=request.headers)
    queued, first = await runs.submit(prepared, owner=owner, request_id=rid,
                                      authorization=request.get(UPSTREAM_AUTHORIZATION))
    headers = {"X-Request-Id": rid}
    if not body.get("stream"):
        return json_response(queued, headers=headers)
    stream = _EventStream(request, headers)
    try:
        await stream.write(encode_events(first))
    except ConnectionError:
        stream.close()
        return stream.resp
    return await stream.follow(runs, owner, queued["id"], first[-1]["sequence_number"])


# The stores keep sequence numbers as 32-bit integers (PostgreSQL `int`); no event has more.
MAX_SEQUENCE_NUMBER = 2**31 - 1


def _stream_query(request: web.Request) -> tuple[bool, int | None]:
    """`stream` and `starting_after` of `GET /v1/responses/{id}`, validated."""
    raw = request.query.get("stream", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid(f"Invalid 'stream': expected true or false, got '{raw[:32]}'.", "stream",
                      "invalid_type")
    stream = raw in ("true", "1")
    after: int | None = None
    if "starting_after" in request.query:
        text = request.query["starting_after"]
        try:
            after = int(text)
        except ValueError:
            raise invalid(f"Invalid 'starting_after': expected an integer, got '{text[:32]}'.",
                          "starting_after", "invalid_type") from None
        if not 0 <= after <= MAX_SEQUENCE_NUMBER:
            raise invalid(f"Invalid 'starting_after': {text[:32]}; it must be between 0 and "
                          f"{MAX_SEQUENCE_NUMBER}.", "starting_after", "invalid_value")
        if not stream:
            raise invalid("'starting_after' needs 'stream=true'.", "starting_after",
                          "invalid_value")
    return stream, after


def wants_stream(request: web.Request) -> bool:
    """Whether `GET /v1/responses/{id}` asks for the event stream (400 for bad values)."""
    return _stream_query(request)[0]


async def _run_of(request: web.Request, response_id: str, not_background: ApiError
                  ) -> tuple[str, BackgroundRuns, RunInfo]:
    """The caller's owner id, the worker's runs and the run of `response_id`; 404 for an
    unknown (or another owner's) response, `not_background` for one without a run."""
    gateway = request.app[GATEWAY]
    owner = gateway.store.owner_id(credential(request))
    runs = request.app.get(BACKGROUND)
    info = await runs.store.get_run(owner, response_id) if runs is not None else None
    if info is None:
        if await gateway.store.get_response(owner, response_id) is None:
            raise _not_found(response_id)
        raise not_background
    assert runs is not None
    return owner, runs, info


async def stream_response(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/{id}?stream=true[&starting_after=N]`: the stored events after N (from
    the first without N), then the live ones until the terminal event, from any worker."""
    response_id = request.match_info["response_id"]
    _, after = _stream_query(request)
    owner, runs, _ = await _run_of(
        request, response_id, invalid(
            "Only background responses can be streamed again; this response was not created "
            "with 'background': true.", "stream", "invalid_value"))
    stream = _EventStream(request)
    return await stream.follow(runs, owner, response_id, -1 if after is None else after)


async def cancel_response(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses/{id}/cancel`: stop a queued or running background response (any
    worker, any host); the response as it ended. A finished one is returned unchanged."""
    response_id = request.match_info["response_id"]
    owner, runs, info = await _run_of(request, response_id, invalid(
        "Only responses created with 'background': true can be cancelled.", "response_id",
        "invalid_value"))
    if not info.finished:
        await runs.cancel(info)
    found = await request.app[GATEWAY].store.get_response(owner, response_id)
    if found is None:
        raise _not_found(response_id)  # deleted meanwhile
    return json_response(found)


async def stop_before_delete(request: web.Request, owner: str, response_id: str) -> None:
    """A background response still running is cancelled before it is deleted, so that its
    run does not write it back."""
    runs = request.app.get(BACKGROUND)
    if runs is None:
        return
    info = await runs.store.get_run(owner, response_id)
    if info is not None and not info.finished:
        await runs.cancel(info)
