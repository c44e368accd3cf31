"""SIGKILL a gunicorn worker while it writes: the database stays intact and every response the
client saw acknowledged as completed is still there.

ORP runs under gunicorn (2 workers, the shipped config) in front of a fast mock upstream, with
40 clients chaining store:true turns (streamed and JSON) as fast as they can, so both workers
commit continuously. Three times during the run a random worker is killed with SIGKILL, mid
write; gunicorn starts a new one. Requests in flight on the killed worker are cut (the client
sees no terminal event: not acknowledged); everything acknowledged must be retrievable from the
surviving and restarted workers, and `PRAGMA integrity_check` must answer `ok`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import soak

CLIENTS = 40
KILLS = 3
SECONDS = 9.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="gunicorn workers found through /proc")


async def load_with_kills(stack: Any) -> dict[str, Any]:
    acknowledged: dict[str, tuple[str, str]] = {}
    acknowledged_after_kills = 0
    cut: list[str] = []
    refused: list[str] = []
    kills: list[int] = []
    started = time.monotonic()
    deadline = started + SECONDS

    async def client(session: aiohttp.ClientSession, slot: int) -> None:
        nonlocal acknowledged_after_kills
        key = soak.KEYS[slot % len(soak.KEYS)]
        previous: str | None = None
        n = 0
        while time.monotonic() < deadline:
            text = f"client {slot} turn {n}"
            outcome = await soak.turn(session, stack.url, key, text, previous, stream=n % 2 == 0)
            n += 1
            if outcome.error is None:
                acknowledged[outcome.response_id] = (key, outcome.text)
                previous = outcome.response_id  # acknowledged, so it must be continuable
                if len(kills) == KILLS:
                    acknowledged_after_kills += 1
            elif outcome.error.startswith("HTTP"):
                refused.append(outcome.error)  # an answer, not a cut: must never happen
                previous = None
            else:
                cut.append(outcome.error)
                await asyncio.sleep(0.05)

    async def killer() -> None:
        for i in range(KILLS):
            await asyncio.sleep(started + (i + 1) * SECONDS / (KILLS + 1.5) - time.monotonic())
            pid = random.choice(stack.worker_pids())
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(killer(), *(client(session, i) for i in range(CLIENTS)))
    # gunicorn has replaced the killed workers by now (it does so within a second).
    for _ in range(100):
        if len(stack.worker_pids()) == stack.workers:
            break
        await asyncio.sleep(0.1)
    lost, examples = await soak.verify(stack.url, acknowledged, 20)
    return {"acknowledged": acknowledged, "after_kills": acknowledged_after_kills, "cut": cut,
            "refused": refused, "kills": kills, "lost": lost, "lost_examples": examples,
            "workers_after": stack.worker_pids()}


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with soak.running_stack(tmp_path, workers=2, interval_ms=1.0) as stack:
        first_workers = stack.worker_pids()
        result = asyncio.run(load_with_kills(stack))
        db_path = stack.db_path
    print(f"{len(result['acknowledged'])} acknowledged ({result['after_kills']} after the "
          f"last kill), {len(result['cut'])} cut by {KILLS} SIGKILLs, {result['lost']} lost")
    assert len(result["kills"]) == KILLS
    assert set(result["kills"]) & set(first_workers)
    assert not set(result["kills"]) & set(result["workers_after"])  # really replaced
    assert len(result["workers_after"]) == 2
    # The kills hit requests in flight, and work went on afterwards.
    assert result["cut"], "no request was in flight when a worker died"
    assert result["after_kills"] > 0
    assert len(result["acknowledged"]) > 200
    assert result["refused"] == []
    assert result["lost"] == 0, result["lost_examples"]

    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        ids = list(result["acknowledged"])
        placeholders = ",".join("?" * len(ids))
        statuses = dict(db.execute(
            f"SELECT id, status FROM responses WHERE id IN ({placeholders})", ids))
    assert len(statuses) == len(ids) and set(statuses.values()) == {"completed"}
