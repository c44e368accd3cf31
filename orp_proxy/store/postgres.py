"""The response store on PostgreSQL, for several ORP hosts behind one load balancer.

Same semantics as `sqlite.SQLiteStore` (read its docstring for retention and the lineage walk);
what differs is how the database is reached:

* Every worker has a small asyncpg pool (`ORP_STORE_POOL_SIZE`). Each statement is a single
  implicit transaction except the migration, so PgBouncer in transaction mode works (with
  `ORP_STORE_STATEMENT_CACHE=0`, since it cannot keep prepared statements per client).
* Saves are group-committed per worker: one task writes every save queued meanwhile with one
  statement (arrays unnested on the server), so a busy worker pays one round trip for many
  responses. A batch that fails for a reason other than the database being away is retried one
  record at a time, so one bad record fails alone. Callers return once their batch committed.
* Availability: a failure to connect, a connection the server dropped (restart, failover,
  `pg_terminate_backend`), a server that is shutting down or starting, a read-only server (a
  standby after failover) or a statement timeout becomes `StoreUnavailable` (503
  `store_unavailable`). A statement that failed on a connection the server had dropped is tried
  once more on a fresh connection, so a database restart between two requests goes unnoticed.
  After a failed connect, requests fail at once for `_DOWN_SECONDS` instead of each waiting
  for the connect timeout; the pool reconnects by itself when the server is back.
* Migrations run in one transaction holding `pg_advisory_xact_lock`, so hosts starting together
  migrate once and the others wait, then find the schema current. The owner-hash key is created
  in the same transaction and kept in `meta`, so every host derives the same owners.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import ujson

from orp_proxy.config import ConfigError, redacted_store_url
from orp_proxy.store.base import (
    EventBatch,
    InputItemsPage,
    RunInfo,
    StoredEvent,
    StoredResponse,
    StoreUnavailable,
    check_page,
    page_bounds,
)
from orp_proxy.store.encoding import OUTPUT as _OUTPUT
from orp_proxy.store.encoding import encode_record, loads_list

__all__ = ["SCHEMA_VERSION", "PostgresStore", "is_unavailable"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_MAX_LINEAGE_DEPTH = 100_000
_PURGE_BATCH = 500
_SAVE_BATCH = 64
# After a failed connect, how long requests fail at once instead of trying again.
_DOWN_SECONDS = 0.5
# Key of the advisory lock that serialises migrations (any constant; "ORP store" in ASCII).
_MIGRATION_LOCK = 0x4F_52_50_5F_73_74_6F_72

# Forward migrations; entry N takes the schema from version N to N + 1. Never edit a released
# entry: append a new one. Tables and columns carry the SQLite store's names, so operators and
# `store copy` see the same layout on both.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE meta (
            key   text PRIMARY KEY,
            value text NOT NULL
        )""",
        # `response` is the ResponseResource JSON with "output" set to []; the output items
        # live in `items`. Text, not jsonb: the client gets back the exact bytes it was sent
        # (key order, number spelling).
        """CREATE TABLE responses (
            rid                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id                   text NOT NULL UNIQUE,
            owner                text NOT NULL,
            previous_response_id text,
            created_at           bigint NOT NULL,
            status               text NOT NULL,
            expires_at           double precision,
            response             text NOT NULL
        )""",
        """CREATE INDEX responses_expiry ON responses (expires_at)
            WHERE expires_at IS NOT NULL""",
        """CREATE INDEX responses_children ON responses (previous_response_id, owner)
            WHERE previous_response_id IS NOT NULL""",
        # No UNIQUE (response_rid, kind, seq): a save replaces a response's items in one
        # statement, whose DELETE runs after its INSERT.
        """CREATE TABLE items (
            rid          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            response_rid bigint NOT NULL REFERENCES responses (rid) ON DELETE CASCADE,
            kind         smallint NOT NULL,
            seq          integer NOT NULL,
            item_id      text,
            body         text NOT NULL
        )""",
        """CREATE INDEX items_order ON items (response_rid, kind, seq)""",
        """CREATE INDEX items_by_id ON items (item_id) WHERE item_id IS NOT NULL""",
    ),
    (
        # Background runs and their event logs, as in the SQLite store.
        """CREATE TABLE runs (
            response_id      text PRIMARY KEY REFERENCES responses (id) ON DELETE CASCADE,
            owner            text NOT NULL,
            worker           text NOT NULL,
            lease_until      double precision NOT NULL,
            cancel_requested boolean NOT NULL DEFAULT false,
            finished         boolean NOT NULL DEFAULT false,
            last_seq         integer NOT NULL DEFAULT -1,
            keep_until       double precision,
            events_kept      boolean NOT NULL DEFAULT true
        )""",
        """CREATE INDEX runs_by_worker ON runs (worker) WHERE NOT finished""",
        """CREATE INDEX runs_by_lease ON runs (lease_until) WHERE NOT finished""",
        """CREATE INDEX runs_by_owner ON runs (owner) WHERE NOT finished""",
        """CREATE INDEX runs_by_keep ON runs (keep_until) WHERE events_kept""",
        """CREATE TABLE events (
            response_id text NOT NULL REFERENCES runs (response_id) ON DELETE CASCADE,
            seq         integer NOT NULL,
            body        text NOT NULL,
            PRIMARY KEY (response_id, seq)
        )""",
    ),
)

# Notifications of background runs: payload "events:<response id>" (events appended) or
# "cancel:<worker>" (a run of that worker is to be cancelled).
_CHANNEL = "orp_background"
# A topic nobody waited on for this long is forgotten (its pending notice with it).
_TOPIC_IDLE = 60.0
_RUN_COLUMNS = ("response_id, owner, worker, lease_until, cancel_requested, finished, "
                "last_seq, events_kept")

SCHEMA_VERSION = len(_MIGRATIONS)

# The whole context as one JSON array body, built on the server: one row instead of one per
# item. Only the addressed response must be live; ancestors are walked expired or not.
_LINEAGE_SQL = """
WITH RECURSIVE chain (rid, parent, depth) AS (
    SELECT rid, previous_response_id, 0 FROM responses
    WHERE id = $1 AND owner = $2 AND (expires_at IS NULL OR expires_at > $4)
    UNION ALL
    SELECT r.rid, r.previous_response_id, c.depth + 1
    FROM chain AS c JOIN responses AS r ON r.id = c.parent
    WHERE r.owner = $2 AND c.depth < $3
)
SELECT count(*), string_agg(i.body, ',' ORDER BY c.depth DESC, i.kind, i.seq)
FROM chain AS c LEFT JOIN items AS i ON i.response_rid = c.rid
"""

_GET_RESPONSE_SQL = """
SELECT r.response,
    (SELECT string_agg(i.body, ',' ORDER BY i.seq) FROM items AS i
     WHERE i.response_rid = r.rid AND i.kind = 1)
FROM responses AS r
WHERE r.id = $1 AND r.owner = $2 AND (r.expires_at IS NULL OR r.expires_at > $3)
"""

# A batch of saves in one statement: upsert the responses, insert their items, and delete the
# items they had before (the DELETE sees the statement's snapshot, so not the new rows).
# $8 is each item's 1-based position of its response in the batch.
_SAVE_BATCH_SQL = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                         $6::float8[], $7::text[])
        AS t (id, owner, previous_response_id, created_at, status, expires_at, response)
), saved AS (
    INSERT INTO responses AS r
        (id, owner, previous_response_id, created_at, status, expires_at, response)
    SELECT * FROM input
    ON CONFLICT (id) DO UPDATE SET
        owner = excluded.owner,
        previous_response_id = excluded.previous_response_id,
        created_at = excluded.created_at,
        status = excluded.status,
        expires_at = excluded.expires_at,
        response = excluded.response
    RETURNING r.rid, r.id
), cleared AS (
    DELETE FROM items USING saved WHERE items.response_rid = saved.rid
)
INSERT INTO items (response_rid, kind, seq, item_id, body)
SELECT saved.rid, x.kind, x.seq, x.item_id, x.body
FROM unnest($8::int[], $9::smallint[], $10::int[], $11::text[], $12::text[])
    AS x (n, kind, seq, item_id, body)
JOIN saved ON saved.id = ($1::text[])[x.n]
"""

_INPUT_CURSORS_SQL = """
SELECT r.rid,
    (SELECT seq FROM items WHERE response_rid = r.rid AND kind = 0 AND item_id = $3),
    (SELECT seq FROM items WHERE response_rid = r.rid AND kind = 0 AND item_id = $4)
FROM responses AS r
WHERE r.id = $1 AND r.owner = $2 AND (r.expires_at IS NULL OR r.expires_at > $5)
"""

# As the SQLite store's purge: dead leaves, then upwards the expired parents whose only child
# is the row below, breadth first, so any prefix the LIMIT keeps is again a dead chain.
# PostgreSQL evaluates the recursive CTE lazily, so the outer LIMIT also ends the walk.
_PURGE_SQL = """
WITH RECURSIVE doomed (rid, parent, owner) AS (
    (SELECT r.rid, r.previous_response_id, r.owner FROM responses AS r
     WHERE r.expires_at <= $1 AND NOT EXISTS (
         SELECT 1 FROM responses AS c
         WHERE c.previous_response_id = r.id AND c.owner = r.owner)
     LIMIT $2)
    UNION ALL
    SELECT p.rid, p.previous_response_id, p.owner
    FROM doomed AS d JOIN responses AS p ON p.id = d.parent AND p.owner = d.owner
    WHERE p.expires_at <= $1 AND NOT EXISTS (
        SELECT 1 FROM responses AS c
        WHERE c.previous_response_id = p.id AND c.owner = p.owner AND c.rid <> d.rid)
), victims AS (
    SELECT rid FROM doomed LIMIT $2
)
DELETE FROM responses WHERE rid IN (SELECT rid FROM victims) RETURNING rid
"""

# SQLSTATE classes meaning "the database is not there for us right now": 08 connection
# exception, 57 operator intervention (shutdown, starting up, statement timeout or cancel),
# 53 insufficient resources (too many connections, disk full), 25006 read-only transaction
# (connected to a standby after a failover).
_UNAVAILABLE_SQLSTATES = ("08", "57", "53", "25006")
# Of those, what says this connection is gone (a fresh one may work at once).
_DROPPED_SQLSTATES = ("08", "57P01", "57P02")


async def _keep_session(con: Any) -> None:
    """The pool's reset: nothing to undo (see `PostgresStore.open`)."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable or unusable now (not a bad statement)."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and state.startswith(_UNAVAILABLE_SQLSTATES):
        return True
    return _dropped(exc)


def _dropped(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and state.startswith(_DROPPED_SQLSTATES):
        return True
    if isinstance(exc, (ConnectionResetError, asyncpg.exceptions.InternalClientError)):
        # The latter: the connection's protocol state is broken, as when the server's
        # termination notice races a new statement on it.
        return True
    return isinstance(exc, (ConnectionError, asyncpg.InterfaceError)) and "closed" in str(exc)


@dataclass
class _PendingSave:
    id: str
    params: tuple[Any, ...]
    items: list[tuple[int, int, str | None, str]]
    done: asyncio.Future[None] = field(repr=False)


class PostgresStore:
    """`ResponseStore` on a PostgreSQL database shared by every worker of every host.

    Create with `await PostgresStore.open(dsn, ...)`, one per process, and `await close()` it
    on shutdown.
    """

    def __init__(self, pool: Any, owner_key: bytes, shown_url: str,
                 acquire_timeout: float = 15.0) -> None:
        self._pool = pool
        # Waiting for a free pooled connection (and opening one) is bounded too: a database
        # that stalls every statement must not queue requests without end.
        self._acquire_timeout = acquire_timeout
        self._owner_key = owner_key
        self._shown_url = shown_url
        self._pending: list[_PendingSave] = []
        self._saver: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down_since: float | None = None  # for logging the outage once, not per request
        self._closing = False
        # Background runs' notifications: one LISTEN connection outside the pool (opened on
        # first use), and per topic an event set by a notice and cleared by its waiter.
        self._listen_connect: Callable[[], Awaitable[Any]] | None = None
        self._listener: Any = None
        self._listening: asyncio.Lock = asyncio.Lock()
        self._topics: dict[str, tuple[asyncio.Event, float]] = {}

    # LISTEN/NOTIFY wakes followers and cancel watchers of other processes at once.
    notifies = True

    @classmethod
    async def open(cls, dsn: str, *, password: str | None = None,
                   owner_secret: bytes | None = None, pool_size: int = 4,
                   connect_timeout: float = 5.0, statement_timeout: float = 10.0,
                   statement_cache_size: int = 100, migrate: bool = True,
                   shown_url: str = "postgresql") -> PostgresStore:
        """Open the pool, bring the schema up to date (unless `migrate` is false: then an
        outdated schema is refused) and load the owner key.

        `owner_secret` keys `owner_id`; without it a random key is created once and kept in
        the database, so every worker and host derive the same owners.
        """
        try:
            pool = await asyncpg.create_pool(
                # min_size 0: no background task that reconnects (and logs a traceback per
                # try) while the server is away; connections are opened on demand.
                dsn, password=password, min_size=0, max_size=pool_size,
                timeout=connect_timeout, command_timeout=statement_timeout,
                statement_cache_size=statement_cache_size,
                # Idle connections are closed after a minute: fewer held on the server.
                max_inactive_connection_lifetime=60.0,
                # Skip asyncpg's reset query on release (a second round trip per operation,
                # half the CPU of a save): pooled connections never hold session state (no
                # SET, LISTEN, cursors or session advisory locks; transactions are always
                # closed, and asyncpg still rolls back one left open before calling this).
                reset=_keep_session,
                server_settings={"application_name": "orp-proxy"})
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"cannot connect to {shown_url}: {exc}") from exc
            raise _as_config_error(exc, shown_url) from exc
        try:
            async with pool.acquire() as con:
                if migrate:
                    key = await _migrate(con, create_key=owner_secret is None)
                else:
                    version = await _schema_version(con)
                    if version != SCHEMA_VERSION:
                        raise RuntimeError(
                            f"database schema version {version}, this ORP needs "
                            f"{SCHEMA_VERSION}: run `orp-proxy store migrate`")
                    key = await _owner_key(con) if owner_secret is None else None
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, Exception) and is_unavailable(exc):
                raise StoreUnavailable(f"cannot connect to {shown_url}: {exc}") from exc
            if isinstance(exc, Exception):
                raise _as_config_error(exc, shown_url) from exc
            raise
        chosen = owner_secret if owner_secret is not None else key
        if chosen is None:
            raise RuntimeError("the database holds no owner key: run `orp-proxy store migrate`")
        store = cls(pool, chosen, shown_url, connect_timeout + statement_timeout)

        def listen_connect() -> Awaitable[Any]:
            # A direct connection: LISTEN does not survive a transaction-mode PgBouncer.
            connecting: Awaitable[Any] = asyncpg.connect(
                dsn, password=password, timeout=connect_timeout,
                server_settings={"application_name": "orp-proxy-listen"})
            return connecting

        store._listen_connect = listen_connect
        return store

    # -- plumbing ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("response store is closed")

    async def _run(self, work: Callable[[Any], Awaitable[_T]], *, probe: bool = False,
                   started: bool = False) -> _T:
        """`work(connection)` on a pooled connection, with the unavailability rules above.

        `started`: a write accepted before `close()` began, which close() waits for."""
        if not started:
            self._check_open()
        if not probe and time.monotonic() < self._down_until:
            raise StoreUnavailable("the database was unreachable a moment ago")
        for attempt in range(2):
            connected = False
            try:
                async with self._pool.acquire(timeout=self._acquire_timeout) as con:
                    connected = True
                    result = await work(con)
                if self._down_since is not None:
                    log.warning("response store reachable again after %.1f s",
                                time.monotonic() - self._down_since)
                    self._down_since = None
                return result
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                if connected and _dropped(exc):
                    # The server dropped this connection, so likely every idle one (restart,
                    # failover): replace them all, and try once more on a fresh one.
                    await self._pool.expire_connections()
                    if attempt == 0:
                        continue
                if not connected:
                    self._down_until = time.monotonic() + _DOWN_SECONDS
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("response store unavailable (requests that need it get 503 "
                                "until it is back): %s: %s", type(exc).__name__, exc)
                raise StoreUnavailable(str(exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def work(con: Any) -> list[Any]:
            return list(await con.fetch(sql, *args))

        return await self._run(work)

    def _track(self, task: asyncio.Task[_T]) -> asyncio.Task[_T]:
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def _shielded(self, future: asyncio.Future[_T]) -> _T:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_log_abandoned_failure)
            raise

    async def _write(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """A write in a task of its own: the caller's cancellation does not interrupt it."""
        self._check_open()
        task = self._track(asyncio.get_running_loop().create_task(
            self._run(work, started=True)))
        return await self._shielded(task)

    # -- public API --------------------------------------------------------------------------

    def known_unavailable(self) -> bool:
        """Within `_DOWN_SECONDS` of a failed connect (then the next request tries again)."""
        return time.monotonic() < self._down_until

    def owner_id(self, credential: str | None) -> str:
        """HMAC-SHA256 (hex) of the credential under the store's key; None means anonymous."""
        message = (credential or "").encode("utf-8", "surrogatepass")
        return hmac.new(self._owner_key, message, hashlib.sha256).hexdigest()

    async def save_response(self, record: StoredResponse) -> None:
        """Insert or replace `record` with its input and output items, atomically."""
        pending = self._pending_save(record)
        self._check_open()
        self._pending.append(pending)
        if self._saver is None:
            self._saver = self._track(asyncio.get_running_loop().create_task(
                self._write_pending()))
        await self._shielded(pending.done)

    async def _write_pending(self) -> None:
        """Group commit: every save queued by now goes in one statement (see the docstring)."""
        try:
            while self._pending:
                batch: list[_PendingSave] = []
                ids: set[str] = set()
                # The same id twice in one upsert is an error: the second waits a batch.
                for pending in self._pending[:_SAVE_BATCH]:
                    if pending.id in ids:
                        break
                    ids.add(pending.id)
                    batch.append(pending)
                del self._pending[:len(batch)]
                try:
                    await self._save_batch(batch)
                except asyncio.CancelledError as exc:
                    _settle(batch, exc)
                    raise
                except Exception as exc:
                    if len(batch) == 1 or is_unavailable(exc) or isinstance(exc, StoreUnavailable):
                        _settle(batch, exc)
                        continue
                    for pending in batch:  # find the bad record: each alone
                        try:
                            await self._save_batch([pending])
                        except Exception as single:
                            _settle([pending], single)
                        else:
                            _settle([pending], None)
                else:
                    _settle(batch, None)
        finally:
            self._saver = None

    async def _save_batch(self, batch: list[_PendingSave]) -> None:
        async def work(con: Any) -> None:
            await self._save_batch_on(con, batch)

        await self._run(work, started=True)

    @staticmethod
    async def _save_batch_on(con: Any, batch: list[_PendingSave]) -> None:
        columns: list[list[Any]] = [[] for _ in range(7)]
        for pending in batch:
            for column, value in zip(columns, pending.params, strict=True):
                column.append(value)
        positions: list[int] = []
        kinds: list[int] = []
        seqs: list[int] = []
        item_ids: list[str | None] = []
        bodies: list[str] = []
        for n, pending in enumerate(batch, 1):
            for kind, seq, iid, body in pending.items:
                positions.append(n)
                kinds.append(kind)
                seqs.append(seq)
                item_ids.append(iid)
                bodies.append(body)
        await con.execute(_SAVE_BATCH_SQL, *columns, positions, kinds, seqs, item_ids, bodies)

    async def load_lineage(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """Context for continuing from `response_id`, in spec order, from one query."""
        if not _storable(response_id):
            return None
        rows = await self._fetch(_LINEAGE_SQL, response_id, owner, _MAX_LINEAGE_DEPTH,
                                 time.time())
        found, joined = rows[0]
        if not found:
            return None
        return _parse_joined(joined)

    async def get_response(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The ResponseResource as it was sent to the client, or None (unknown or expired)."""
        if not _storable(response_id):
            return None
        rows = await self._fetch(_GET_RESPONSE_SQL, response_id, owner, time.time())
        if not rows:
            return None
        response: dict[str, Any] = ujson.loads(rows[0][0])
        if "output" in response:
            response["output"] = _parse_joined(rows[0][1])
        return response

    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Delete the response and its items (children keep theirs); False if unknown or
        expired."""
        if not _storable(response_id):
            return False
        now = time.time()

        async def work(con: Any) -> bool:
            rows = await con.fetch(
                "DELETE FROM responses WHERE id = $1 AND owner = $2 "
                "AND (expires_at IS NULL OR expires_at > $3) RETURNING rid",
                response_id, owner, now)
            return bool(rows)

        return await self._write(work)

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
        """A page of the response's input items, OpenAI style (see `SQLiteStore`)."""
        check_page(limit, order)
        if not _storable(response_id, after, before):
            return None
        now = time.time()

        async def work(con: Any) -> InputItemsPage | None:
            found = await con.fetch(_INPUT_CURSORS_SQL, response_id, owner, after, before, now)
            if not found:
                return None
            rid, after_seq, before_seq = found[0]
            # `seq` is an int column: its largest value is above every seq.
            page = page_bounds(order, after, before, after_seq, before_seq, top=2**31 - 1)
            if page is None:
                return InputItemsPage(data=[], has_more=False)
            rows = await con.fetch(
                "SELECT body FROM items WHERE response_rid = $1 AND kind = 0 AND seq > $2 "
                f"AND seq < $3 ORDER BY seq {'ASC' if page.ascending else 'DESC'} LIMIT $4",
                rid, page.low, page.high, limit + 1)
            bodies = [row[0] for row in rows[:limit]]
            if page.reverse:
                bodies.reverse()
            return InputItemsPage(data=loads_list(bodies), has_more=len(rows) > limit)

        return await self._run(work)

    async def get_items(self, owner: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Resolve `item_reference`s (the most recently stored live copy of an id wins)."""
        wanted = [i for i in dict.fromkeys(item_ids) if _storable(i)]
        if not wanted:
            return {}
        rows = await self._fetch(
            "SELECT i.item_id, i.body FROM items AS i "
            "JOIN responses AS r ON r.rid = i.response_rid "
            "WHERE i.item_id = ANY($1::text[]) AND r.owner = $2 "
            "AND (r.expires_at IS NULL OR r.expires_at > $3) ORDER BY i.rid",
            wanted, owner, time.time())
        return {iid: ujson.loads(body) for iid, body in rows}

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete expired responses that no response continues from, batch by batch."""
        cutoff = time.time() if now is None else now
        total = 0
        while True:

            async def batch(con: Any) -> int:
                return len(await con.fetch(_PURGE_SQL, cutoff, _PURGE_BATCH))

            deleted = await self._write(batch)
            total += deleted
            if not deleted:
                return total
            await asyncio.sleep(0)

    async def check_writable(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
        """Readiness: does a one-row write commit within `timeout` seconds? (It also ends the
        fail-fast period early when the database is back.)"""
        if self._closing:
            return False
        if self._heartbeat is None or self._heartbeat.done():

            async def beat(con: Any) -> None:
                await con.execute(
                    "INSERT INTO meta (key, value) VALUES ('heartbeat', $1) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    repr(time.time()))

            self._heartbeat = self._track(asyncio.get_running_loop().create_task(
                self._run(beat, probe=True)))
            self._heartbeat.add_done_callback(_retrieve_quietly)
        try:
            await asyncio.wait_for(asyncio.shield(self._heartbeat), timeout)
        except Exception:
            return False
        self._down_until = 0.0
        return True

    async def stats(self) -> dict[str, Any]:
        """Row counts, sizes, created_at range, schema and server version."""
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM responses), (SELECT count(*) FROM items), "
            "(SELECT min(created_at) FROM responses), (SELECT max(created_at) FROM responses), "
            "pg_total_relation_size('responses') + pg_total_relation_size('items'), "
            "pg_database_size(current_database()), "
            "(SELECT value FROM meta WHERE key = 'schema_version'), "
            "current_setting('server_version')")
        responses, items, oldest, newest, table_bytes, database_bytes, version, server = rows[0]
        return {
            "url": self._shown_url,
            "backend": "postgresql",
            "responses": responses,
            "items": items,
            "oldest_created_at": oldest,
            "newest_created_at": newest,
            "db_bytes": table_bytes,
            "database_bytes": database_bytes,
            "schema_version": int(version),
            "server_version": server,
        }

    async def vacuum(self) -> None:
        """VACUUM (ANALYZE) both tables (autovacuum normally does this on its own)."""

        async def work(con: Any) -> None:
            await con.execute("VACUUM (ANALYZE) responses, items")

        await self._write(work)

    # -- background runs ---------------------------------------------------------------------

    async def start_run(self, record: StoredResponse, events: Sequence[StoredEvent], *,
                        worker: str, lease_until: float) -> None:
        """The queued response, its run and its first events, in one transaction."""
        pending = self._pending_save(record)
        last = max((e.seq for e in events), default=-1)

        async def work(con: Any) -> None:
            async with con.transaction():
                await self._save_batch_on(con, [pending])
                await con.execute(
                    "INSERT INTO runs (response_id, owner, worker, lease_until, last_seq) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    record.id, record.owner, worker, lease_until, last)
                await _insert_events(con, record.id, events)

        await self._write(work)

    async def update_response(self, record: StoredResponse) -> None:
        """One transaction: the row's object and status, and the output items replaced."""
        pending = self._pending_save(record)
        outputs = [row for row in pending.items if row[0] == _OUTPUT]

        async def work(con: Any) -> None:
            async with con.transaction():
                rid = await con.fetchval(
                    "UPDATE responses SET status = $2, response = $3 WHERE id = $1 "
                    "RETURNING rid", record.id, pending.params[4], pending.params[6])
                if rid is None:
                    return
                await con.execute("DELETE FROM items WHERE response_rid = $1 AND kind = $2",
                                  rid, _OUTPUT)
                await con.execute(
                    "INSERT INTO items (response_rid, kind, seq, item_id, body) "
                    "SELECT $1, $2, x.seq, x.item_id, x.body FROM unnest($3::int[], "
                    "$4::text[], $5::text[]) AS x (seq, item_id, body)",
                    rid, _OUTPUT, [r[1] for r in outputs], [r[2] for r in outputs],
                    [r[3] for r in outputs])

        await self._write(work)

    async def append_events(self, batches: Sequence[EventBatch]) -> list[str]:
        """Every batch in one transaction; the notices go out when it commits."""
        if not batches:
            return []

        async def work(con: Any) -> list[str]:
            refused = []
            async with con.transaction():
                for batch in batches:
                    held = await con.fetchval(
                        "SELECT 1 FROM runs WHERE response_id = $1 AND worker = $2 "
                        "AND NOT finished FOR UPDATE", batch.response_id, batch.worker)
                    if held is None:
                        refused.append(batch.response_id)
                        continue
                    if batch.events:
                        await _insert_events(con, batch.response_id, batch.events)
                    await con.execute(
                        "UPDATE runs SET last_seq = greatest(last_seq, $2), "
                        "finished = $3, keep_until = $4 WHERE response_id = $1",
                        batch.response_id, batch.events[-1].seq if batch.events else -1,
                        batch.keep_until is not None, batch.keep_until)
                    await con.execute("SELECT pg_notify($1, $2)", _CHANNEL,
                                      f"events:{batch.response_id}")
            return refused

        return await self._write(work)

    async def read_events(self, response_id: str, after: int, limit: int = 500
                          ) -> list[StoredEvent]:
        rows = await self._fetch(
            "SELECT seq, body FROM events WHERE response_id = $1 AND seq > $2 ORDER BY seq "
            "LIMIT $3", response_id, after, limit)
        return [StoredEvent(seq, body) for seq, body in rows]

    async def get_run(self, owner: str, response_id: str) -> RunInfo | None:
        if not _storable(response_id):
            return None
        rows = await self._fetch(
            "SELECT u.response_id, u.owner, u.worker, u.lease_until, u.cancel_requested, "
            "u.finished, u.last_seq, u.events_kept FROM runs AS u "
            "JOIN responses AS r ON r.id = u.response_id "
            "WHERE u.response_id = $1 AND u.owner = $2 "
            "AND (r.expires_at IS NULL OR r.expires_at > $3)", response_id, owner, time.time())
        return _run_info(rows[0]) if rows else None

    async def renew_leases(self, worker: str, response_ids: Sequence[str],
                           lease_until: float) -> None:
        ids = list(response_ids)
        if not ids:
            return

        async def work(con: Any) -> None:
            await con.execute("UPDATE runs SET lease_until = $1 WHERE worker = $2 "
                              "AND NOT finished AND response_id = ANY($3::text[])",
                              lease_until, worker, ids)

        await self._write(work)

    async def request_cancel(self, response_id: str) -> None:
        async def work(con: Any) -> None:
            await con.execute(
                "WITH marked AS (UPDATE runs SET cancel_requested = true "
                "WHERE response_id = $1 AND NOT finished RETURNING worker) "
                "SELECT pg_notify($2, 'cancel:' || worker) FROM marked", response_id, _CHANNEL)

        await self._write(work)

    async def cancel_requests(self, worker: str) -> list[str]:
        rows = await self._fetch("SELECT response_id FROM runs WHERE worker = $1 "
                                 "AND NOT finished AND cancel_requested", worker)
        return [response_id for (response_id,) in rows]

    async def claim_expired_runs(self, worker: str, now: float, lease_until: float
                                 ) -> list[RunInfo]:
        async def work(con: Any) -> list[Any]:
            return list(await con.fetch(
                "UPDATE runs SET worker = $1, lease_until = $2 "
                f"WHERE NOT finished AND lease_until < $3 RETURNING {_RUN_COLUMNS}",
                worker, lease_until, now))

        return [_run_info(row) for row in await self._write(work)]

    async def count_runs(self, owner: str) -> int:
        rows = await self._fetch("SELECT count(*) FROM runs WHERE owner = $1 AND NOT finished",
                                 owner)
        return int(rows[0][0])

    async def purge_events(self, now: float) -> int:
        async def work(con: Any) -> int:
            async with con.transaction():
                rows = await con.fetch(
                    "UPDATE runs SET events_kept = false WHERE events_kept "
                    "AND keep_until <= $1 RETURNING response_id", now)
                ids = [response_id for (response_id,) in rows]
                if ids:
                    await con.execute("DELETE FROM events WHERE response_id = ANY($1::text[])",
                                      ids)
                return len(ids)

        return await self._write(work)

    async def wait_notice(self, topic: str, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for a NOTIFY on `topic`. A notice that came since this topic's last wait
        (while its waiter was busy) counts: nothing that happened in between is missed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for stale in [t for t, (_, used) in self._topics.items() if now - used > _TOPIC_IDLE]:
            del self._topics[stale]
        event = self._topics.get(topic, (asyncio.Event(), now))[0]
        self._topics[topic] = (event, now)
        try:
            await self._listen()
        except Exception as exc:
            # Without the listener, callers still look again after the timeout (bounded).
            log.warning("LISTEN connection unavailable: %s", exc)
            await asyncio.sleep(min(timeout, 1.0))
            return False
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._topics[topic] = (event, loop.time())
        event.clear()
        return True

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        async with self._listening:
            if self._listener is not None and not self._listener.is_closed():
                return
            self._check_open()
            assert self._listen_connect is not None
            listener = await self._listen_connect()
            await listener.add_listener(_CHANNEL, self._on_notice)
            self._listener = listener
            # Notices sent while no connection listened are lost: wake every waiter once.
            for event, _ in self._topics.values():
                event.set()

    def _on_notice(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        found = self._topics.get(payload)
        if found is not None:
            found[0].set()

    def _pending_save(self, record: StoredResponse) -> _PendingSave:
        """`record` encoded for the `responses` and `items` tables (every write of a record)."""
        params, items = encode_record(record)
        return _PendingSave(record.id, params, items, asyncio.get_running_loop().create_future())

    async def close(self) -> None:
        """Let pending writes finish, then close the pool (idempotent)."""
        if self._closing:
            return
        self._closing = True
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        left, self._pending = self._pending, []
        _settle(left, RuntimeError("response store is closed"))
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), 5)
            except Exception:
                listener.terminate()
        try:
            await asyncio.wait_for(self._pool.close(), 10)
        except Exception:
            self._pool.terminate()


def _storable(*texts: str | None) -> bool:
    """Whether these ids can be in the database at all: PostgreSQL text holds no NUL (asyncpg
    refuses it as a parameter), so an id with one is simply unknown, as on SQLite."""
    return not any(text is not None and "\x00" in text for text in texts)


async def _insert_events(con: Any, response_id: str, events: Sequence[StoredEvent]) -> None:
    if events:
        await con.execute(
            "INSERT INTO events (response_id, seq, body) "
            "SELECT $1, x.seq, x.body FROM unnest($2::int[], $3::text[]) AS x (seq, body) "
            # A batch written again (its commit's reply was lost) changes nothing.
            "ON CONFLICT (response_id, seq) DO NOTHING",
            response_id, [e.seq for e in events], [e.body for e in events])


def _run_info(row: Sequence[Any]) -> RunInfo:
    response_id, owner, worker, lease_until, cancel, finished, last_seq, kept = row
    return RunInfo(response_id=response_id, owner=owner, worker=worker,
                   lease_until=float(lease_until), cancel_requested=bool(cancel),
                   finished=bool(finished), last_seq=int(last_seq), events_kept=bool(kept))


def _parse_joined(joined: str | None) -> list[dict[str, Any]]:
    if not joined:
        return []
    items: list[dict[str, Any]] = ujson.loads("[" + joined + "]")
    return items


def _settle(batch: list[_PendingSave], error: BaseException | None) -> None:
    for pending in batch:
        if pending.done.done():
            continue
        if error is None:
            pending.done.set_result(None)
        else:
            pending.done.set_exception(error)


# -- schema ----------------------------------------------------------------------------------


async def _schema_version(con: Any) -> int:
    """The schema's version (0: no ORP tables yet)."""
    if await con.fetchval("SELECT to_regclass('meta')") is None:
        return 0
    value = await con.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
    return int(value) if value is not None else 0


async def _owner_key(con: Any) -> bytes | None:
    value = await con.fetchval("SELECT value FROM meta WHERE key = 'owner_secret'")
    return bytes.fromhex(value) if value is not None else None


async def _migrate(con: Any, *, create_key: bool) -> bytes | None:
    """Apply pending migrations and fetch (or create) the owner key, in one transaction under
    the migration lock: hosts and workers starting together migrate once."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        version = await _schema_version(con)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this ORP ({SCHEMA_VERSION})")
        for step in _MIGRATIONS[version:]:
            for statement in step:
                await con.execute(statement)
        if version != SCHEMA_VERSION:
            await con.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", str(SCHEMA_VERSION))
            log.info("PostgreSQL store migrated from schema %d to %d", version, SCHEMA_VERSION)
        if create_key:
            await con.execute(
                "INSERT INTO meta (key, value) VALUES ('owner_secret', $1) "
                "ON CONFLICT (key) DO NOTHING", secrets.token_hex(32))
        return await _owner_key(con)


async def connect(dsn: str, *, password: str | None = None, connect_timeout: float = 5.0
                  ) -> Any:
    """One connection outside any pool (the store commands); StoreUnavailable if the server
    cannot be reached."""
    try:
        return await asyncpg.connect(dsn, password=password, timeout=connect_timeout)
    except Exception as exc:
        if is_unavailable(exc):
            raise StoreUnavailable(f"cannot connect: {exc}") from exc
        raise _as_config_error(exc, redacted_store_url(dsn)) from exc


def _as_config_error(exc: Exception, shown_url: str) -> Exception:
    """A URL asyncpg cannot use (a bad `sslmode`, port, parameter) as the one-line settings
    error it is; anything else unchanged."""
    if isinstance(exc, (asyncpg.ClientConfigurationError, ValueError, TypeError)):
        return ConfigError(f"ORP_STORE_URL={shown_url}: {exc}")
    return exc


async def schema_status(dsn: str, *, password: str | None = None,
                        connect_timeout: float = 5.0) -> dict[str, Any]:
    """The schema version the database has and the one this ORP needs, without migrating."""
    con = await connect(dsn, password=password, connect_timeout=connect_timeout)
    try:
        version = await _schema_version(con)
    finally:
        await con.close()
    return {"backend": "postgresql", "schema_version": version,
            "required_version": SCHEMA_VERSION,
            "pending_migrations": max(0, SCHEMA_VERSION - version)}


def _retrieve_quietly(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("store heartbeat failed: %r", task.exception())


def _log_abandoned_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("store write failed after its caller went away: %r", error)
