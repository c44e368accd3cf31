"""One proxied response: upstream chunks → transcoder → client, with the store on the side.

The same pump serves every transport: each hands `run` a `Transport` (SSE writes events as they
come, WebSocket sends frames, JSON drops them and returns the final response). A stored response
is committed before its terminal event or JSON body leaves, so an immediate follow-up with
`previous_response_id` finds it, on any worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orp_proxy.errors import INVALID_REQUEST, MODEL_ERROR, SERVER_ERROR, ApiError
from orp_proxy.protocol.transcoder import Event, StreamFailure, ToolNotAllowed, Transcoder
from orp_proxy.store import ResponseStore, StoredResponse, StoreUnavailable
from orp_proxy.upstream.client import UpstreamStream, UpstreamStreamError

log = logging.getLogger("orp.exchange")

# HTTP status and error type for a JSON-mode response that failed, by error code. The spec's
# table gives `model_error` 500; failures of the gateway itself are 500 too; a context the
# model cannot hold is the request's fault (400); a store that is away (restarting, failing
# over) is 503, as when a request needs it up front; everything else failed upstream of us
# (502, 504 for a timeout).
_FAILURE_STATUS = {"upstream_timeout": 504, "store_failed": 500, "internal_error": 500,
                   "tool_not_allowed": 500, "context_length_exceeded": 400,
                   "store_unavailable": 503}
_FAILURE_TYPE = {"tool_not_allowed": MODEL_ERROR, "context_length_exceeded": INVALID_REQUEST}

class ClientGone(Exception):
    """Delivering events failed: the client closed the connection or it broke."""


class Transport(Protocol):
    """How one transport delivers a response's events to its client."""

    async def send(self, events: list[Event]) -> None:
        """Deliver events as they come (raises `ConnectionError`/`ClientGone` if the client is
        gone)."""
        ...

    async def finish(self, events: list[Event]) -> None:
        """Deliver the last events (the terminal one among them) and end the response."""
        ...


class _DeliveryFailed(Exception):
    """Marks an exception raised by `deliver` (the client side), as opposed to processing."""


@dataclass
class Persistence:
    """Where and as whom a `store: true` response is saved."""

    store: ResponseStore
    owner: str
    input_items: list[dict[str, Any]]
    ttl_seconds: float | None = None


@dataclass
class Exchange:
    """Runs one response. `persist` is None for `store: false`."""

    transcoder: Transcoder
    upstream: UpstreamStream
    persist: Persistence | None = None
    new_items: list[dict[str, Any]] = field(default_factory=list)
    first_token_at: float | None = None
    # Response headers that describe the exchange (X-ORP-Dropped-Tools), for HTTP transports.
    headers: dict[str, str] = field(default_factory=dict)
    # Events held back to share a write: `response.created`/`in_progress` wait for the first
    # read when the upstream's body had already arrived at the start, and the last read's
    # events (the one that brought `[DONE]`) leave with the terminal ones.
    _held: list[Event] = field(default_factory=list)

    async def pump(self, deliver: Callable[[list[Event]], Awaitable[None]]) -> None:
        """Feed every upstream chunk, delivering events per read; the terminal events are left
        for `settle`."""
        tc = self.transcoder
        stream = self.upstream
        try:
            async for batch in stream.batches():
                for chunk in batch:
                    tc.feed(chunk)
                # Nothing of a read stays referenced while the next is awaited, which takes the
                # model's time: the chunks, the events (memory per open stream).
                del batch
                chunk = None
                events = tc.take()
                if events and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if self._held:  # the opening, held for the first read only, whatever it brought
                    events = self._held + events
                    self._held = []
                if stream.saw_done:  # the last read: `settle` sends its events with the end
                    self._held = events
                    continue
                if events:
                    try:
                        await deliver(events)
                    except Exception as exc:
                        raise _DeliveryFailed() from exc
                    del events
            stream.release()
            if stream.saw_done or tc.saw_finish_reason:
                tc.finish()
            else:
                tc.fail("upstream_incomplete",
                        "The upstream stream ended before the response was finished")
        except UpstreamStreamError as exc:
            tc.fail(exc.code, exc.message, type=_FAILURE_TYPE.get(exc.code, SERVER_ERROR))
        except StreamFailure as exc:
            tc.fail(exc.code, exc.message)
        except ToolNotAllowed as exc:
            tc.fail("tool_not_allowed",
                    f"The model called the tool '{exc.args[0]}', which this request does not "
                    "allow (tools / tool_choice / allowed_tools).", type=MODEL_ERROR)
        except ValueError as exc:
            tc.fail("upstream_bad_response", f"The upstream sent an unusable chunk: {exc}")
        except _DeliveryFailed as failed:
            # The client side failed (it went away): the caller settles that, not us.
            assert failed.__cause__ is not None
            raise failed.__cause__ from None
        except Exception:
            # A bug of ours or a chunk shape nobody foresaw: the client still gets a well-formed
            # ending and the response is stored as failed, never a traceback or a cut stream.
            log.exception("processing the upstream stream of %s failed", tc.response["id"])
            tc.fail("internal_error", "The gateway failed while processing this response.")
        for notice in tc.notices:
            log.warning("response %s: %s", tc.response["id"], notice)

    async def settle(self) -> list[Event]:
        """Persist the final response (shielded), then hand back the remaining events."""
        events = self._held + self.transcoder.take()
        self._held = []
        if self.persist is None:
            return events
        try:
            await asyncio.shield(self._save())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, StoreUnavailable):  # logged by the store, once per failure
                code, message = ("store_unavailable", "The response store is unavailable; "
                                 "the response was not saved. Try again shortly.")
            else:
                log.exception("storing response %s failed", self.transcoder.response["id"])
                code = "store_failed"
                message = "The response could not be stored; it was not saved."
            if events and events[-1]["type"] != "response.failed":
                # The client must not be told "completed" for a response it cannot continue.
                events.pop()
                self.transcoder.retract_terminal()
                self.transcoder.fail(code, message)
                events.extend(self.transcoder.take())
        return events

    async def _save(self) -> None:
        assert self.persist is not None
        response = self.transcoder.response
        persist = self.persist
        expires = time.time() + persist.ttl_seconds if persist.ttl_seconds else None
        await persist.store.save_response(
            StoredResponse(
                id=response["id"],
                owner=persist.owner,
                previous_response_id=response["previous_response_id"],
                created_at=response["created_at"],
                status=response["status"],
                response=response,
                input_items=persist.input_items,
                expires_at=expires,
            )
        )

    async def interrupted(self) -> None:
        """The client went away: close upstream now, keep what arrived as `incomplete`."""
        self.upstream.close()
        if self.transcoder.finished:
            return  # settled (and saved, or being saved) already: nothing was cut short
        self.transcoder.interrupt()
        if self.persist is not None:
            try:
                await asyncio.shield(self._save())
            except Exception:
                log.exception("storing interrupted response %s failed",
                              self.transcoder.response["id"])

    async def run(self, transport: Transport) -> dict[str, Any]:
        """Run the response to its end through `transport`; returns the final response object.

        Every transport (SSE, WebSocket, JSON) delivers the same events this one way. A client
        that goes away raises `ClientGone` (or the cancellation) after the response is kept as
        `incomplete`."""
        tc = self.transcoder
        tc.start()
        try:
            if self.upstream.body_arrived():
                self._held = tc.take()
            else:  # the model is still thinking: the client hears of its response now
                await transport.send(tc.take())
            await self.pump(transport.send)
            if tc.dropped_calls:
                log.info("response %s: %d tool call(s) past max_tool_calls / "
                         "parallel_tool_calls left out", tc.response["id"], tc.dropped_calls)
            await transport.finish(await self.settle())
        except (ConnectionError, ClientGone):  # a write to a gone client
            await self.interrupted()
            raise ClientGone() from None
        except asyncio.CancelledError:
            await self.interrupted()
            raise
        finally:
            self.upstream.close()
        return tc.response

    async def collect(self) -> dict[str, Any]:
        """Run to the end and return the final response object (JSON mode)."""
        response = await self.run(_DISCARD)
        if response["status"] == "failed":
            error = response["error"]
            raise ApiError(_FAILURE_STATUS.get(error["code"], 502), error["message"],
                           type=_FAILURE_TYPE.get(error["code"], SERVER_ERROR),
                           code=error["code"], headers=self.headers)
        return response


class _Discard:
    """JSON mode: the events are not delivered, only the final response counts."""

    async def send(self, events: list[Event]) -> None:
        return None

    async def finish(self, events: list[Event]) -> None:
        return None


_DISCARD = _Discard()
