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
    saw_done = True

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        self._batches = batches
        self.closed = False

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        for batch in self._batches:
            yield batch

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


def exchange(store: SlowStore, batches: list[list[dict[str, Any]]]) -> Exchange:
    return Exchange(Transcoder(build_response({}, model="m")), FakeUpstream(batches),  # type: ignore[arg-type]
                    Persistence(store, "owner", []))  # type: ignore[arg-type]


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
