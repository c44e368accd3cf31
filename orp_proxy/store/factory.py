"""Open the response store the settings name: SQLite (the default) or PostgreSQL.

Also what `orp-proxy store migrate / status / copy` need: the schema state of either backend
without migrating it, and moving every stored response from one store to another.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from orp_proxy.config import ConfigError, Settings, StoreTarget, has_inline_password
from orp_proxy.store.base import ResponseStore

log = logging.getLogger("orp.store")


async def open_store(settings: Settings, *, target: StoreTarget | None = None,
                     migrate: bool = True) -> ResponseStore:
    """The store of `settings` (or `target`), open, its schema current, for this process."""
    chosen = target or settings.store_target()
    owner_secret = settings.resolved_owner_secret()
    if chosen.backend == "sqlite":
        from orp_proxy.store.sqlite import SQLiteStore

        return await SQLiteStore.open(chosen.path, owner_secret=owner_secret)
    from orp_proxy.store.postgres import PostgresStore

    return await PostgresStore.open(
        chosen.dsn, password=_password(settings, chosen), owner_secret=owner_secret,
        pool_size=settings.store_pool_size, connect_timeout=settings.store_connect_timeout,
        statement_timeout=settings.store_statement_timeout,
        statement_cache_size=settings.store_statement_cache, migrate=migrate,
        shown_url=chosen.shown())


def _password(settings: Settings, target: StoreTarget) -> str | None:
    password = settings.resolved_store_password()
    if has_inline_password(target.dsn):
        if password is not None:
            raise ConfigError("ORP_STORE_URL holds a password and ORP_STORE_PASSWORD_FILE (or "
                              "the credential 'store_password') names another: keep one")
        # Accepted (asyncpg reads it), but the URL is in the environment of every process.
        log.warning("ORP_STORE_URL holds a password: put it in ORP_STORE_PASSWORD_FILE or the "
                    "systemd credential 'store_password' instead")
    return password


async def schema_status(settings: Settings, target: StoreTarget | None = None
                        ) -> dict[str, Any]:
    """The store's schema version and the one this ORP needs, changing nothing."""
    chosen = target or settings.store_target()
    if chosen.backend == "postgresql":
        from orp_proxy.store import postgres

        status = await postgres.schema_status(
            chosen.dsn, password=_password(settings, chosen),
            connect_timeout=settings.store_connect_timeout)
    else:
        from orp_proxy.store import sqlite

        def read() -> int:
            with closing(sqlite3.connect(f"file:{chosen.path}?mode=ro", uri=True)) as db:
                return int(db.execute("PRAGMA user_version").fetchone()[0])

        try:
            version = await asyncio.to_thread(read)
        except sqlite3.OperationalError:  # no file yet
            version = 0
        status = {"backend": "sqlite", "schema_version": version,
                  "required_version": sqlite.SCHEMA_VERSION,
                  "pending_migrations": max(0, sqlite.SCHEMA_VERSION - version)}
    return {"store": chosen.shown(), **status}


# -- store copy ------------------------------------------------------------------------------


@dataclass
class _Row:
    """One stored response as kept: the JSON texts are copied, never re-encoded."""

    id: str
    owner: str
    previous_response_id: str | None
    created_at: int
    status: str
    expires_at: float | None
    response: str
    items: list[tuple[int, int, str | None, str]]


_COPY_BATCH = 200


async def copy_store(settings: Settings, source: StoreTarget, destination: StoreTarget
                     ) -> dict[str, Any]:
    """Copy every response with its items, and the owner-hash key, from `source` into the empty
    store `destination` (created or migrated first). Owners stay valid: the hashes are copied
    as they are and the destination takes the source's key."""
    if source == destination:
        raise ConfigError("--from and --to name the same store")
    # Migrates the source too (a copy reads the current layout), then the destination.
    source_store = await open_store(settings, target=source)
    await source_store.close()
    destination_store = await open_store(settings, target=destination)
    await destination_store.close()
    reader = _sqlite_rows if source.backend == "sqlite" else _postgres_rows
    writer = _SQLiteWriter(destination) if destination.backend == "sqlite" else \
        _PostgresWriter(destination, _password(settings, destination), settings)
    key = await (_sqlite_meta(source) if source.backend == "sqlite"
                 else _postgres_meta(source, _password(settings, source), settings))
    copied = items = 0
    await writer.start(key)
    try:
        batch: list[_Row] = []
        async for row in reader(source, settings):
            batch.append(row)
            if len(batch) >= _COPY_BATCH:
                await writer.write(batch)
                copied += len(batch)
                items += sum(len(r.items) for r in batch)
                batch = []
        if batch:
            await writer.write(batch)
            copied += len(batch)
            items += sum(len(r.items) for r in batch)
        await writer.finish()
    except BaseException:
        await writer.abort()
        raise
    return {"from": source.shown(), "to": destination.shown(), "responses": copied,
            "items": items}


async def _sqlite_meta(source: StoreTarget) -> str | None:
    def read() -> str | None:
        with closing(sqlite3.connect(source.path)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'owner_secret'").fetchone()
        return None if row is None else str(row[0])

    return await asyncio.to_thread(read)


async def _sqlite_rows(source: StoreTarget, settings: Settings) -> AsyncIterator[_Row]:
    db = sqlite3.connect(source.path, check_same_thread=False)
    try:
        last = 0
        while True:
            rows = await asyncio.to_thread(_sqlite_page, db, last)
            if not rows:
                return
            for row in rows:
                yield row[1]
            last = rows[-1][0]
    finally:
        db.close()


def _sqlite_page(db: sqlite3.Connection, after: int) -> list[tuple[int, _Row]]:
    responses = db.execute(
        "SELECT rid, id, owner, previous_response_id, created_at, status, expires_at, response "
        "FROM responses WHERE rid > ? ORDER BY rid LIMIT ?", (after, _COPY_BATCH)).fetchall()
    if not responses:
        return []
    rids = [r[0] for r in responses]
    found: dict[int, list[tuple[int, int, str | None, str]]] = {rid: [] for rid in rids}
    marks = ",".join("?" * len(rids))
    for rid, kind, seq, iid, body in db.execute(
            f"SELECT response_rid, kind, seq, item_id, body FROM items "
            f"WHERE response_rid IN ({marks}) ORDER BY response_rid, kind, seq", rids):
        found[rid].append((kind, seq, iid, body))
    return [(r[0], _Row(r[1], r[2], r[3], r[4], r[5], r[6], r[7], found[r[0]]))
            for r in responses]


async def _postgres_meta(source: StoreTarget, password: str | None, settings: Settings
                         ) -> str | None:
    from orp_proxy.store.postgres import connect

    con = await connect(source.dsn, password=password,
                        connect_timeout=settings.store_connect_timeout)
    try:
        value = await con.fetchval("SELECT value FROM meta WHERE key = 'owner_secret'")
    finally:
        await con.close()
    return None if value is None else str(value)


async def _postgres_rows(source: StoreTarget, settings: Settings) -> AsyncIterator[_Row]:
    from orp_proxy.store.postgres import connect

    con = await connect(source.dsn, password=_password(settings, source),
                        connect_timeout=settings.store_connect_timeout)
    try:
        last = 0
        while True:
            responses = await con.fetch(
                "SELECT rid, id, owner, previous_response_id, created_at, status, expires_at, "
                "response FROM responses WHERE rid > $1 ORDER BY rid LIMIT $2",
                last, _COPY_BATCH)
            if not responses:
                return
            rids = [r[0] for r in responses]
            found: dict[int, list[tuple[int, int, str | None, str]]] = {r: [] for r in rids}
            for rid, kind, seq, iid, body in await con.fetch(
                    "SELECT response_rid, kind, seq, item_id, body FROM items "
                    "WHERE response_rid = ANY($1::bigint[]) ORDER BY response_rid, kind, seq",
                    rids):
                found[rid].append((kind, seq, iid, body))
            for r in responses:
                yield _Row(r[1], r[2], r[3], r[4], r[5], r[6], r[7], found[r[0]])
            last = rids[-1]
    finally:
        await con.close()


class _SQLiteWriter:
    """Writes into a SQLite store in one transaction (a failed copy leaves it empty)."""

    def __init__(self, target: StoreTarget) -> None:
        self._db = sqlite3.connect(target.path, isolation_level=None, check_same_thread=False)

    async def start(self, key: str | None) -> None:
        def begin() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            (count,) = self._db.execute("SELECT count(*) FROM responses").fetchone()
            if count:
                raise ConfigError(f"the destination store already holds {count} responses; "
                                  "copy only into an empty one")
            if key is not None:
                self._db.execute("INSERT INTO meta (key, value) VALUES ('owner_secret', ?) "
                                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                 (key,))

        await asyncio.to_thread(begin)

    async def write(self, rows: list[_Row]) -> None:
        def insert() -> None:
            for row in rows:
                (rid,) = self._db.execute(
                    "INSERT INTO responses (id, owner, previous_response_id, created_at, "
                    "status, expires_at, response) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING rid",
                    (row.id, row.owner, row.previous_response_id, row.created_at, row.status,
                     row.expires_at, row.response)).fetchone()
                self._db.executemany(
                    "INSERT INTO items (response_rid, kind, seq, item_id, body) "
                    "VALUES (?, ?, ?, ?, ?)", [(rid, *item) for item in row.items])

        await asyncio.to_thread(insert)

    async def finish(self) -> None:
        await asyncio.to_thread(self._db.execute, "COMMIT")
        self._db.close()

    async def abort(self) -> None:
        def rollback() -> None:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()

        await asyncio.to_thread(rollback)


class _PostgresWriter:
    """Writes into a PostgreSQL store in one transaction (a failed copy leaves it empty)."""

    def __init__(self, target: StoreTarget, password: str | None, settings: Settings) -> None:
        self._target = target
        self._password = password
        self._settings = settings
        self._con: Any = None
        self._tx: Any = None

    async def start(self, key: str | None) -> None:
        from orp_proxy.store.postgres import connect

        self._con = await connect(self._target.dsn, password=self._password,
                                  connect_timeout=self._settings.store_connect_timeout)
        self._tx = self._con.transaction()
        await self._tx.start()
        # Nobody else writes while the copy runs (ORP should be stopped; this makes sure).
        await self._con.execute("LOCK TABLE responses, items IN EXCLUSIVE MODE")
        count = await self._con.fetchval("SELECT count(*) FROM responses")
        if count:
            raise ConfigError(f"the destination store already holds {count} responses; "
                              "copy only into an empty one")
        if key is not None:
            await self._con.execute(
                "INSERT INTO meta (key, value) VALUES ('owner_secret', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", key)

    async def write(self, rows: list[_Row]) -> None:
        from orp_proxy.store.postgres import _SAVE_BATCH_SQL

        columns: list[list[Any]] = [[r.id for r in rows], [r.owner for r in rows],
                                    [r.previous_response_id for r in rows],
                                    [r.created_at for r in rows], [r.status for r in rows],
                                    [r.expires_at for r in rows], [r.response for r in rows]]
        flat = [(n, *item) for n, row in enumerate(rows, 1) for item in row.items]
        await self._con.execute(_SAVE_BATCH_SQL, *columns, *(
            [entry[i] for entry in flat] for i in range(5)))

    async def finish(self) -> None:
        await self._tx.commit()
        await self._con.close()

    async def abort(self) -> None:
        if self._con is not None:
            try:
                if self._tx is not None:
                    await self._tx.rollback()
            finally:
                await self._con.close()
