"""Tests of the response stores: the semantics on both backends (the `store` fixture is
parametrised: SQLite, and a real PostgreSQL server), then each backend's own machinery."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orp_proxy.config import Settings
from orp_proxy.store import postgres as pg_module
from orp_proxy.store import sqlite as store_module
from orp_proxy.store.base import EventBatch, StoredEvent
from orp_proxy.store.factory import open_store
from orp_proxy.store.postgres import PostgresStore
from orp_proxy.store.sqlite import SCHEMA_VERSION, ResponseStore, SQLiteStore, StoredResponse

REPO = Path(__file__).resolve().parents[1]


def user(text: str, item_id: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }


def assistant(text: str, item_id: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def record(
    resp_id: str,
    owner: str,
    prev: str | None = None,
    *,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    expires_at: float | None = None,
    created_at: int = 1_700_000_000,
) -> StoredResponse:
    """A response whose input/output default to one message each, ids derived from resp_id."""
    if inputs is None:
        inputs = [user(f"question of {resp_id}", f"in_{resp_id}")]
    if outputs is None:
        outputs = [assistant(f"answer of {resp_id}", f"out_{resp_id}")]
    response = {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": "completed",
        "model": "m",
        "previous_response_id": prev,
        "output": outputs,
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
        "metadata": {},
    }
    return StoredResponse(
        id=resp_id,
        owner=owner,
        previous_response_id=prev,
        created_at=created_at,
        status="completed",
        response=response,
        input_items=inputs,
        expires_at=expires_at,
    )


def count_write_transactions(store: SQLiteStore | PostgresStore,
                             monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """A list that gets one entry per write transaction the store runs from now on."""
    seen: list[None] = []
    original = store._write

    async def counting(body: Any) -> Any:
        seen.append(None)
        return await original(body)

    monkeypatch.setattr(store, "_write", counting)
    return seen


def texts(items: list[dict[str, Any]] | None) -> list[str]:
    assert items is not None
    return [item["content"][0]["text"] for item in items]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "orp.sqlite3")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Any]:
    """An empty store, once on each backend."""
    opened = await open_store(Settings(store_url=store_url))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def sqlite_store(db_path: str) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


def _implements_the_protocol(one: SQLiteStore, other: PostgresStore) -> list[ResponseStore]:
    return [one, other]  # both must satisfy ResponseStore (mypy, when it reads the tests)


def backend(store: Any) -> Any:
    """The module of `store`'s backend (for patching its constants)."""
    return store_module if isinstance(store, SQLiteStore) else pg_module


async def stored_ids(store: Any) -> set[str]:
    if isinstance(store, SQLiteStore):
        return {row[0] for row in await store._read("SELECT id FROM responses")}
    return {row[0] for row in await store._fetch("SELECT id FROM responses")}


OWNER = "owner-a"
OTHER = "owner-b"


# -- opening ---------------------------------------------------------------------------------


async def test_pragmas(sqlite_store: SQLiteStore, db_path: str) -> None:
    async def pragma(name: str) -> Any:
        return next(iter(await sqlite_store._db.execute_fetchall(f"PRAGMA {name}")))[0]

    assert await pragma("journal_mode") == "wal"
    assert await pragma("foreign_keys") == 1
    assert await pragma("synchronous") == 1  # NORMAL
    assert await pragma("busy_timeout") == 5000
    # The event loop's write connection: same durability, never waits, never checkpoints.
    assert sqlite_store._now is not None
    assert [sqlite_store._now.execute(f"PRAGMA {name}").fetchone()[0] for name in (
        "synchronous", "foreign_keys", "busy_timeout", "wal_autocheckpoint")] == [1, 1, 0, 0]
    # WAL is a property of the file: a fresh connection sees it too.
    with closing(sqlite3.connect(db_path)) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_migrations_are_idempotent(db_path: str) -> None:
    first = await SQLiteStore.open(db_path)
    await first.save_response(record("resp_1", OWNER))
    await first.close()
    again = await SQLiteStore.open(db_path)
    try:
        assert await again.get_response(OWNER, "resp_1") is not None
        stats = await again.stats()
        assert stats["schema_version"] == SCHEMA_VERSION >= 1
    finally:
        await again.close()
    plain = sqlite3.connect(db_path)
    try:
        assert plain.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in plain.execute("SELECT name FROM sqlite_master")}
        assert {
            "meta",
            "responses",
            "items",
            "responses_walk",
            "items_by_id",
            "responses_children",
        } <= tables
    finally:
        plain.close()


async def test_migrates_a_version_1_database(db_path: str) -> None:
    # A file as the first release left it, with one response in it.
    with closing(sqlite3.connect(db_path, isolation_level=None)) as plain:
        for statement in store_module._MIGRATIONS[0]:
            plain.execute(statement)
        plain.execute("PRAGMA user_version = 1")
        plain.execute(
            "INSERT INTO responses (id, owner, created_at, status, response) "
            "VALUES ('resp_old', ?, 1, 'completed', '{\"id\": \"resp_old\"}')",
            (OWNER,),
        )
    opened = await SQLiteStore.open(db_path)
    try:
        assert (await opened.stats())["schema_version"] == SCHEMA_VERSION >= 2
        assert await opened.get_response(OWNER, "resp_old") == {"id": "resp_old"}
    finally:
        await opened.close()
    with closing(sqlite3.connect(db_path)) as plain:
        indexes = {row[0] for row in plain.execute("SELECT name FROM sqlite_master")}
    assert "responses_children" in indexes


async def test_refuses_newer_schema(db_path: str) -> None:
    plain = sqlite3.connect(db_path)
    plain.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    plain.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SQLiteStore.open(db_path)


async def test_open_twice_concurrently(db_path: str) -> None:
    one, two = await asyncio.gather(SQLiteStore.open(db_path), SQLiteStore.open(db_path))
    try:
        assert one.owner_id("sk-x") == two.owner_id("sk-x")
        await one.save_response(record("resp_1", OWNER))
        assert await two.get_response(OWNER, "resp_1") is not None
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_workers_creating_a_new_file_together_never_see_locked(tmp_path: Any) -> None:
    # The WAL switch on a new file takes an exclusive lock without calling the busy handler;
    # before the retry, about 6% of these rounds failed with "database is locked".
    for round_ in range(40):
        path = str(tmp_path / f"fresh{round_}.sqlite3")
        stores = await asyncio.gather(*(SQLiteStore.open(path) for _ in range(3)))
        await asyncio.gather(*(s.close() for s in stores))


# -- save / get / delete ---------------------------------------------------------------------


async def test_save_get_roundtrip_is_exact(store: SQLiteStore) -> None:
    rec = record(
        "resp_1",
        OWNER,
        outputs=[
            assistant("a/b “quoted” 🎉 \ud800 lone surrogate", "out_1"),
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "c1",
                "name": "f",
                "arguments": "{}",
            },
        ],
    )
    rec.response["big"] = 2**70
    rec.response["ratio"] = 0.1
    await store.save_response(rec)
    got = await store.get_response(OWNER, "resp_1")
    assert got == rec.response
    assert got is not None and list(got) == list(rec.response)  # key order kept
    assert await store.get_response(OWNER, "resp_missing") is None


async def test_response_without_output(store: SQLiteStore) -> None:
    rec = record("resp_1", OWNER, outputs=[])
    await store.save_response(rec)
    assert await store.get_response(OWNER, "resp_1") == rec.response
    assert await store.load_lineage(OWNER, "resp_1") == rec.input_items


async def test_save_again_replaces(store: SQLiteStore) -> None:
    await store.save_response(record("resp_1", OWNER))
    newer = record("resp_1", OWNER, outputs=[assistant("second", "out_2")])
    newer.status = "incomplete"
    await store.save_response(newer)
    assert await store.get_response(OWNER, "resp_1") == newer.response
    assert texts(await store.load_lineage(OWNER, "resp_1")) == ["question of resp_1", "second"]
    assert await store.get_items(OWNER, ["out_resp_1"]) == {}
    assert (await store.stats())["items"] == 2


async def test_delete(store: SQLiteStore) -> None:
    await store.save_response(record("resp_1", OWNER))
    await store.save_response(record("resp_2", OWNER, "resp_1"))
    assert await store.delete_response(OWNER, "resp_1") is True
    assert await store.delete_response(OWNER, "resp_1") is False
    assert await store.get_response(OWNER, "resp_1") is None
    assert await store.get_items(OWNER, ["in_resp_1", "out_resp_1"]) == {}
    # The child keeps its own rows.
    assert await store.get_response(OWNER, "resp_2") is not None
    assert texts(await store.load_lineage(OWNER, "resp_2")) == [
        "question of resp_2",
        "answer of resp_2",
    ]


async def test_failed_transaction_rolls_back(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    monkeypatch.setattr(store_module, "_INSERT_ITEM_SQL", "INSERT INTO nowhere VALUES (?)")
    with pytest.raises(sqlite3.OperationalError):
        await store.save_response(record("resp_1", OWNER))
    monkeypatch.undo()
    assert await store.get_response(OWNER, "resp_1") is None
    # The connections are not left inside a transaction.
    assert not store._db.in_transaction
    assert store._now is not None and not store._now.in_transaction
    await store.save_response(record("resp_2", OWNER))
    assert await store.get_response(OWNER, "resp_2") is not None


# -- lineage ---------------------------------------------------------------------------------


async def test_lineage_order_over_three_turns(store: SQLiteStore) -> None:
    await store.save_response(
        record(
            "resp_1",
            OWNER,
            inputs=[user("system-ish", "in_1a"), user("q1", "in_1b")],
            outputs=[assistant("a1", "out_1a"), assistant("a1 more", "out_1b")],
        )
    )
    await store.save_response(record("resp_2", OWNER, "resp_1"))
    await store.save_response(record("resp_3", OWNER, "resp_2"))
    assert texts(await store.load_lineage(OWNER, "resp_3")) == [
        "system-ish",
        "q1",
        "a1",
        "a1 more",
        "question of resp_2",
        "answer of resp_2",
        "question of resp_3",
        "answer of resp_3",
    ]
    assert texts(await store.load_lineage(OWNER, "resp_1")) == ["system-ish", "q1", "a1", "a1 more"]
    assert await store.load_lineage(OWNER, "resp_nope") is None


async def test_lineage_branches(store: SQLiteStore) -> None:
    await store.save_response(record("resp_root", OWNER))
    await store.save_response(record("resp_left", OWNER, "resp_root"))
    await store.save_response(record("resp_right", OWNER, "resp_root"))
    await store.save_response(record("resp_left2", OWNER, "resp_left"))
    root = ["question of resp_root", "answer of resp_root"]
    assert texts(await store.load_lineage(OWNER, "resp_right")) == [
        *root,
        "question of resp_right",
        "answer of resp_right",
    ]
    assert texts(await store.load_lineage(OWNER, "resp_left2")) == [
        *root,
        "question of resp_left",
        "answer of resp_left",
        "question of resp_left2",
        "answer of resp_left2",
    ]


async def test_lineage_starts_after_a_gap(store: SQLiteStore) -> None:
    for n in range(1, 5):
        await store.save_response(record(f"resp_{n}", OWNER, f"resp_{n - 1}" if n > 1 else None))
    assert await store.delete_response(OWNER, "resp_2")
    assert texts(await store.load_lineage(OWNER, "resp_4")) == [
        "question of resp_3",
        "answer of resp_3",
        "question of resp_4",
        "answer of resp_4",
    ]
    assert await store.load_lineage(OWNER, "resp_2") is None
    assert len(await store.load_lineage(OWNER, "resp_1") or []) == 2


async def test_lineage_survives_a_cycle(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway never makes one, but a loop must not recurse forever.
    monkeypatch.setattr(backend(store), "_MAX_LINEAGE_DEPTH", 5)
    await store.save_response(record("resp_a", OWNER, "resp_b"))
    await store.save_response(record("resp_b", OWNER, "resp_a"))
    assert len(await store.load_lineage(OWNER, "resp_a") or []) == 12


# -- owners ----------------------------------------------------------------------------------


async def test_owner_isolation_everywhere(store: SQLiteStore) -> None:
    await store.save_response(record("resp_1", OWNER))
    # Another owner's child of resp_1 (the handlers would refuse it; the store must not leak).
    await store.save_response(record("resp_2", OTHER, "resp_1"))

    assert await store.get_response(OTHER, "resp_1") is None
    assert await store.load_lineage(OTHER, "resp_1") is None
    assert texts(await store.load_lineage(OTHER, "resp_2")) == [
        "question of resp_2",
        "answer of resp_2",
    ]
    assert await store.list_input_items(OTHER, "resp_1") is None
    assert await store.get_items(OTHER, ["in_resp_1", "out_resp_1"]) == {}
    assert await store.delete_response(OTHER, "resp_1") is False
    assert await store.get_response(OWNER, "resp_1") is not None
    assert await store.get_items(OWNER, ["in_resp_2"]) == {}


async def test_owner_id(db_path: str) -> None:
    first = await SQLiteStore.open(db_path)
    alice = first.owner_id("sk-alice-secret")
    anonymous = first.owner_id(None)
    await first.close()

    assert alice != "sk-alice-secret" and "alice" not in alice
    assert len(alice) == 64 and int(alice, 16) >= 0
    assert anonymous == SQLiteStore.owner_id(await _reopen(db_path), "")

    again = await SQLiteStore.open(db_path)
    try:
        assert again.owner_id("sk-alice-secret") == alice
        assert again.owner_id("sk-bob") != alice
        assert again.owner_id(None) == anonymous
    finally:
        await again.close()

    keyed = await SQLiteStore.open(db_path, owner_secret=b"operator key")
    try:
        assert keyed.owner_id("sk-alice-secret") != alice
        assert keyed.owner_id("sk-alice-secret") == keyed.owner_id("sk-alice-secret")
    finally:
        await keyed.close()
    assert b"sk-alice-secret" not in await asyncio.to_thread(Path(db_path).read_bytes)


async def _reopen(db_path: str) -> SQLiteStore:
    # owner_id needs no open connection: it only uses the key loaded at open.
    opened = await SQLiteStore.open(db_path)
    await opened.close()
    return opened


# -- input items, item references ------------------------------------------------------------


async def test_list_input_items_pagination(store: SQLiteStore) -> None:
    inputs = [user(f"m{n}", f"i{n}") for n in range(7)]
    await store.save_response(record("resp_1", OWNER, inputs=inputs))

    async def page(**kwargs: Any) -> tuple[list[str], bool]:
        got = await store.list_input_items(OWNER, "resp_1", **kwargs)
        assert got is not None
        return [item["id"] for item in got.data], got.has_more

    assert await page() == (["i6", "i5", "i4", "i3", "i2", "i1", "i0"], False)
    assert await page(order="asc") == (["i0", "i1", "i2", "i3", "i4", "i5", "i6"], False)
    assert await page(limit=3) == (["i6", "i5", "i4"], True)
    assert await page(limit=3, after="i4") == (["i3", "i2", "i1"], True)
    assert await page(limit=3, after="i1") == (["i0"], False)
    assert await page(order="asc", limit=3, after="i2") == (["i3", "i4", "i5"], True)
    assert await page(order="asc", limit=3, after="i3") == (["i4", "i5", "i6"], False)
    # `before`: the items just before the cursor in reading order, still in that order.
    assert await page(order="asc", limit=2, before="i4") == (["i2", "i3"], True)
    assert await page(order="asc", limit=5, before="i4") == (["i0", "i1", "i2", "i3"], False)
    assert await page(limit=2, before="i2") == (["i4", "i3"], True)
    assert await page(limit=2, before="i4") == (["i6", "i5"], False)
    assert await page(order="asc", after="i1", before="i5") == (["i2", "i3", "i4"], False)
    assert await page(order="asc", limit=2, after="i1", before="i5") == (["i2", "i3"], True)
    assert await page(limit=1, after="i6", before="i4") == (["i5"], False)
    assert await page(after="unknown") == ([], False)
    assert await page(order="asc", limit=100) == ([f"i{n}" for n in range(7)], False)

    # Output items are not input items.
    assert "out_resp_1" not in (await page())[0]
    assert await store.list_input_items(OWNER, "resp_missing") is None
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "sideways"}):
        with pytest.raises(ValueError):
            await store.list_input_items(OWNER, "resp_1", **bad)


async def test_get_items(store: SQLiteStore) -> None:
    await store.save_response(record("resp_1", OWNER))
    # A client that resends earlier output as input stores the id twice: the latest wins.
    resent = assistant("answer of resp_1 (resent)", "out_resp_1")
    await store.save_response(record("resp_2", OWNER, inputs=[resent, user("q2", "in_2")]))
    got = await store.get_items(OWNER, ["in_resp_1", "out_resp_1", "in_2", "nope", "in_2"])
    assert set(got) == {"in_resp_1", "out_resp_1", "in_2"}
    assert got["out_resp_1"] == resent
    assert got["in_resp_1"]["content"][0]["text"] == "question of resp_1"
    assert await store.get_items(OWNER, []) == {}
    many = [f"missing_{n}" for n in range(1200)] + ["in_2"]
    assert set(await store.get_items(OWNER, many)) == {"in_2"}


# -- retention, health, maintenance ----------------------------------------------------------


async def test_purge_expired_in_batches(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend(store), "_PURGE_BATCH", 7)
    now = 1_800_000_000.0
    for n in range(23):
        await store.save_response(record(f"resp_old{n}", OWNER, expires_at=now - n))
    await store.save_response(record("resp_future", OWNER, expires_at=now + 1))
    await store.save_response(record("resp_forever", OWNER))

    transactions = count_write_transactions(store, monkeypatch)
    assert await store.purge_expired(now) == 23
    assert len(transactions) == 5  # 7 + 7 + 7 + 2, then one that finds nothing more
    assert await store.purge_expired(now) == 0
    stats = await store.stats()
    assert stats["responses"] == 2 and stats["items"] == 4
    assert await store.get_response(OWNER, "resp_future") is not None
    assert await store.purge_expired(now + 1) == 1


async def test_purge_uses_the_clock(store: SQLiteStore) -> None:
    await store.save_response(record("resp_1", OWNER, expires_at=time.time() - 1))
    assert await store.purge_expired() == 1


async def test_expired_is_gone_before_the_purge(store: SQLiteStore) -> None:
    now = time.time()
    # The same item id in a live response and, stored later, in an expired one.
    shared = assistant("shared, live copy", "shared")
    await store.save_response(
        record("resp_live", OWNER, inputs=[shared, user("q", "in_live")], expires_at=now + 3600)
    )
    stale = assistant("shared, expired copy", "shared")
    await store.save_response(
        record("resp_old", OWNER, inputs=[stale, user("q", "in_old")], expires_at=now - 1)
    )

    assert await store.get_response(OWNER, "resp_old") is None
    assert await store.load_lineage(OWNER, "resp_old") is None
    assert await store.list_input_items(OWNER, "resp_old") is None
    assert await store.get_items(OWNER, ["in_old", "out_resp_old"]) == {}
    assert await store.get_items(OWNER, ["shared"]) == {"shared": shared}
    assert await store.delete_response(OWNER, "resp_old") is False
    # Not purged, nor deleted by the refused DELETE: the reads themselves hide it.
    assert (await store.stats())["responses"] == 2

    assert await store.get_response(OWNER, "resp_live") is not None
    assert texts(await store.load_lineage(OWNER, "resp_live")) == [
        "shared, live copy",
        "q",
        "answer of resp_live",
    ]
    page = await store.list_input_items(OWNER, "resp_live")
    assert page is not None and len(page.data) == 2
    assert set(await store.get_items(OWNER, ["in_live", "out_resp_live"])) == {
        "in_live",
        "out_resp_live",
    }
    assert await store.delete_response(OWNER, "resp_live") is True


async def test_live_descendant_keeps_its_expired_ancestors(store: SQLiteStore) -> None:
    now = time.time()
    await store.save_response(record("resp_1", OWNER, expires_at=now - 30))
    await store.save_response(record("resp_2", OWNER, "resp_1", expires_at=now - 20))
    await store.save_response(record("resp_3", OWNER, "resp_2", expires_at=now + 3600))
    whole = [f"{kind} of resp_{n}" for n in (1, 2, 3) for kind in ("question", "answer")]

    for _ in range(2):
        assert texts(await store.load_lineage(OWNER, "resp_3")) == whole
        assert await store.purge_expired() == 0
    assert texts(await store.load_lineage(OWNER, "resp_3")) == whole
    # Kept as context only: not addressable themselves.
    assert await store.load_lineage(OWNER, "resp_2") is None
    assert await store.get_response(OWNER, "resp_1") is None
    assert await store.get_items(OWNER, ["in_resp_1", "out_resp_2"]) == {}

    # Once the leaf expires too, the whole chain goes in one run.
    assert await store.purge_expired(now + 7200) == 3
    stats = await store.stats()
    assert (stats["responses"], stats["items"]) == (0, 0)


async def test_purge_removes_dead_chains_in_one_run_and_keeps_live_ones(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend(store), "_PURGE_BATCH", 7)
    now = 1_800_000_000.0
    dead = 0

    async def chain(prefix: str, length: int, leaf_expires: float | None) -> None:
        nonlocal dead
        for n in range(length):
            expires = leaf_expires if n == length - 1 else now - 100 + n
            prev = f"{prefix}{n - 1}" if n else None
            await store.save_response(record(f"{prefix}{n}", OWNER, prev, expires_at=expires))
            dead += prefix.startswith("dead")

    await chain("dead_long", 40, now - 1)
    await chain("live_", 12, now + 1)
    await chain("forever_", 3, None)
    # A dead tree: its branch point becomes a leaf once both branches are gone.
    await chain("dead_tree", 3, now - 1)
    await store.save_response(record("dead_branch", OWNER, "dead_tree0", expires_at=now - 1))
    dead += 1
    # Another owner's child does not keep a response (the lineage walk would not reach it).
    await store.save_response(record("dead_lone", OWNER, expires_at=now - 1))
    await store.save_response(record("other_child", OTHER, "dead_lone", expires_at=now + 1))
    dead += 1

    transactions = count_write_transactions(store, monkeypatch)
    assert await store.purge_expired(now) == dead == 45
    # A chain goes up to a batch at a time, not one transaction per turn.
    assert len(transactions) <= dead // 7 + 3
    assert await store.purge_expired(now) == 0
    assert (await store.stats())["responses"] == 12 + 3 + 1
    lineage = texts(await store.load_lineage(OWNER, "live_11"))
    assert lineage[:2] == ["question of live_0", "answer of live_0"] and len(lineage) == 24
    assert await store.get_response(OTHER, "other_child") is not None


async def test_a_live_leaf_keeps_only_its_own_branch(store: SQLiteStore) -> None:
    now = time.time()
    await store.save_response(record("resp_root", OWNER, expires_at=now - 50))
    await store.save_response(record("resp_l1", OWNER, "resp_root", expires_at=now - 40))
    await store.save_response(record("resp_l2", OWNER, "resp_l1", expires_at=now + 3600))
    await store.save_response(record("resp_r1", OWNER, "resp_root", expires_at=now - 40))
    await store.save_response(record("resp_r2", OWNER, "resp_r1", expires_at=now - 30))
    failed = record("resp_r3", OWNER, "resp_r1", expires_at=now - 30)
    failed.status = "failed"
    await store.save_response(failed)
    # A live middle turn that the user deletes leaves a gap, which frees what lies above it.
    await store.save_response(record("resp_g1", OWNER, expires_at=now - 50))
    await store.save_response(record("resp_g2", OWNER, "resp_g1", expires_at=now + 3600))
    await store.save_response(record("resp_g3", OWNER, "resp_g2", expires_at=now + 3600))
    assert await store.delete_response(OWNER, "resp_g2") is True

    assert await store.purge_expired() == 4  # r1, r2, r3 and g1
    assert texts(await store.load_lineage(OWNER, "resp_l2")) == [
        f"{kind} of resp_{name}" for name in ("root", "l1", "l2") for kind in ("question", "answer")
    ]
    assert texts(await store.load_lineage(OWNER, "resp_g3")) == [
        "question of resp_g3",
        "answer of resp_g3",
    ]
    stats = await store.stats()
    assert (stats["responses"], stats["items"]) == (4, 8)  # root, l1, l2, g3


@pytest.mark.parametrize("batch", [3, 60])  # mostly dead leaves / mostly the walk upwards
@pytest.mark.parametrize("seed", range(3))
async def test_purge_keeps_exactly_the_ancestors_of_live_responses(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, seed: int, batch: int
) -> None:
    # Random forests against the rule itself: after one purge run, what remains is every live
    # response and every expired one with a live descendant, nothing else.
    monkeypatch.setattr(backend(store), "_PURGE_BATCH", batch)
    rng = random.Random(seed)
    now = 1_800_000_000.0
    parents: dict[str, str | None] = {}
    live: set[str] = set()
    for n in range(150):
        name = f"resp_{n}"
        parent = rng.choice([None, *parents]) if parents and rng.random() < 0.85 else None
        if parent is not None and rng.random() < 0.6:
            parent = f"resp_{n - 1}"  # mostly long chains, as conversations are
        alive = rng.random() < 0.15
        await store.save_response(
            record(name, OWNER, parent, expires_at=now + 1 if alive else now - 1)
        )
        parents[name] = parent
        live |= {name} if alive else set()

    kept = set()
    for name in live:
        node: str | None = name
        while node is not None and node not in kept:
            kept.add(node)
            node = parents[node]
    assert await store.purge_expired(now) == len(parents) - len(kept)
    assert await stored_ids(store) == kept


async def test_purge_finds_children_through_an_index(sqlite_store: SQLiteStore) -> None:
    plan = await sqlite_store._read("EXPLAIN QUERY PLAN " + store_module._PURGE_SQL, (0.0, 1))
    details = [row[-1] for row in plan]
    children = [d for d in details if "SEARCH c " in d]
    assert len(children) == 2 and all("INDEX responses_children" in d for d in children), details


async def test_save_is_shielded_from_cancellation(db_path: str) -> None:
    store = await SQLiteStore.open(db_path)
    inputs = [user("x" * 2000, f"in_{n}") for n in range(3000)]
    task = asyncio.create_task(store.save_response(record("resp_big", OWNER, inputs=inputs)))
    # Wait until the transaction holds the connection, then hang up like a client would.
    for _ in range(10_000):
        if store._lock.locked():
            break
        await asyncio.sleep(0)
    task.cancel()
    with closing(sqlite3.connect(db_path)) as plain:  # not committed yet: the cancel lands mid-save
        assert plain.execute("SELECT count(*) FROM responses").fetchone()[0] == 0
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()  # waits for the shielded write

    reopened = await SQLiteStore.open(db_path)
    try:
        lineage = await reopened.load_lineage(OWNER, "resp_big")
        assert lineage is not None and len(lineage) == 3001
    finally:
        await reopened.close()


async def test_check_writable(sqlite_store: SQLiteStore, db_path: str) -> None:
    store = sqlite_store
    assert await store.check_writable() is True
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert await store.check_writable(timeout=0.2) is False
        blocker.execute("COMMIT")
    finally:
        blocker.close()
    # The heartbeat that timed out was still waiting for the lock and now finishes.
    assert await store.check_writable(timeout=5) is True
    await store.close()
    assert await store.check_writable() is False


async def test_stats_and_vacuum(sqlite_store: SQLiteStore, db_path: str) -> None:
    store = sqlite_store
    empty = await store.stats()
    assert empty["responses"] == 0 and empty["oldest_created_at"] is None
    for n in range(30):
        await store.save_response(
            record(f"resp_{n}", OWNER, inputs=[user("y" * 5000, f"in_{n}")], created_at=100 + n)
        )
    full = await store.stats()
    assert full["responses"] == 30 and full["items"] == 60
    assert (full["oldest_created_at"], full["newest_created_at"]) == (100, 129)
    assert full["journal_mode"] == "wal" and full["schema_version"] == SCHEMA_VERSION
    assert full["db_bytes"] > 150_000
    assert await store.purge_expired() == 0
    for n in range(30):
        await store.delete_response(OWNER, f"resp_{n}")
    await store.vacuum()
    after = await store.stats()
    assert after["db_bytes"] < full["db_bytes"] and after["free_bytes"] == 0
    assert after["wal_bytes"] == 0
    assert after["file_bytes"] == await asyncio.to_thread(os.path.getsize, db_path)


# -- several processes -----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from orp_proxy.store.sqlite import SQLiteStore, StoredResponse

    async def bump(store):
        rows = await store._fetch("SELECT value FROM meta WHERE key = 'counter'")
        value = int(rows[0][0]) + 1 if rows else 1
        await store._fetch(
            "INSERT INTO meta (key, value) VALUES ('counter', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(value),),
        )

    async def main(path, name, go):
        store = await SQLiteStore.open(path)
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.002)
        owner = store.owner_id(name)
        errors = []
        limit = asyncio.Semaphore(16)

        async def cycle(n):
            async with limit:
                try:
                    if n:
                        await store.load_lineage(owner, f"resp_{name}_{n - 1}")
                    await store.get_items(owner, [f"in_{name}_{n - 1}"])
                    await store.save_response(StoredResponse(
                        id=f"resp_{name}_{n}", owner=owner,
                        previous_response_id=f"resp_{name}_{n - 1}" if n else None,
                        created_at=n, status="completed",
                        response={"id": f"resp_{name}_{n}", "output": [
                            {"type": "message", "id": f"out_{name}_{n}", "role": "assistant",
                             "content": [{"type": "output_text", "text": "ok"}]}]},
                        input_items=[{"type": "message", "id": f"in_{name}_{n}", "role": "user",
                                      "content": [{"type": "input_text", "text": "hi"}]}],
                    ))
                    # Read-modify-write inside one transaction: the case where a deferred
                    # BEGIN fails at once with "database is locked".
                    await store._write(lambda: bump(store))
                    if n % 50 == 49:
                        await store.purge_expired()
                except Exception as error:
                    errors.append(repr(error))

        await asyncio.gather(*(cycle(n) for n in range(200)))
        await store.close()
        print(json.dumps({"errors": errors}), flush=True)

    asyncio.run(main(*sys.argv[1:4]))
    """
)


def test_several_processes_never_see_locked(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")  # fresh: the workers also race to create it
    go = tmp_path / "go"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, path, f"w{n}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )
        for n in range(3)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready", worker.stderr
        go.touch()
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=60)
            assert worker.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    errors = [error for result in results for error in result["errors"]]
    assert errors == []
    plain = sqlite3.connect(path)
    try:
        assert plain.execute("SELECT count(*) FROM responses").fetchone()[0] == 600
        assert plain.execute("SELECT count(*) FROM items").fetchone()[0] == 1200
        # No lost update among the 600 read-modify-write transactions.
        assert plain.execute("SELECT value FROM meta WHERE key = 'counter'").fetchone()[0] == "600"
    finally:
        plain.close()


async def test_a_failed_save_rolls_back_and_the_next_one_works(store: SQLiteStore) -> None:
    bad = record("resp_bad", OWNER)
    bad.previous_response_id = ["not", "a", "string"]  # type: ignore[assignment]
    with pytest.raises((sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)):
        await store.save_response(bad)
    assert await store.get_response(OWNER, "resp_bad") is None
    await store.save_response(record("resp_good", OWNER))  # no transaction left open
    assert await store.get_response(OWNER, "resp_good") is not None


async def test_concurrent_saves_share_transactions_and_a_bad_one_fails_alone(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    begins: list[str] = []

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN"):
            begins.append(sql)

    # Saves are written on the event loop's connection, or in the thread's when that one waits.
    await store._db.set_trace_callback(trace)
    assert store._now is not None
    store._now.set_trace_callback(trace)
    good = [record(f"resp_{i}", OWNER) for i in range(50)]
    bad = record("resp_bad", OWNER)
    bad.previous_response_id = ["not", "a", "string"]  # type: ignore[assignment]
    results = await asyncio.gather(*(store.save_response(r) for r in good[:25]),
                                   store.save_response(bad),
                                   *(store.save_response(r) for r in good[25:]),
                                   return_exceptions=True)
    await store._db.set_trace_callback(None)
    store._now.set_trace_callback(None)
    assert isinstance(results[25], sqlite3.Error)
    assert [r for i, r in enumerate(results) if i != 25] == [None] * 50
    for rec in good:
        assert await store.get_response(OWNER, rec.id) is not None
    assert await store.get_response(OWNER, "resp_bad") is None
    # Group commit: 51 saves queued together need far fewer than 51 transactions.
    assert 1 <= len(begins) <= 3, begins


async def test_saves_are_written_on_the_event_loop_when_the_lock_is_free(
        sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """No trip to the connection's thread for a save nobody else's write holds up; its WAL
    frames are checkpointed by the thread every `_CHECKPOINT_SAVES` saves (the loop's
    connection never checkpoints: that syncs the file)."""
    store = sqlite_store
    monkeypatch.setattr(store_module, "_CHECKPOINT_SAVES", 3)
    on_loop: list[str] = []
    in_thread: list[str] = []
    assert store._now is not None
    store._now.set_trace_callback(on_loop.append)
    await store._db.set_trace_callback(in_thread.append)
    for i in range(4):
        await store.save_response(record(f"resp_{i}", OWNER, None if i == 0 else f"resp_{i - 1}"))
    await store._db.set_trace_callback(None)
    store._now.set_trace_callback(None)
    assert on_loop.count("BEGIN IMMEDIATE") == 4 and on_loop.count("COMMIT") == 4
    assert [sql for sql in in_thread if not sql.startswith("PRAGMA wal_checkpoint")] == []
    assert len(in_thread) == 1
    assert len(texts(await store.load_lineage(OWNER, "resp_3"))) == 8


async def test_close_writes_every_queued_save_first(store_url: str) -> None:
    # More saves than one batch takes, all queued before close(): each is written and each
    # caller returns, although the batches after the first start while the store is closing.
    store = await open_store(Settings(store_url=store_url))
    count = 3 * backend(store)._SAVE_BATCH + 5
    saves = [asyncio.create_task(store.save_response(record(f"resp_{i}", OWNER)))
             for i in range(count)]
    await asyncio.sleep(0)  # every save is queued, the first batch has started
    async with asyncio.timeout(30):
        await store.close()
        results = await asyncio.gather(*saves, return_exceptions=True)
    assert results == [None] * count
    reopened = await open_store(Settings(store_url=store_url))
    try:
        assert (await reopened.stats())["responses"] == count
    finally:
        await reopened.close()


async def test_close_fails_saves_a_cancelled_saver_left_behind(db_path: str) -> None:
    # The saver's task is cancelled (as at loop shutdown) before it ran: close() fails the
    # saves still queued instead of leaving their callers waiting forever.
    store = await SQLiteStore.open(db_path)
    async with store._lock:  # the saver is started but cannot take the connection yet
        saves = [asyncio.create_task(store.save_response(record(f"resp_{i}", OWNER)))
                 for i in range(3)]
        await asyncio.sleep(0)
        assert store._saver is not None
        store._saver.cancel()
    async with asyncio.timeout(30):
        await store.close()
        results = await asyncio.gather(*saves, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "closed" in str(r) for r in results), results
    with pytest.raises(RuntimeError, match="closed"):
        await store.save_response(record("resp_late", OWNER))


# -- under pressure: a full database, a writer holding the lock --------------------------------


async def test_a_save_that_fills_the_database_fails_alone_and_says_why(
        sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture) -> None:
    """SQLITE_FULL (here from `max_page_count`) rolls the whole transaction back: the other
    saves of the batch are still written, and the log names the cause."""
    store = sqlite_store
    (pages,) = (await store._db.execute_fetchall("PRAGMA page_count"))[0]
    await store._db.execute_fetchall(f"PRAGMA max_page_count = {pages + 40}")
    small = [record(f"resp_{i}", OWNER) for i in range(20)]
    huge = record("resp_huge", OWNER, outputs=[assistant("x" * 2_000_000, "out_huge")])
    results = await asyncio.gather(*(store.save_response(r) for r in small[:10]),
                                   store.save_response(huge),
                                   *(store.save_response(r) for r in small[10:]),
                                   return_exceptions=True)
    assert isinstance(results[10], sqlite3.OperationalError), results[10]
    assert "full" in str(results[10])
    assert [r for i, r in enumerate(results) if i != 10] == [None] * 20
    for rec in small:
        assert await store.get_response(OWNER, rec.id) is not None
    assert await store.get_response(OWNER, "resp_huge") is None
    full = [r for r in caplog.records if "full" in r.getMessage() and "resp_huge" in
            r.getMessage()]
    assert full and full[0].levelname == "ERROR", [r.getMessage() for r in caplog.records]
    # Room again: the next save works (no transaction was left open).
    await store._db.execute_fetchall("PRAGMA max_page_count = 1073741823")
    await store.save_response(huge)
    assert await store.get_response(OWNER, "resp_huge") is not None


async def test_reads_do_not_wait_behind_a_write_waiting_for_the_lock(
        sqlite_store: SQLiteStore, db_path: str) -> None:
    """Another process's connection holds BEGIN IMMEDIATE; a save of ours waits for it (busy
    timeout), and meanwhile every read of ours answers from its own connection (WAL)."""
    store = sqlite_store
    import threading

    await store.save_response(record("resp_1", OWNER))
    await store.save_response(record("resp_2", OWNER, "resp_1"))
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            holding.set()
            release.wait(3)  # on a store whose reads queue behind the save: let them through
            other.execute("COMMIT")
        finally:
            other.close()

    blocker = threading.Thread(target=hold_the_write_lock)
    blocker.start()
    try:
        await asyncio.to_thread(holding.wait, 10)
        began = threading.Event()
        await store._db.set_trace_callback(
            lambda sql: began.set() if sql.startswith("BEGIN IMMEDIATE") else None)
        save = asyncio.create_task(store.save_response(record("resp_3", OWNER, "resp_2")))
        await asyncio.to_thread(began.wait, 10)  # the save is in SQLite's busy wait now
        found = await store.get_response(OWNER, "resp_2")
        lineage = await store.load_lineage(OWNER, "resp_2")
        items = await store.get_items(OWNER, ["in_resp_1"])
        page = await store.list_input_items(OWNER, "resp_2")
        assert not save.done(), "the reads waited for the write"
        assert found is not None and texts(lineage) == [
            "question of resp_1", "answer of resp_1", "question of resp_2", "answer of resp_2"]
        assert list(items) == ["in_resp_1"] and page is not None and len(page.data) == 1
    finally:
        release.set()
        await asyncio.to_thread(blocker.join, 10)
    await save
    assert await store.get_response(OWNER, "resp_3") is not None


async def test_an_event_batch_written_twice_changes_nothing(store: Any) -> None:
    """A batch appended again (its commit's reply was lost, so the writer retries) neither
    fails nor duplicates: a failure here would stall every background run of the worker."""
    queued = record("resp_bg", "owner-1", outputs=[])
    queued.status = queued.response["status"] = "queued"
    await store.start_run(queued, [StoredEvent(0, '{"n": 0}')], worker="w1",
                          lease_until=time.time() + 60)
    batch = EventBatch("resp_bg", "w1", [StoredEvent(1, '{"n": 1}'), StoredEvent(2, '{"n": 2}')])
    assert await store.append_events([batch]) == []
    assert await store.append_events([batch]) == []
    assert [e.seq for e in await store.read_events("resp_bg", -1)] == [0, 1, 2]
