"""Stored responses: what `previous_response_id`, `GET/DELETE /v1/responses/{id}` and
`/input_items` read, and what `item_reference` inputs resolve against.

`SQLiteStore` keeps everything in one SQLite file that every gunicorn worker opens with two
aiosqlite connections of its own: one for writes, one (`query_only`) for reads, which in WAL
mode never wait for a writer, so a GET does not queue behind a save that waits for another
process's write lock. Rules that keep several writing processes free of "database is locked"
and of half-written rows:

* WAL journal, `synchronous=NORMAL`, a `busy_timeout`, and every write transaction opened with
  `BEGIN IMMEDIATE`: a deferred transaction that upgrades from read to write gets `SQLITE_BUSY`
  at once, without waiting for the busy timeout.
* One asyncio lock serialises all statements on the write connection, so no statement runs inside
  another request's transaction; reads never touch that connection, so never see uncommitted data.
* Saves (group-committed, see `_write_pending_saves`) are written on the event loop through a
  third, plain sqlite3 connection with `busy_timeout` 0, holding that same lock: a thread trip
  costs more CPU than the inserts. When another process holds the write lock, BEGIN fails at
  once and the batch goes to the write connection's thread, which waits as before. That
  connection never checkpoints (a checkpoint syncs the file); the thread does, every 300 saves.
  Durability is the same on both: a committed save survives the process crashing; a power loss
  may lose the last commits since the latest checkpoint (WAL with `synchronous=NORMAL`), never
  the database.
* A save that hits `SQLITE_FULL` (which undoes the whole transaction, not only the statement)
  does not take its group-commit batch down with it: the batch is written again one save per
  transaction, and the log names the full disk.
* Writes run in their own task shielded from the caller's cancellation, so a client that hangs up
  mid-save cannot leave a transaction open or unfinished.

Layout: `responses` holds one row per response (the ResponseResource JSON with its `output`
emptied); `items` holds each input and output item once, in order. A conversation's context is
read with one recursive query that walks `previous_response_id` and joins the items, so the
items are never stored twice.

Retention: a response expires TTL after it was saved (`expires_at`, which the gateway computes
when it saves the finished response); but its content is kept as long as a live (unexpired)
response continues from it, so a conversation keeps its whole context while it is in use. An
expired response is gone at once for everything that addresses it (GET, DELETE, input items,
continuing from it, `item_reference` to its items): every read filters on `expires_at`, whether
or not the purge has run. `load_lineage` from a live response still walks through expired
ancestors. `purge_expired` deletes expired responses that no response (of the same owner, in any
state) continues from, leaf first and repeatedly, so a dead chain goes in one run, while a chain
with a live leaf keeps all its ancestors. Saves never touch ancestors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiosqlite
import ujson

from orp_proxy.config import ConfigError
from orp_proxy.store.base import (
    EventBatch,
    InputItemsPage,
    ResponseStore,
    RunInfo,
    StoredEvent,
    StoredResponse,
    check_page,
    page_bounds,
)
from orp_proxy.store.encoding import OUTPUT as _OUTPUT
from orp_proxy.store.encoding import encode_record, loads_list

__all__ = [
    "SCHEMA_VERSION",
    "InputItemsPage",
    "ResponseStore",
    "SQLiteStore",
    "StoredResponse",
    "check_path",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


# Guards the recursive walk against a cycle in previous_response_id (which the gateway never
# creates, but a hand-edited database could); far above any real conversation.
_MAX_LINEAGE_DEPTH = 100_000
_PURGE_BATCH = 500
# Stays well under SQLite's bound-parameter limit.
_IN_CHUNK = 500

# Forward migrations; entry N takes the schema from user_version N to N + 1. Never edit a
# released entry: append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        # `response` is the ResponseResource JSON with "output" set to []: the output items live
        # in `items` and are put back on read, so each item is stored once.
        """CREATE TABLE responses (
            rid                  INTEGER PRIMARY KEY,
            id                   TEXT NOT NULL UNIQUE,
            owner                TEXT NOT NULL,
            previous_response_id TEXT,
            created_at           INTEGER NOT NULL,
            status               TEXT NOT NULL,
            expires_at           REAL,
            response             TEXT NOT NULL
        )""",
        # Covers the lineage walk (id -> owner, parent) without touching the wide table rows.
        """CREATE INDEX responses_walk ON responses (id, owner, previous_response_id)""",
        """CREATE INDEX responses_expiry ON responses (expires_at)
            WHERE expires_at IS NOT NULL""",
        # kind 0 = input, 1 = output; (kind, seq) is the spec order within one response.
        """CREATE TABLE items (
            rid          INTEGER PRIMARY KEY,
            response_rid INTEGER NOT NULL REFERENCES responses (rid) ON DELETE CASCADE,
            kind         INTEGER NOT NULL,
            seq          INTEGER NOT NULL,
            item_id      TEXT,
            body         TEXT NOT NULL,
            UNIQUE (response_rid, kind, seq)
        )""",
        """CREATE INDEX items_by_id ON items (item_id) WHERE item_id IS NOT NULL""",
    ),
    (
        # The purge's "does anything continue from this response?" lookup.
        """CREATE INDEX responses_children ON responses (previous_response_id, owner)
            WHERE previous_response_id IS NOT NULL""",
    ),
    (
        # Background runs: one row per background response, gone with it. `keep_until`: when
        # a finished run's events may be dropped (`events_kept` 0 once they were).
        """CREATE TABLE runs (
            response_id      TEXT PRIMARY KEY REFERENCES responses (id) ON DELETE CASCADE,
            owner            TEXT NOT NULL,
            worker           TEXT NOT NULL,
            lease_until      REAL NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            finished         INTEGER NOT NULL DEFAULT 0,
            last_seq         INTEGER NOT NULL DEFAULT -1,
            keep_until       REAL,
            events_kept      INTEGER NOT NULL DEFAULT 1
        ) WITHOUT ROWID""",
        """CREATE INDEX runs_by_worker ON runs (worker) WHERE finished = 0""",
        """CREATE INDEX runs_by_lease ON runs (lease_until) WHERE finished = 0""",
        """CREATE INDEX runs_by_owner ON runs (owner) WHERE finished = 0""",
        """CREATE INDEX runs_by_keep ON runs (keep_until) WHERE events_kept = 1""",
        """CREATE TABLE events (
            response_id TEXT NOT NULL REFERENCES runs (response_id) ON DELETE CASCADE,
            seq         INTEGER NOT NULL,
            body        TEXT NOT NULL,
            PRIMARY KEY (response_id, seq)
        ) WITHOUT ROWID""",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)

# Only the addressed response must be live; its ancestors are walked whether expired or not.
_LINEAGE_SQL = """
WITH RECURSIVE chain (rid, parent, depth) AS (
    SELECT rid, previous_response_id, 0 FROM responses
    WHERE id = ?1 AND owner = ?2 AND (expires_at IS NULL OR expires_at > ?4)
    UNION ALL
    SELECT r.rid, r.previous_response_id, c.depth + 1
    FROM chain AS c JOIN responses AS r ON r.id = c.parent
    WHERE r.owner = ?2 AND c.depth < ?3
)
SELECT i.body FROM chain AS c LEFT JOIN items AS i ON i.response_rid = c.rid
ORDER BY c.depth DESC, i.kind, i.seq
"""

_GET_RESPONSE_SQL = """
SELECT r.response, i.body FROM responses AS r
LEFT JOIN items AS i ON i.response_rid = r.rid AND i.kind = 1
WHERE r.id = ? AND r.owner = ? AND (r.expires_at IS NULL OR r.expires_at > ?)
ORDER BY i.seq
"""

_UPSERT_RESPONSE_SQL = """
INSERT INTO responses
    (id, owner, previous_response_id, created_at, status, expires_at, response)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    owner = excluded.owner,
    previous_response_id = excluded.previous_response_id,
    created_at = excluded.created_at,
    status = excluded.status,
    expires_at = excluded.expires_at,
    response = excluded.response
RETURNING rid
"""

_INSERT_RESPONSE_SQL = """
INSERT INTO responses
    (id, owner, previous_response_id, created_at, status, expires_at, response)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

_INSERT_ITEM_SQL = (
    "INSERT INTO items (response_rid, kind, seq, item_id, body) VALUES (?, ?, ?, ?, ?)"
)

_INPUT_CURSORS_SQL = """
SELECT r.rid,
    (SELECT seq FROM items WHERE response_rid = r.rid AND kind = 0 AND item_id = ?3),
    (SELECT seq FROM items WHERE response_rid = r.rid AND kind = 0 AND item_id = ?4)
FROM responses AS r
WHERE r.id = ?1 AND r.owner = ?2 AND (r.expires_at IS NULL OR r.expires_at > ?5)
"""

# Up to ?2 expired responses that nothing continues from ("dead leaves"), then upwards from
# each the expired parents whose only child is the row below, so that a dead chain goes in one
# statement rather than one statement per turn. The walk is breadth first, so any prefix the
# LIMIT cuts it to still holds each row's children: what is left is again a dead chain. A
# branch point is reached from neither of its children; it becomes a leaf for the next batch.
# A "child" is of the same owner, as in the lineage walk.
_PURGE_SQL = """
WITH RECURSIVE doomed (rid, parent, owner) AS (
    SELECT * FROM (
        SELECT r.rid, r.previous_response_id, r.owner FROM responses AS r
        WHERE r.expires_at <= ?1 AND NOT EXISTS (
            SELECT 1 FROM responses AS c
            WHERE c.previous_response_id = r.id AND c.owner = r.owner)
        LIMIT ?2
    )
    UNION ALL
    SELECT p.rid, p.previous_response_id, p.owner
    FROM doomed AS d JOIN responses AS p ON p.id = d.parent AND p.owner = d.owner
    WHERE p.expires_at <= ?1 AND NOT EXISTS (
        SELECT 1 FROM responses AS c
        WHERE c.previous_response_id = p.id AND c.owner = p.owner AND c.rid <> d.rid)
    LIMIT ?2
)
DELETE FROM responses WHERE rid IN (SELECT rid FROM doomed) RETURNING rid
"""


class SQLiteStore:
    """`ResponseStore` on one SQLite file shared by all worker processes.

    Create with `await SQLiteStore.open(path)`, one per process, and `await close()` it on
    shutdown (an open aiosqlite connection keeps the process from exiting).
    """

    # SQLite cannot tell other processes of a change: background followers poll.
    notifies = False

    def __init__(self, db: aiosqlite.Connection, path: str, owner_key: bytes,
                 reader: aiosqlite.Connection | None = None,
                 now: sqlite3.Connection | None = None) -> None:
        self._db = db
        # Saves are written on the event loop through this connection when the write lock is
        # free (see `_write_pending_saves`); None for `:memory:` or without WAL.
        self._now = now
        self._now_saves = 0
        # Reads have a connection of their own: in WAL mode they need no lock, so they must not
        # queue behind a write of ours that waits for another process's write lock.
        self._reader = reader
        self._path = path
        self._owner_key = owner_key
        self._lock = asyncio.Lock()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._pending_saves: list[_PendingSave] = []
        self._saver: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(
        cls, path: str, *, owner_secret: bytes | None = None, busy_timeout_ms: int = 5000
    ) -> SQLiteStore:
        """Connect, set the pragmas, bring the schema up to date and load the owner key.

        `owner_secret` keys `owner_id`; without it a random key is created once and kept in
        the database, so every worker and every restart derive the same owners.
        """
        check_path(path)
        db = await _connect(path)
        try:
            # Before anything else, so that the journal-mode switch and the migration wait
            # for a concurrently starting worker instead of failing.
            await db.execute_fetchall(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            rows = await _switch_to_wal(db, busy_timeout_ms / 1000)
            if str(rows[0][0]).lower() != "wal":
                log.warning(
                    "SQLite store %s: journal_mode is %s, not WAL; concurrent workers will "
                    "block each other",
                    path,
                    rows[0][0],
                )
            await db.execute_fetchall("PRAGMA synchronous = NORMAL")
            await db.execute_fetchall("PRAGMA foreign_keys = ON")
            # Without a limit the WAL file keeps the size of its largest transaction
            # (a VACUUM: the whole database) until the last connection closes.
            await db.execute_fetchall("PRAGMA journal_size_limit = 67108864")
            stored_key = await _migrate(db, create_key=owner_secret is None)
            reader = None
            now = None
            if path != ":memory:" and str(rows[0][0]).lower() == "wal":
                reader = await _connect(path)
                try:
                    await reader.execute_fetchall(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                    await reader.execute_fetchall("PRAGMA query_only = ON")
                    # Load the schema now: a connection that first reads after another process
                    # shrank the file (VACUUM) and a third wrote got SQLITE_IOERR_SHORT_READ.
                    await reader.execute_fetchall("SELECT count(*) FROM meta")
                    now = _connect_now(path, busy_timeout_ms)
                except BaseException:
                    await reader.close()
                    raise
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):  # not a database, locked too long, disk full
                raise _open_error(path, exc) from None
            raise
        key = owner_secret if owner_secret is not None else stored_key
        assert key is not None
        return cls(db, path, key, reader, now)

    # -- plumbing ----------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # Every statement, even BEGIN or a PRAGMA, is run to completion here: a statement whose
        # rows are left unread stays active, which makes VACUUM fail and pins the read snapshot.
        return list(await self._db.execute_fetchall(sql, params))

    async def _in_thread(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` on the sqlite3 connection in aiosqlite's thread, in one hand-off.

        aiosqlite has no public call for this; `_execute` and `_conn` are what its own public
        methods are built on (setup.cfg caps the aiosqlite version; tests cover this path).
        """
        result: _T = await self._db._execute(work, self._db._conn)  # type: ignore[no-untyped-call]
        return result

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read statement: on the reader connection (no lock: it never writes, and each
        statement sees only committed data), else on the shared one under the lock."""
        if self._closing:
            raise RuntimeError("response store is closed")
        if self._reader is not None:
            try:
                return list(await self._reader.execute_fetchall(sql, params))
            except sqlite3.DatabaseError as exc:
                # Not seen since the reader reads the schema when it opens (a connection that
                # never had, read SQLITE_IOERR_SHORT_READ after another process's VACUUM); the
                # write connection still answers, as it did before readers had their own.
                log.warning("SQLite store %s: the read connection failed (%s); reading on "
                            "the write connection", self._path, exc)
        async with self._lock:
            return await self._fetch(sql, params)

    def _start_exclusive(self, body: Callable[[], Awaitable[_T]]) -> asyncio.Task[_T]:
        """Run `body` holding the connection lock, in a task the caller's cancellation
        cannot reach (the caller awaits it through `asyncio.shield`)."""
        if self._closing:
            raise RuntimeError("response store is closed")

        async def run() -> _T:
            async with self._lock:
                return await body()

        task = asyncio.get_running_loop().create_task(run())
        # The loop keeps only weak references to tasks; close() also waits for these.
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    def _start_transaction(self, body: Callable[[], Awaitable[_T]]) -> asyncio.Task[_T]:
        async def transaction() -> _T:
            await self._fetch("BEGIN IMMEDIATE")
            try:
                result = await body()
                await self._fetch("COMMIT")
            except BaseException:
                # SQLite may already have rolled back on its own (e.g. SQLITE_FULL).
                if self._db.in_transaction:
                    await self._fetch("ROLLBACK")
                raise
            return result

        return self._start_exclusive(transaction)

    async def _shielded(self, future: asyncio.Future[_T]) -> _T:
        """Await a write's outcome; the caller's cancellation does not stop the write."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Nobody will await the result any more; a failure must still reach the log.
            future.add_done_callback(_log_abandoned_failure)
            raise

    async def _write(self, body: Callable[[], Awaitable[_T]]) -> _T:
        return await self._shielded(self._start_transaction(body))

    # -- public API --------------------------------------------------------------------------

    def known_unavailable(self) -> bool:
        """Never: a local file is there or the worker would not have started."""
        return False

    def owner_id(self, credential: str | None) -> str:
        """HMAC-SHA256 (hex) of the credential under the store's key; None means anonymous."""
        message = (credential or "").encode("utf-8", "surrogatepass")
        return hmac.new(self._owner_key, message, hashlib.sha256).hexdigest()

    async def save_response(self, record: StoredResponse) -> None:
        """Insert or replace `record` with its input and output items in one transaction."""
        params, encoded = encode_record(record)
        if self._closing:
            raise RuntimeError("response store is closed")
        pending = _PendingSave(params, encoded, asyncio.get_running_loop().create_future())
        self._pending_saves.append(pending)
        if self._saver is None:
            self._saver = self._start_exclusive(self._write_pending_saves)
        await self._shielded(pending.done)

    async def _write_pending_saves(self) -> None:
        """Group commit: every save queued by now goes in one transaction, one thread trip.

        In a busy worker a trip to the connection's thread costs far more CPU (hand-offs, GIL
        contention) than the inserts themselves, so saves that arrive while a batch is being
        written wait for the next batch instead of taking a trip each. Each record has its own
        savepoint, so one bad record fails alone; callers return only once their batch committed.
        The loop runs until the queue is empty within one hold of the lock, so that saves queued
        before `close()` are written by this task rather than by one `close()` would refuse.
        """
        try:
            while self._pending_saves:
                batch = self._pending_saves[:_SAVE_BATCH]
                del self._pending_saves[:_SAVE_BATCH]
                try:
                    errors = self._save_now(batch)
                    if errors is None:
                        errors = await self._in_thread(partial(_save_batch, batch))
                except asyncio.CancelledError as exc:
                    _fail_saves(batch, exc)
                    raise
                except Exception as exc:
                    _fail_saves(batch, exc)
                    continue
                for pending, error in zip(batch, errors, strict=True):
                    if pending.done.done():
                        continue
                    if error is None:
                        pending.done.set_result(None)
                    else:
                        self._log_save_failure(pending, error)
                        pending.done.set_exception(error)
                if self._now_saves >= _CHECKPOINT_SAVES:
                    self._now_saves = 0
                    try:
                        await self._fetch("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:  # the next one may succeed; saves go on
                        log.warning("SQLite store %s: WAL checkpoint failed: %s", self._path,
                                    exc)
        finally:
            # No await between the emptiness check and this: a save queued from now on starts
            # a new saver.
            self._saver = None

    def _save_now(self, batch: list[_PendingSave]) -> list[Exception | None] | None:
        """The batch written on the event loop, or None (then nothing was written).

        A trip to the connection's thread costs the loop far more CPU than a small
        transaction (measured in a busy worker: ~200 µs per trip, GIL hand-offs included,
        against ~60 µs for the inserts), so a batch is written here when the write lock is
        free: `busy_timeout` 0 makes BEGIN fail at once rather than wait. Taken by another
        process, too large, or undone by SQLite (a full disk): the thread writes it, waiting
        and retrying as before. The commit is as durable as in the thread (same pragmas).
        """
        if self._now is None or sum(
                len(p.params[-1]) + sum(len(row[-1]) for row in p.items) for p in batch
        ) > _NOW_MAX_BYTES:
            return None
        errors = _save_now(batch, self._now)
        if errors is not None:
            self._now_saves += len(batch)
        return errors

    def _log_save_failure(self, pending: _PendingSave, error: Exception) -> None:
        """Name the cause an operator can act on; the caller logs its own view as well."""
        response_id = pending.params[0]
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            log.error("SQLite store %s is full (the disk, or max_page_count): response %s "
                      "(%d bytes) was not saved: %s", self._path, response_id,
                      len(pending.params[-1]) + sum(len(row[-1]) for row in pending.items),
                      error)
        else:
            log.error("SQLite store %s: response %s was not saved: %r", self._path,
                      response_id, error)

    async def load_lineage(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """Context for continuing from `response_id`, in spec order, from one query.

        `ancestor.input + ancestor.output + ... + target.input + target.output`; None if the
        target is unknown for this owner or expired; expired ancestors are included, an
        ancestor that is gone ends the walk there.
        """
        rows = await self._read(_LINEAGE_SQL, (response_id, owner, _MAX_LINEAGE_DEPTH, time.time()))
        if not rows:
            return None
        return loads_list(body for (body,) in rows if body is not None)

    async def get_response(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The ResponseResource as it was sent to the client, or None (unknown or expired)."""
        rows = await self._read(_GET_RESPONSE_SQL, (response_id, owner, time.time()))
        if not rows:
            return None
        response: dict[str, Any] = ujson.loads(rows[0][0])
        if "output" in response:
            # Same key position as when saved: the placeholder is replaced in place.
            response["output"] = loads_list(body for _, body in rows if body is not None)
        return response

    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Delete the response and its items (children keep theirs); False if unknown or
        expired (an expired one the purge keeps for a live descendant's context is not
        addressable any more)."""
        now = time.time()

        async def body() -> bool:
            rows = await self._fetch(
                "DELETE FROM responses WHERE id = ? AND owner = ? "
                "AND (expires_at IS NULL OR expires_at > ?) RETURNING rid",
                (response_id, owner, now),
            )
            return bool(rows)

        return await self._write(body)

    async def list_input_items(
        self,
        owner: str,
        response_id: str,
        *,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
        before: str | None = None,
    ) -> InputItemsPage | None:
        """A page of the response's input items, OpenAI style.

        `order` "desc" (newest first, the default) or "asc"; `after`/`before` are item ids
        excluded from the page, read in that order; `has_more` tells whether more items lie
        beyond the page in the direction of reading (towards the start for a `before`-only
        page). An unknown cursor gives an empty page. None if the response is unknown or
        expired.
        Raises ValueError for a `limit` outside 1..100 or another `order`.
        """
        check_page(limit, order)
        found = await self._read(
            _INPUT_CURSORS_SQL, (response_id, owner, after, before, time.time()))
        if not found:
            return None
        rid, after_seq, before_seq = found[0]
        page = page_bounds(order, after, before, after_seq, before_seq, top=1 << 62)
        if page is None:
            return InputItemsPage(data=[], has_more=False)
        rows = await self._read(
            "SELECT body FROM items WHERE response_rid = ? AND kind = 0 AND seq > ? "
            f"AND seq < ? ORDER BY seq {'ASC' if page.ascending else 'DESC'} LIMIT ?",
            (rid, page.low, page.high, limit + 1),
        )
        has_more = len(rows) > limit
        bodies = [body for (body,) in rows[:limit]]
        if page.reverse:
            bodies.reverse()
        return InputItemsPage(data=loads_list(bodies), has_more=has_more)

    async def get_items(self, owner: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Resolve `item_reference`s: input/output items of this owner's live responses by id.

        When an id was stored more than once (a client resending earlier output as input),
        the most recently stored live copy wins.
        """
        wanted = list(dict.fromkeys(item_ids))
        now = time.time()
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = await self._read(
                "SELECT i.item_id, i.body FROM items AS i "
                "JOIN responses AS r ON r.rid = i.response_rid "
                f"WHERE i.item_id IN ({marks}) AND r.owner = ? "
                "AND (r.expires_at IS NULL OR r.expires_at > ?) ORDER BY i.rid",
                (*chunk, owner, now),
            )
            for found_id, body in rows:
                found[found_id] = ujson.loads(body)
        return found

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete responses with `expires_at <= now` that no response continues from, and
        their items; returns the count.

        Dead chains go leaf first, each batch (up to 500 rows, its own transaction, so other
        writers in this and other workers get the lock in between) freeing the parents for the
        next, until a batch finds nothing: one run leaves no expired response without a child.
        """
        cutoff = time.time() if now is None else now
        total = 0
        while True:

            async def batch() -> int:
                return len(await self._fetch(_PURGE_SQL, (cutoff, _PURGE_BATCH)))

            deleted = await self._write(batch)
            total += deleted
            if not deleted:
                return total
            await asyncio.sleep(0)

    # -- background runs ---------------------------------------------------------------------

    async def start_run(self, record: StoredResponse, events: Sequence[StoredEvent], *,
                        worker: str, lease_until: float) -> None:
        """The queued response, its run and its first events, in one transaction."""
        params, items = encode_record(record)
        rows = [(record.id, e.seq, e.body) for e in events]
        run = (record.id, record.owner, worker, lease_until, max((e.seq for e in events),
                                                                 default=-1))

        def work(conn: sqlite3.Connection) -> None:
            _upsert_record(params, items, conn)
            conn.execute("INSERT INTO runs (response_id, owner, worker, lease_until, last_seq) "
                         "VALUES (?, ?, ?, ?, ?)", run).fetchall()
            _insert_events(rows, conn)

        await self._write(lambda: self._in_thread(work))

    async def update_response(self, record: StoredResponse) -> None:
        """One transaction: the row's object and status, and the output items replaced."""
        params, items = encode_record(record)
        outputs = [row for row in items if row[0] == _OUTPUT]

        def work(conn: sqlite3.Connection) -> None:
            found = conn.execute("UPDATE responses SET status = ?, response = ? WHERE id = ? "
                                 "RETURNING rid", (params[4], params[6], params[0])).fetchall()
            if found:
                rid = found[0][0]
                conn.execute("DELETE FROM items WHERE response_rid = ? AND kind = ?",
                             (rid, _OUTPUT)).fetchall()
                conn.executemany(_INSERT_ITEM_SQL, [(rid, *row) for row in outputs])

        await self._write(lambda: self._in_thread(work))

    async def append_events(self, batches: Sequence[EventBatch]) -> list[str]:
        """Every batch in one transaction (one thread trip)."""
        if not batches:
            return []
        return await self._write(lambda: self._in_thread(partial(_append_batches,
                                                                 list(batches))))

    async def read_events(self, response_id: str, after: int, limit: int = 500
                          ) -> list[StoredEvent]:
        rows = await self._read(
            "SELECT seq, body FROM events WHERE response_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (response_id, after, limit))
        return [StoredEvent(seq, body) for seq, body in rows]

    async def get_run(self, owner: str, response_id: str) -> RunInfo | None:
        rows = await self._read(
            "SELECT u.response_id, u.owner, u.worker, u.lease_until, u.cancel_requested, "
            "u.finished, u.last_seq, u.events_kept FROM runs AS u "
            "JOIN responses AS r ON r.id = u.response_id "
            "WHERE u.response_id = ? AND u.owner = ? "
            "AND (r.expires_at IS NULL OR r.expires_at > ?)",
            (response_id, owner, time.time()))
        return _run_info(rows[0]) if rows else None

    async def renew_leases(self, worker: str, response_ids: Sequence[str],
                           lease_until: float) -> None:
        ids = list(response_ids)

        async def body() -> None:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                await self._fetch(
                    f"UPDATE runs SET lease_until = ? WHERE worker = ? AND finished = 0 "
                    f"AND response_id IN ({','.join('?' * len(chunk))})",
                    (lease_until, worker, *chunk))

        if ids:
            await self._write(body)

    async def request_cancel(self, response_id: str) -> None:
        async def body() -> None:
            await self._fetch("UPDATE runs SET cancel_requested = 1 "
                              "WHERE response_id = ? AND finished = 0", (response_id,))

        await self._write(body)

    async def cancel_requests(self, worker: str) -> list[str]:
        rows = await self._read("SELECT response_id FROM runs WHERE worker = ? AND finished = 0 "
                                "AND cancel_requested = 1", (worker,))
        return [response_id for (response_id,) in rows]

    async def claim_expired_runs(self, worker: str, now: float, lease_until: float
                                 ) -> list[RunInfo]:
        async def body() -> list[Any]:
            return await self._fetch(
                "UPDATE runs SET worker = ?, lease_until = ? "
                "WHERE finished = 0 AND lease_until < ? RETURNING response_id, owner, worker, "
                "lease_until, cancel_requested, finished, last_seq, events_kept",
                (worker, lease_until, now))

        return [_run_info(row) for row in await self._write(body)]

    async def count_runs(self, owner: str) -> int:
        rows = await self._read("SELECT count(*) FROM runs WHERE owner = ? AND finished = 0",
                                (owner,))
        return int(rows[0][0])

    async def purge_events(self, now: float) -> int:
        async def body() -> int:
            rows = await self._fetch(
                "UPDATE runs SET events_kept = 0 WHERE events_kept = 1 AND keep_until <= ? "
                "RETURNING response_id", (now,))
            for (response_id,) in rows:
                await self._fetch("DELETE FROM events WHERE response_id = ?", (response_id,))
            return len(rows)

        return await self._write(body)

    async def wait_notice(self, topic: str, timeout: float) -> bool:  # noqa: ASYNC109
        await asyncio.sleep(timeout)
        return False

    async def check_writable(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
        """Readiness: does a one-row write transaction commit within `timeout` seconds?

        A slow probe's transaction keeps running; the next probe waits for that one rather
        than queueing another behind it.
        """
        if self._closing:
            return False
        if self._heartbeat is None or self._heartbeat.done():

            async def beat() -> None:
                await self._fetch(
                    "INSERT INTO meta (key, value) VALUES ('heartbeat', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (repr(time.time()),),
                )

            self._heartbeat = self._start_transaction(beat)
            # Marks a failure as retrieved even if every probe timed out before it.
            self._heartbeat.add_done_callback(_retrieve_quietly)
        try:
            await asyncio.wait_for(asyncio.shield(self._heartbeat), timeout)
        except Exception:
            return False
        return True

    async def stats(self) -> dict[str, Any]:
        """Row counts, file sizes, created_at range, schema version and journal mode."""
        if self._closing:
            raise RuntimeError("response store is closed")
        async with self._lock:
            counts = await self._fetch(
                "SELECT (SELECT count(*) FROM responses), (SELECT count(*) FROM items), "
                "(SELECT min(created_at) FROM responses), (SELECT max(created_at) FROM responses)"
            )
            pages = await self._fetch(
                "SELECT * FROM pragma_page_count(), pragma_page_size(), "
                "pragma_freelist_count(), pragma_user_version()"
            )
            mode = await self._fetch("PRAGMA journal_mode")
        responses, items, oldest, newest = counts[0]
        page_count, page_size, free_pages, version = pages[0]
        return {
            "path": self._path,
            "responses": responses,
            "items": items,
            "oldest_created_at": oldest,
            "newest_created_at": newest,
            "db_bytes": page_count * page_size,
            "free_bytes": free_pages * page_size,
            "file_bytes": _file_size(self._path),
            "wal_bytes": _file_size(self._path + "-wal"),
            "schema_version": version,
            "journal_mode": mode[0][0],
        }

    async def vacuum(self) -> None:
        """Checkpoint and truncate the WAL, then VACUUM (rebuilds the file without free pages)."""

        async def run() -> None:
            await self._fetch("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._fetch("VACUUM")
            # VACUUM writes the whole database through the WAL; give that space back too.
            await self._fetch("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._shielded(self._start_exclusive(run))

    async def close(self) -> None:
        """Let pending writes finish, then close the connection (idempotent)."""
        if self._closing:
            return
        self._closing = True
        # The saver is among these and empties the queue before it ends.
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        # Only a saver that was cancelled (loop shutdown) leaves saves behind: their callers
        # must hear of it rather than wait forever.
        left, self._pending_saves = self._pending_saves, []
        _fail_saves(left, RuntimeError("response store is closed"))
        async with self._lock:
            await self._db.close()
        if self._now is not None:
            self._now.close()
        if self._reader is not None:
            await self._reader.close()


_SAVE_BATCH = 64
# A batch this large (encoded bytes) is written in the thread, not on the event loop.
_NOW_MAX_BYTES = 256 * 1024
# Saves written on the event loop between two WAL checkpoints (in the thread). A checkpoint
# copies each page once however often it changed, and syncs twice: measured here, every 300
# saves costs 27 µs of CPU a save against 39 every 100 (24 every 1000), for a WAL of about
# 3000 pages (12 MB) at most; SQLite's own default is 1000 pages.
_CHECKPOINT_SAVES = 300


@dataclass
class _PendingSave:
    params: tuple[Any, ...]
    items: list[tuple[int, int, str | None, str]]
    done: asyncio.Future[None]


def _fail_saves(saves: list[_PendingSave], error: BaseException) -> None:
    for pending in saves:
        if not pending.done.done():
            pending.done.set_exception(error)


class _TransactionLost(Exception):
    """SQLite rolled the whole batch transaction back on its own (SQLITE_FULL, an I/O error)."""


def _write_one(conn: sqlite3.Connection, pending: _PendingSave) -> None:
    _upsert_record(pending.params, pending.items, conn)


def _save_together(batch: list[_PendingSave], conn: sqlite3.Connection, *,
                   begun: bool = False) -> list[Exception | None]:
    """The batch in one IMMEDIATE transaction (`begun`: already open), each record in its own
    savepoint; raises `_TransactionLost` if SQLite undid the transaction itself (then nothing
    was written)."""
    errors: list[Exception | None] = []
    if not begun:
        conn.execute("BEGIN IMMEDIATE")
    try:
        if len(batch) == 1:
            # Alone, a failed record fails the whole transaction: no savepoint needed (two
            # statements fewer, the common case when requests finish one at a time).
            try:
                _write_one(conn, batch[0])
            except Exception as exc:
                if not conn.in_transaction:
                    raise _TransactionLost() from exc
                conn.execute("ROLLBACK")
                return [exc]
            errors.append(None)
        for pending in batch if len(batch) > 1 else ():
            conn.execute("SAVEPOINT save")
            try:
                _write_one(conn, pending)
            except Exception as exc:
                if not conn.in_transaction:
                    raise _TransactionLost() from exc
                conn.execute("ROLLBACK TO save")
                errors.append(exc)
            else:
                errors.append(None)
            conn.execute("RELEASE save")
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # e.g. the WAL cannot grow: which record is unknowable
            raise _TransactionLost() from exc
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return errors


def _save_alone(pending: _PendingSave, conn: sqlite3.Connection) -> Exception | None:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            _write_one(conn, pending)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except Exception as exc:
        return exc
    return None


def _save_batch(batch: list[_PendingSave], conn: sqlite3.Connection) -> list[Exception | None]:
    """Write a batch of saves (runs in the connection's thread); one error per save or None.

    Normally one transaction. When SQLite undoes all of it (a full disk or `max_page_count`
    undoes the transaction, not just the statement), each save is written again in its own
    transaction, so only the saves that do not fit fail.
    """
    try:
        return _save_together(batch, conn)
    except _TransactionLost:
        return [_save_alone(pending, conn) for pending in batch]


def _save_now(batch: list[_PendingSave], conn: sqlite3.Connection
              ) -> list[Exception | None] | None:
    """`_save_batch` on the event loop's own connection, which never waits: None when the
    write lock is held (another process writes) or SQLite undid the transaction, and then
    nothing was written; the caller goes the waiting way, in the connection's thread."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error:
        return None
    try:
        return _save_together(batch, conn, begun=True)
    except _TransactionLost:
        return None


def _connect_now(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The event loop's write connection (see `SQLiteStore._write_pending_saves`)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # A checkpoint writes and syncs the database file: never on the event loop; the
        # store runs one in the thread every `_CHECKPOINT_SAVES` saves instead.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        # Load the schema now (as the reader does), then never wait for the write lock.
        conn.execute("SELECT count(*) FROM meta").fetchall()
        conn.execute("PRAGMA busy_timeout = 0")
    except BaseException:
        conn.close()
        raise
    return conn


def check_path(path: str) -> None:
    """ConfigError naming `path` and the reason when no SQLite store can live there: a missing
    or unwritable directory (SQLite also creates `-wal` and `-shm` files beside the database),
    a directory in the file's place, a file we may not read and write."""
    if path == ":memory:":
        return
    directory = os.path.dirname(os.path.abspath(path))
    reason = None
    if os.path.isdir(path):
        reason = "it is a directory"
    elif not os.path.isdir(directory):
        reason = f"the directory {directory} does not exist"
    elif not os.access(directory, os.W_OK | os.X_OK):
        reason = (f"the directory {directory} is not writable (SQLite creates its -wal and -shm "
                  "files there)")
    elif os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        reason = "the file is not readable and writable"
    elif not _looks_like_sqlite(path):
        reason = "the file is not an SQLite database"
    if reason is not None:
        raise ConfigError(f"ORP_DB_PATH={path}: {reason}")


async def _connect(path: str) -> aiosqlite.Connection:
    # isolation_level=None: the sqlite3 module must not open transactions behind our back;
    # we issue BEGIN IMMEDIATE / COMMIT ourselves.
    connecting = aiosqlite.connect(path, isolation_level=None)
    try:
        return await connecting
    except BaseException as exc:
        # aiosqlite stops its thread without waiting for it; if the loop closed first,
        # the thread would print a traceback about the closed loop on the way out.
        await asyncio.to_thread(connecting._thread.join, 5)
        if isinstance(exc, sqlite3.Error):
            raise _open_error(path, exc) from None
        raise


def _looks_like_sqlite(path: str) -> bool:
    """An absent or empty file (SQLite creates it), or one with SQLite's header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        return True
    except OSError:
        return True  # let SQLite report what it finds
    return not head or head == b"SQLite format 3\x00"


def _open_error(path: str, exc: sqlite3.Error) -> ConfigError:
    return ConfigError(f"ORP_DB_PATH={path}: cannot open the SQLite store ({exc})")


def _upsert_record(params: tuple[Any, ...], items: list[tuple[int, int, str | None, str]],
                   conn: sqlite3.Connection) -> None:
    try:
        # Nearly every save is of a new response: one plain INSERT, no items to delete.
        rid = conn.execute(_INSERT_RESPONSE_SQL, params).lastrowid
    except sqlite3.IntegrityError:
        # Saved before (or another constraint failed: the upsert raises that again). Only
        # the failed statement was undone; the transaction goes on.
        (rid,) = conn.execute(_UPSERT_RESPONSE_SQL, params).fetchall()[0]
        conn.execute("DELETE FROM items WHERE response_rid = ?", (rid,)).fetchall()
    if items:
        conn.executemany(_INSERT_ITEM_SQL, [(rid, *row) for row in items])


def _insert_events(rows: list[tuple[str, int, str]], conn: sqlite3.Connection) -> None:
    # OR IGNORE: a batch written again (after an error whose commit did happen) changes nothing.
    conn.executemany("INSERT OR IGNORE INTO events (response_id, seq, body) VALUES (?, ?, ?)",
                     rows)


def _append_batches(batches: list[EventBatch], conn: sqlite3.Connection) -> list[str]:
    """The inside of `append_events`' transaction (runs in the connection's thread)."""
    refused = []
    for batch in batches:
        held = conn.execute("SELECT 1 FROM runs WHERE response_id = ? AND worker = ? "
                            "AND finished = 0", (batch.response_id, batch.worker)).fetchall()
        if not held:
            refused.append(batch.response_id)
            continue
        if batch.events:
            _insert_events([(batch.response_id, e.seq, e.body) for e in batch.events], conn)
            conn.execute("UPDATE runs SET last_seq = ? WHERE response_id = ?",
                         (batch.events[-1].seq, batch.response_id)).fetchall()
        if batch.keep_until is not None:
            conn.execute("UPDATE runs SET finished = 1, keep_until = ? WHERE response_id = ?",
                         (batch.keep_until, batch.response_id)).fetchall()
    return refused


def _run_info(row: Sequence[Any]) -> RunInfo:
    response_id, owner, worker, lease_until, cancel, finished, last_seq, kept = row
    return RunInfo(response_id=response_id, owner=owner, worker=worker,
                   lease_until=float(lease_until), cancel_requested=bool(cancel),
                   finished=bool(finished), last_seq=int(last_seq), events_kept=bool(kept))


async def _switch_to_wal(db: aiosqlite.Connection, patience: float) -> list[Any]:
    """`PRAGMA journal_mode = WAL`, retried while another process creates the same file.

    The switch needs an exclusive lock and SQLite answers "database is locked" at once instead
    of calling the busy handler, so workers starting together on a new file would fail without
    this. Once the file is in WAL mode (it persists), the first try succeeds.
    """
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            return list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def _migrate(db: aiosqlite.Connection, *, create_key: bool) -> bytes | None:
    """Apply pending migrations and fetch (or create) the owner key, in one transaction.

    BEGIN IMMEDIATE makes a second worker starting at the same moment wait, then find the
    schema current and change nothing.
    """
    await db.execute_fetchall("BEGIN IMMEDIATE")
    try:
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this ORP ({SCHEMA_VERSION})"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                await db.execute_fetchall(statement)
        if version != SCHEMA_VERSION:
            await db.execute_fetchall(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("SQLite store migrated from schema %d to %d", version, SCHEMA_VERSION)
        key: bytes | None = None
        if create_key:
            await db.execute_fetchall(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('owner_secret', ?)",
                (secrets.token_hex(32),),
            )
            rows = list(
                await db.execute_fetchall("SELECT value FROM meta WHERE key = 'owner_secret'")
            )
            key = bytes.fromhex(rows[0][0])
        await db.execute_fetchall("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.execute_fetchall("ROLLBACK")
        raise
    return key


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _retrieve_quietly(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("store heartbeat failed: %r", task.exception())


def _log_abandoned_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("store write failed after its caller went away", exc_info=error)
