"""The exchange pump with fake upstream and store: saving exactly once, whatever the client does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orp_proxy.exchange import Exchange, Persistence
from orp_proxy.protocol.resource import build_response
from orp_proxy.protocol.transcoder import Event, Transcoder
from orp_proxy.store import StoredResponse


class FakeUpstream:
    """As `UpstreamStream`: `saw_done` turns true as the read that brought `[DONE]` (here: the
    last batch) is handed out; with `done=False` the stream ends without it."""

    def __init__(self, batches: list[list[dict[str, Any]]], *, arrived: bool = False,
                 done: bool = True) -> None:
        self._batches = batches
        self.closed = False
        self.arrived = arrived
        self.done = done
        self.saw_done = False

    def body_arrived(self) -> bool:
        return self.arrived

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        for i, batch in enumerate(self._batches):
            self.saw_done = self.done and i == len(self._batches) - 1
            yield batch
        self.saw_done = self.done

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class SlowStore:
    def __init__(self) -> None:
        self.saved: list[str] = []

    async def save_response(self, record: StoredResponse) -> None:
        self.saved.append(record.status)
        await asyncio.sleep(0.2)


def exchange(store: SlowStore | None, batches: list[list[dict[str, Any]]], *,
             arrived: bool = False, done: bool = True) -> Exchange:
    return Exchange(Transcoder(build_response({}, model="m")),
                    FakeUpstream(batches, arrived=arrived, done=done),  # type: ignore[arg-type]
                    Persistence(store, "owner", []) if store else None)  # type: ignore[arg-type]


class Recorder:
    """A transport that records what each write would carry."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []

    async def send(self, events: list[Event]) -> None:
        self.writes.append([e["type"] for e in events])

    async def finish(self, events: list[Event]) -> None:
        self.writes.append([e["type"] for e in events] + ["[DONE]"])


OPENING = ["response.created", "response.in_progress"]
TEXT = [{"choices": [{"delta": {"content": "hi"}}]}]


DONE = [[{"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}]]


async def test_cancelled_while_saving_the_finished_response_saves_it_once() -> None:
    store = SlowStore()
    task = asyncio.create_task(exchange(store, DONE).collect())
    await asyncio.sleep(0.05)  # inside the (shielded) save of the completed response
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    assert store.saved == ["completed"]


async def test_client_gone_mid_stream_saves_incomplete_once() -> None:
    store = SlowStore()
    ex = exchange(store, [[{"choices": [{"delta": {"content": "a"}}]}]] * 3 + DONE)
    ex.transcoder.start()

    async def deliver(events: list[Event]) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await ex.pump(deliver)
    await ex.interrupted()
    await ex.interrupted()
    assert store.saved == ["incomplete"]
    assert ex.upstream.closed  # type: ignore[attr-defined]


async def test_the_opening_events_leave_at_once_while_the_upstream_is_silent() -> None:
    transport = Recorder()
    await exchange(None, [TEXT, DONE[0]]).run(transport)
    assert transport.writes[0] == OPENING
    assert transport.writes[1][0] == "response.output_item.added"


async def test_the_opening_events_ride_with_the_first_output_when_it_is_already_here() -> None:
    transport = Recorder()
    ex = exchange(None, [TEXT, DONE[0]], arrived=True)
    response = await ex.run(transport)
    assert transport.writes[0][:3] == [*OPENING, "response.output_item.added"]
    assert transport.writes[-1][-2:] == ["response.completed", "[DONE]"]
    flat = [t for write in transport.writes for t in write]
    assert flat.count("response.created") == 1 and response["status"] == "completed"
    assert ex.first_token_at is not None


async def test_held_opening_events_wait_for_the_first_read_only() -> None:
    # A first read with nothing to show (a role chunk, half a line): the opening events leave
    # then, not with the first token, however long the model takes for it.
    transport = Recorder()
    await exchange(SlowStore(), [[], TEXT, DONE[0]], arrived=True).run(transport)
    assert transport.writes[0] == OPENING
    assert transport.writes[1][0] == "response.output_item.added"


async def test_held_opening_events_still_lead_when_the_body_ends_at_once() -> None:
    transport = Recorder()
    await exchange(SlowStore(), [], arrived=True).run(transport)  # no read left at all
    assert transport.writes == [[*OPENING, "response.completed", "[DONE]"]]


async def test_the_last_read_rides_with_the_terminal_events() -> None:
    # The read that brought `[DONE]` is not written on its own: its text leaves with
    # `response.completed` and `[DONE]`, after the save, in the transport's last write.
    transport = Recorder()
    store = SlowStore()
    await exchange(store, [TEXT, TEXT, DONE[0]]).run(transport)
    # The opening (the model was silent at first), one write per read before the last, then
    # the last read with the end.
    assert len(transport.writes) == 4
    assert transport.writes[2] == ["response.output_text.delta"]
    assert transport.writes[-1][0] == "response.output_text.delta"
    assert transport.writes[-1][-2:] == ["response.completed", "[DONE]"]
    assert store.saved == ["completed"]


async def test_without_done_every_read_is_written_as_it_comes() -> None:
    # A stream cut short (no `[DONE]`, no finish reason): nothing is held back.
    transport = Recorder()
    await exchange(None, [TEXT, TEXT], done=False).run(transport)
    assert [w.count("response.output_text.delta") for w in transport.writes] == [0, 1, 1, 0]
    assert transport.writes[-1][-2:] == ["response.failed", "[DONE]"]
