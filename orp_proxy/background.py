"""Background responses: runs that belong to a worker task, not to a client connection.

A `background: true` request is validated and translated on the request path, saved as
`queued` with its first events (`response.created`, `response.queued`) and a lease, and answered
at once; `BackgroundRuns.submit` then runs it in a task of this worker. Every event of the run
is kept in the store's event log, so a stream can be resumed from any worker or host
(`follow`), and the response object is updated as it goes (status, output so far).

* **Event log.** Events are appended by one writer per worker (`_flush_loop`) that takes what
  every local run produced since its last pass and commits it in one transaction, about every
  `FLUSH_INTERVAL` seconds: a run costs one write per batch, never one per token. One writer also
  means a run's events are committed in sequence order, so a reader that saw event N has seen
  every event before N. The terminal batch also marks the run finished; its events are kept
  `ORP_BACKGROUND_EVENT_RETENTION_SECONDS`, then dropped (the response stays).
* **Following.** A follower in the process that runs the response reads the run's events from
  memory as they come. Elsewhere it reads the log, and waits for more with the store's
  `wait_notice` (PostgreSQL: LISTEN/NOTIFY wakes it at once; SQLite: it polls every
  `ORP_BACKGROUND_POLL_INTERVAL`, so a remote follower lags by up to that plus one flush).
* **Cancel.** `request_cancel` marks the run in the store; the worker that runs it sees the mark
  (at once if it is this worker; otherwise by notification or poll), closes the upstream
  connection, keeps the output so far, and ends the response `cancelled`.
* **Crashes.** Each worker renews the leases of its runs every third of
  `ORP_BACKGROUND_LEASE_SECONDS`, and every worker looks for runs whose lease ran out (their
  worker died: SIGKILL, host loss). Such a run is ended `failed` with code `worker_lost`,
  keeping the output saved so far. It is not re-run: the upstream may already have done work
  (tool calls the client acts on, tokens billed) and a second run could answer differently from
  what followers already saw.
* **Shutdown.** On SIGTERM running responses get most of the graceful timeout to finish; the
  rest end `failed` with code `server_shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ujson
from aiohttp import web

from orp_proxy.errors import TOO_MANY_REQUESTS, ApiError
from orp_proxy.exchange import Exchange
from orp_proxy.ops import metrics
from orp_proxy.pipeline import PreparedExchange
from orp_proxy.protocol.sse import dumps
from orp_proxy.protocol.transcoder import TERMINAL_TYPES, Event
from orp_proxy.state import GATEWAY, Gateway
from orp_proxy.store import StoredResponse
from orp_proxy.store.base import (
    BackgroundStore,
    EventBatch,
    RunInfo,
    StoredEvent,
    StoreUnavailable,
)

log = logging.getLogger("orp.background")

# Seconds between event-log writes of one worker (all its runs in one transaction).
FLUSH_INTERVAL = 0.02
# Attempts at a batch of events that fails for another reason than the store being away.
FLUSH_ATTEMPTS = 5
# Seconds between saves of a running response's object (status, output so far).
PROGRESS_INTERVAL = 1.0
# With notifications, a follower still looks at the log this often (a lost notice, or a pooler
# that drops LISTEN, costs this much delay, never a stuck stream).
NOTICE_TIMEOUT = 1.0
# Shutdown: the share of the graceful timeout running responses get to finish, less the second
# gunicorn's aiohttp worker may take to notice SIGTERM and the time to write their ends.
SHUTDOWN_SHARE = 0.8
SHUTDOWN_MARGIN = 1.0
# Events read from the store per query while following.
READ_BATCH = 500

WORKER_LOST = ("worker_lost", "The worker running this background response stopped (crash, "
               "kill or host loss) before it finished; the output saved so far is kept.")
SHUTDOWN = ("server_shutdown", "The server shut down before this background response "
            "finished; the output so far is kept.")


def terminal_event_type(status: str) -> str:
    """The terminal event a response with `status` ends its stream with."""
    return {"completed": "response.completed",
            "incomplete": "response.incomplete"}.get(status, "response.failed")


def event_type(body: str) -> str:
    """The `type` of a stored event (our events are encoded with `type` first)."""
    prefix = '{"type":"'
    if body.startswith(prefix):
        end = body.find('"', len(prefix))
        if end > 0:
            return body[len(prefix):end]
    return str(ujson.loads(body)["type"])


@dataclass(eq=False)
class Run:
    """One background response this worker runs."""

    response_id: str
    owner: str
    prepared: PreparedExchange
    request_id: str
    authorization: str | None
    events: list[StoredEvent]  # every event so far (the in-process followers read these)
    flushed: int  # index into `events`: what the log has
    task: asyncio.Task[None] | None = None
    exchange: Exchange | None = None
    final: bool = False  # the terminal event is among `events`
    done: asyncio.Event = field(default_factory=asyncio.Event)  # finished in the log
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: tuple[str, str] | None = None  # (how, why) once cancel or shutdown began
    progress_at: float = 0.0
    running: bool = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class _RunTransport:
    """How a background run delivers: into the run's event list (and from there the log)."""

    def __init__(self, runs: BackgroundRuns, run: Run) -> None:
        self.runs = runs
        self.run = run

    async def send(self, events: list[Event]) -> None:
        run = self.run
        self.runs.record(run, events)
        now = time.monotonic()
        if now - run.progress_at >= PROGRESS_INTERVAL:
            run.progress_at = now
            # Awaited here, in the run's own order: a later save can never overtake it.
            await self.runs.save_progress(run)

    async def finish(self, events: list[Event]) -> None:
        self.runs.record(self.run, events, final=True)
        await self.run.done.wait()


class BackgroundRuns:
    """The background runs of one worker, and the tasks that keep them: the event-log writer,
    lease renewal and the search for orphaned runs, and the cancel watcher."""

    def __init__(self, gateway: Gateway, store: BackgroundStore) -> None:
        self.gateway = gateway
        self.store = store
        settings = gateway.settings
        self.lease = settings.background_lease_seconds
        self.poll = settings.background_poll_interval
        self.max_runs = settings.background_max_runs
        self.max_per_owner = settings.background_max_per_owner
        self.retention = settings.background_event_retention
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.runs: dict[str, Run] = {}
        # Requests of each owner between the limit checks and their saved run.
        self._admitting: dict[str, int] = {}
        self._dirty = asyncio.Event()
        self._has_runs = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._draining: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_loop(), name="orp-bg-flush"),
                       loop.create_task(self._lease_loop(), name="orp-bg-lease"),
                       loop.create_task(self._cancel_loop(), name="orp-bg-cancel")]

    def begin_shutdown(self, deadline: float) -> None:
        """SIGTERM: refuse new runs; let the running ones finish until `deadline` (loop time),
        then end the rest `server_shutdown`. Started from `on_shutdown`, so that streams
        following these runs (handlers, which get more of the graceful timeout) see the end."""
        if self._draining is None:
            self._closing = True
            self._draining = asyncio.get_running_loop().create_task(self._drain(deadline))

    async def _drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        pending = [run.task for run in self.runs.values() if run.task is not None]
        if pending:
            log.info("shutdown: waiting up to %.0f s for %d background response(s)",
                     max(0.0, deadline - loop.time()), len(pending))
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        for run in list(self.runs.values()):
            self.stop(run, "shutdown")
        left = [run.task for run in self.runs.values() if run.task is not None]
        if left:
            await asyncio.wait(left, timeout=10)

    async def close(self) -> None:
        """After `begin_shutdown` (which this starts if nothing did): wait for the drain, then
        stop the maintenance tasks (the event-log writer last wrote the runs' ends)."""
        self.begin_shutdown(asyncio.get_running_loop().time())
        assert self._draining is not None
        await self._draining
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- submitting ------------------------------------------------------------------------

    async def submit(self, prepared: PreparedExchange, *, owner: str, request_id: str,
                     authorization: str | None) -> tuple[dict[str, Any], list[Event]]:
        """Save the response as queued and start its run; returns the queued response object
        and its first events. 429 past the per-worker or per-owner limit."""
        if self._closing:
            raise ApiError(503, "The server is shutting down; send the request again.",
                           type="server_error", code="server_shutting_down",
                           headers={"Retry-After": "1"})
        # A request being admitted counts from before its first await until its run is saved
        # (then the store and `self.runs` count it): otherwise concurrent requests all pass the
        # checks before any of them is counted. Across hosts the per-owner limit stays soft.
        if len(self.runs) + sum(self._admitting.values()) >= self.max_runs:
            raise ApiError(429, f"This server already runs {self.max_runs} background "
                           "responses; try again later.", type=TOO_MANY_REQUESTS,
                           code="too_many_background_responses", headers={"Retry-After": "1"})
        others = self._admitting.get(owner, 0)
        self._admitting[owner] = others + 1
        try:
            if await self.store.count_runs(owner) + others >= self.max_per_owner:
                raise ApiError(429, f"You already have {self.max_per_owner} background "
                               "responses running; wait for one to finish or cancel one.",
                               type=TOO_MANY_REQUESTS, code="too_many_background_responses",
                               headers={"Retry-After": "1"})
            queued, first, stored = self._queue(prepared)
            await self.store.start_run(self._record(prepared, owner, queued), stored,
                                       worker=self.worker, lease_until=time.time() + self.lease)
        finally:
            left = self._admitting.pop(owner) - 1
            if left:
                self._admitting[owner] = left
        run = Run(response_id=queued["id"], owner=owner, prepared=prepared,
                  request_id=request_id, authorization=authorization, events=stored,
                  flushed=len(stored))
        self.runs[run.response_id] = run
        self._has_runs.set()
        metrics.BACKGROUND_RUNS.labels("queued").inc()
        run.task = asyncio.get_running_loop().create_task(self._run(run),
                                                          name=f"orp-bg-{run.response_id}")
        return queued, first

    @staticmethod
    def _queue(prepared: PreparedExchange
               ) -> tuple[dict[str, Any], list[Event], list[StoredEvent]]:
        """The queued response object and its first events (as sent, and as kept)."""
        tc = prepared.transcoder
        tc.response["background"] = True
        tc.queue()
        first = tc.take()
        return tc.progress(), first, [StoredEvent(e["sequence_number"], dumps(e)) for e in first]

    def _record(self, prepared: PreparedExchange, owner: str, response: dict[str, Any]
                ) -> StoredResponse:
        ttl = self.gateway.settings.store_ttl_seconds
        return StoredResponse(id=response["id"], owner=owner,
                              previous_response_id=response["previous_response_id"],
                              created_at=response["created_at"], status=response["status"],
                              response=response, input_items=prepared.new_items,
                              expires_at=time.time() + ttl if ttl else None)

    # -- running ---------------------------------------------------------------------------

    async def _run(self, run: Run) -> None:
        tc = run.prepared.transcoder
        try:
            try:
                exchange = await run.prepared.open(self.gateway, request_id=run.request_id,
                                                   authorization=run.authorization)
            except ApiError as exc:
                tc.fail(exc.code or "upstream_error", exc.message, type=exc.type)
            else:
                run.exchange = exchange
                run.running = True
                metrics.BACKGROUND_RUNS.labels("queued").dec()
                metrics.BACKGROUND_RUNS.labels("running").inc()
                if run.stopping is None:
                    await exchange.run(_RunTransport(self, run))
        except asyncio.CancelledError:
            if run.stopping is None:
                raise  # not ours (the loop is going away)
        except Exception:
            log.exception("background response %s failed", run.response_id)
            tc.fail("internal_error", "The gateway failed while running this response.")
        finally:
            if run.exchange is not None:
                run.exchange.upstream.close()
        try:
            lost = run.stopping is not None and run.stopping[0] == "lost"
            if not run.final and not lost:
                # Ended by cancel, shutdown or a failure before the exchange settled it.
                if not tc.finished:
                    self._apply_stop(run)
                await self._save_final(run)
                self.record(run, tc.take(), final=True)
                await run.done.wait()
        finally:
            metrics.BACKGROUND_RUNS.labels("running" if run.running else "queued").dec()
            metrics.BACKGROUND_FINISHED.labels(tc.response["status"]).inc()
            self.runs.pop(run.response_id, None)
            if not self.runs:
                self._has_runs.clear()
            run.notify()
            log.info("background response %s ended %s", run.response_id,
                     tc.response["status"])

    def _apply_stop(self, run: Run) -> None:
        tc = run.prepared.transcoder
        how = run.stopping[0] if run.stopping else "shutdown"
        if how == "cancel":
            tc.cancel()
        else:
            code, message = WORKER_LOST if how == "lost" else SHUTDOWN
            tc.fail(code, message)

    async def _save_final(self, run: Run) -> None:
        try:
            await asyncio.shield(self.store_save(run))
        except Exception:
            log.exception("storing background response %s failed", run.response_id)

    async def store_save(self, run: Run) -> None:
        record = self._record(run.prepared, run.owner, run.prepared.transcoder.response)
        await self.gateway.store.save_response(record)

    def stop(self, run: Run, how: str) -> bool:
        """Stop a local run (`how`: cancel or shutdown): close its upstream now and end it.
        False if it had already ended."""
        tc = run.prepared.transcoder
        if tc.finished or run.stopping is not None or run.task is None:
            return False
        run.stopping = (how, "")
        self._apply_stop(run)
        if run.exchange is not None:
            run.exchange.upstream.close()  # at once, not when the task gets to run
        run.task.cancel()
        return True

    def record(self, run: Run, events: list[Event], *, final: bool = False) -> None:
        """Take events of a local run: kept in memory for local followers, queued for the log."""
        if events:
            run.events.extend(StoredEvent(e["sequence_number"], dumps(e)) for e in events)
        if final:
            run.final = True
        if events or final:
            run.notify()
            self._dirty.set()

    async def save_progress(self, run: Run) -> None:
        """The response object as it stands (status, output so far), for GET."""
        tc = run.prepared.transcoder
        try:
            await self.store.update_response(self._record(run.prepared, run.owner,
                                                          tc.progress()))
        except Exception:
            log.warning("saving the progress of background response %s failed",
                        run.response_id, exc_info=True)

    # -- the event-log writer --------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(FLUSH_INTERVAL)
            self._dirty.clear()
            await self._flush()

    async def _flush(self) -> None:
        batches: list[tuple[Run, int, EventBatch]] = []
        for run in list(self.runs.values()):
            end = len(run.events)
            if end == run.flushed and not (run.final and not run.done.is_set()):
                continue
            # A final run's list is complete: this batch ends its log.
            batch = EventBatch(run.response_id, self.worker, run.events[run.flushed:end],
                               keep_until=time.time() + self.retention if run.final else None)
            batches.append((run, end, batch))
        if not batches:
            return
        delay = 0.05
        failures = 0
        while True:
            try:
                refused = set(await self.store.append_events([b for _, _, b in batches]))
                break
            except StoreUnavailable:
                # The database is away: the log waits for it (appends are idempotent, so a
                # batch whose commit reply was lost can be written again).
                log.warning("background events wait for the store to come back")
            except Exception:
                failures += 1
                log.exception("writing background events failed (attempt %d of %d)",
                              failures, FLUSH_ATTEMPTS)
                if failures >= FLUSH_ATTEMPTS:
                    # Not a passing outage: stop these runs rather than stall every run of
                    # this worker behind a batch that can never be written.
                    refused = {b.response_id for _, _, b in batches}
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        for run, end, batch in batches:
            run.flushed = end
            if batch.keep_until is not None or run.response_id in refused:
                run.done.set()
            if run.response_id in refused and not run.final:
                # Deleted, or taken over by another worker after our lease lapsed (this
                # process stalled): whatever we do now would contradict the log. Stop.
                log.warning("background response %s is no longer ours; stopping it",
                            run.response_id)
                self.stop(run, "lost")
            run.notify()

    # -- leases, orphans, retention -------------------------------------------------------

    async def _lease_loop(self) -> None:
        period = self.lease / 3
        purge_every = max(1, int(60 / period))
        turn = 0
        while True:
            await asyncio.sleep(period * (0.9 + 0.2 * secrets.randbelow(1000) / 1000))
            now = time.time()
            try:
                if self.runs:
                    await self.store.renew_leases(self.worker, list(self.runs), now + self.lease)
                for info in await self.store.claim_expired_runs(self.worker, now,
                                                                now + self.lease):
                    if info.response_id not in self.runs:
                        await self._settle_orphan(info)
                turn += 1
                if turn % purge_every == 0:
                    await self.store.purge_events(now)
            except Exception:
                log.exception("background lease upkeep failed")

    async def _settle_orphan(self, info: RunInfo) -> None:
        """End a run whose worker died: `failed` (worker_lost), the output saved so far kept."""
        store = self.store
        response = await self.gateway.store.get_response(info.owner, info.response_id)
        seq = info.last_seq
        events: list[StoredEvent] = []
        if response is not None and response.get("status") in ("queued", "in_progress"):
            code, message = WORKER_LOST
            for item in response.get("output") or ():
                if item.get("status") == "in_progress":
                    item["status"] = "incomplete"
            response["status"] = "failed"
            response["error"] = {"code": code, "message": message}
            await store.update_response(StoredResponse(
                id=info.response_id, owner=info.owner,
                previous_response_id=response.get("previous_response_id"),
                created_at=response.get("created_at", 0), status="failed", response=response,
                input_items=[]))
            error = {"type": "error", "error": {"type": "server_error", "code": code,
                                                "message": message, "param": None},
                     "sequence_number": seq + 1}
            failed = {"type": "response.failed", "response": response,
                      "sequence_number": seq + 2}
            events = [StoredEvent(seq + 1, dumps(error)), StoredEvent(seq + 2, dumps(failed))]
        await store.append_events([EventBatch(info.response_id, self.worker, events,
                                              keep_until=time.time() + self.retention)])
        metrics.BACKGROUND_FINISHED.labels("failed").inc()
        log.warning("background response %s: its worker %s stopped; ended failed (%s)",
                    info.response_id, info.worker, WORKER_LOST[0])

    # -- cancel ----------------------------------------------------------------------------

    async def _cancel_loop(self) -> None:
        while True:
            await self._has_runs.wait()
            try:
                if self.store.notifies:
                    await self.store.wait_notice(f"cancel:{self.worker}", NOTICE_TIMEOUT)
                else:
                    await asyncio.sleep(self.poll)
                if not self.runs:
                    continue
                for response_id in await self.store.cancel_requests(self.worker):
                    run = self.runs.get(response_id)
                    if run is not None:
                        self.stop(run, "cancel")
            except Exception:
                log.exception("looking for cancel requests failed")
                await asyncio.sleep(1.0)

    async def cancel(self, info: RunInfo) -> None:
        """Cancel a background run wherever it runs; returns once it ended, or after a few
        seconds if its worker does not answer (a dead worker's run ends by its lease)."""
        run = self.runs.get(info.response_id)
        if run is not None:
            self.stop(run, "cancel")
        else:
            await self.store.request_cancel(info.response_id)
        await self.wait_finished(info, timeout=max(5.0, 4 * self.poll))

    async def wait_finished(self, info: RunInfo, timeout: float) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            run = self.runs.get(info.response_id)
            if run is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.done.wait(), deadline - loop.time())
                return
            current = await self.store.get_run(info.owner, info.response_id)
            if current is None or current.finished:
                return
            wait = min(NOTICE_TIMEOUT if self.store.notifies else self.poll,
                       max(0.0, deadline - loop.time()))
            await self.store.wait_notice(f"events:{info.response_id}", wait)

    # -- following -------------------------------------------------------------------------

    async def follow(self, owner: str, response_id: str, after: int
                     ) -> AsyncIterator[list[StoredEvent]]:
        """The run's events with `seq > after`, as they come, until the terminal one."""
        cursor = after
        idle = 0
        while True:
            run = self.runs.get(response_id)
            if run is not None:
                changed = run.changed
                fresh = run.events[cursor + 1:]  # a run's events are seq 0, 1, 2, …
                if fresh:
                    cursor = fresh[-1].seq
                    yield fresh
                    if run.final and run.events[-1].seq == cursor:
                        return
                    continue
                if run.final and run.done.is_set():
                    return
                await changed.wait()
                continue
            events = await self.store.read_events(response_id, cursor, READ_BATCH)
            if events:
                idle = 0
                cursor = events[-1].seq
                yield events
                if event_type(events[-1].body) in TERMINAL_TYPES:
                    return
                continue
            idle += 1
            if idle % 20 == 1:
                current = await self.store.get_run(owner, response_id)
                if current is None:
                    return  # deleted meanwhile
                if current.finished:
                    # The terminal event would have been read: events were dropped.
                    if current.last_seq > cursor:
                        tail = await self._synthesized_end(current)
                        if tail is not None:
                            yield [tail]
                    return
            if response_id in self.runs:
                continue
            await self.store.wait_notice(
                f"events:{response_id}", NOTICE_TIMEOUT if self.store.notifies
                else self.poll)

    async def _synthesized_end(self, info: RunInfo) -> StoredEvent | None:
        """The terminal event rebuilt from the stored response (its events were dropped)."""
        response = await self.gateway.store.get_response(info.owner, info.response_id)
        if response is None:
            return None
        event = {"type": terminal_event_type(response["status"]), "response": response,
                 "sequence_number": info.last_seq}
        return StoredEvent(info.last_seq, dumps(event))


BACKGROUND = web.AppKey("orp_background", BackgroundRuns)


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """A `cleanup_ctx` entry (after the gateway's): the worker's background runs."""
    gateway = app[GATEWAY]
    store = getattr(gateway.store, "background", None)
    if store is None and isinstance(gateway.store, BackgroundStore):
        store = gateway.store
    if store is None:
        yield  # this store cannot keep background runs: they are refused
        return
    runs = BackgroundRuns(gateway, store)
    app[BACKGROUND] = runs
    runs.start()
    try:
        yield
    finally:
        await runs.close()


async def on_shutdown(app: web.Application) -> None:
    """`on_shutdown` (SIGTERM): running background responses get most of the graceful
    timeout, counted from now."""
    runs = app.get(BACKGROUND)
    if runs is not None:
        loop = asyncio.get_running_loop()
        grace = runs.gateway.settings.graceful_timeout * SHUTDOWN_SHARE - SHUTDOWN_MARGIN
        runs.begin_shutdown(loop.time() + max(0.0, grace))
