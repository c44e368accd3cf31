"""The response store's interface: what the gateway needs from wherever responses are kept.

What `previous_response_id`, `GET/DELETE /v1/responses/{id}` and `/input_items` read, and what
`item_reference` inputs resolve against. `sqlite.SQLiteStore` is the embedded implementation,
`postgres.PostgresStore` the one several hosts share; `factory.open_store` picks one by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from orp_proxy.errors import SERVER_ERROR, ApiError


class StoreUnavailable(ApiError):
    """The store's database cannot be reached (down, restarting, failing over, too slow).

    An `ApiError` (503 `store_unavailable`, `Retry-After: 1`), so every transport answers it
    like any other refusal; it is raised at once rather than after a long wait, and the store
    recovers by itself when the database is back.
    """

    def __init__(self, detail: str = "") -> None:
        super().__init__(503, "The response store is unavailable; try again shortly.",
                         type=SERVER_ERROR, code="store_unavailable",
                         headers={"Retry-After": "1"})
        self.detail = detail


@dataclass
class StoredResponse:
    """One response as saved after it finished (or failed)."""

    id: str
    owner: str
    previous_response_id: str | None
    created_at: int
    status: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    expires_at: float | None = None


@dataclass
class StoredEvent:
    """One streaming event of a background response, as its client saw it."""

    seq: int  # the event's `sequence_number`
    body: str  # the event as JSON text


@dataclass
class EventBatch:
    """Events of one background run to append, in sequence order after those already kept.

    `keep_until` set: the batch ends with the terminal event; the run is finished (its lease
    released) and its events are kept until that time (seconds since the epoch).
    """

    response_id: str
    worker: str  # the lease holder writing it; a batch for a run it no longer holds is refused
    events: list[StoredEvent]
    keep_until: float | None = None


@dataclass
class RunInfo:
    """A background run's bookkeeping: who runs it, until when, and how far it got."""

    response_id: str
    owner: str
    worker: str  # the process that runs it (host:pid:nonce)
    lease_until: float  # seconds since the epoch; past it, a live run has no worker
    cancel_requested: bool
    finished: bool
    last_seq: int  # the highest sequence_number written, -1 before any
    events_kept: bool  # False once retention dropped the events


@dataclass
class InputItemsPage:
    """A page of `GET /v1/responses/{id}/input_items`."""

    data: list[dict[str, Any]]
    has_more: bool


def check_page(limit: int, order: str) -> None:
    """The `input_items` arguments every store accepts (ValueError otherwise)."""
    if not 1 <= limit <= 100:
        raise ValueError("limit must be between 1 and 100")
    if order not in ("asc", "desc"):
        raise ValueError("order must be 'asc' or 'desc'")


@dataclass(frozen=True)
class PageBounds:
    """The rows of one `input_items` page: input items with `low < seq < high`, read
    `ascending` (or not), the page `reverse`d after reading."""

    low: int
    high: int
    ascending: bool
    reverse: bool


def page_bounds(order: str, after: str | None, before: str | None, after_seq: int | None,
                before_seq: int | None, *, top: int) -> PageBounds | None:
    """OpenAI's cursor rules for a page; `*_seq` are the cursors' positions (None when absent
    or unknown), `top` is above every seq. None: a cursor names no item, the page is empty."""
    if (after is not None and after_seq is None) or (before is not None and before_seq is None):
        return None
    # Exclusive bounds, whichever order the client reads in.
    low, high = (after_seq, before_seq) if order == "asc" else (before_seq, after_seq)
    # A before-only page is the `limit` items nearest the cursor, read away from it.
    toward_start = before is not None and after is None
    return PageBounds(-1 if low is None else low, top if high is None else high,
                      (order == "asc") != toward_start, toward_start)


class ResponseStore(Protocol):
    """What the HTTP handlers need from a response store (a server database could provide it)."""

    async def save_response(self, record: StoredResponse) -> None:
        """Insert or replace a response with its input and output items, atomically."""
        ...

    async def load_lineage(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """Items to continue from `response_id`: each turn's input then output, oldest first.

        None when the response is unknown to this owner or expired. Expired ancestors are
        included; a missing one (deleted, purged) ends the walk: the context starts after the gap.
        """
        ...

    async def get_response(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The ResponseResource as sent to the client, or None (unknown or expired)."""
        ...

    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Delete a response and its items; its children keep theirs. False if unknown or
        expired."""
        ...

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
        """A page of a live response's input items with OpenAI's cursor semantics, or None."""
        ...

    async def get_items(self, owner: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Items of this owner's live responses by id; unknown ids are left out."""
        ...

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete expired responses that no response continues from; returns how many."""
        ...

    # The name `timeout` is part of the agreed interface (ASYNC109 prefers asyncio.timeout).
    async def check_writable(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
        """True if a small write transaction commits within `timeout` seconds."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Counts and sizes for the admin and metrics endpoints."""
        ...

    async def vacuum(self) -> None:
        """Give free pages back to the file system."""
        ...

    def owner_id(self, credential: str | None) -> str:
        """The opaque owner of requests made with `credential` (None: anonymous)."""
        ...

    def known_unavailable(self) -> bool:
        """True for a moment after the store was found unreachable: a request that would
        have to save is refused at once (503) rather than after the upstream answered."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release the database."""
        ...


@runtime_checkable
class BackgroundStore(Protocol):
    """What background responses need on top of `ResponseStore`: an event log per response,
    leases on runs, and cancel requests every process sees.

    Writes to one run's log come from one process at a time (the lease holder) and are
    committed in sequence order, so a reader that saw event N has seen every event before N.
    `wait_notice` is how live followers and cancel watchers hear of changes made by other
    processes: a database with notifications (PostgreSQL LISTEN/NOTIFY) wakes them at once;
    SQLite has none, so it sleeps `poll_interval` and the caller looks again.
    """

    async def start_run(self, record: StoredResponse, events: Sequence[StoredEvent], *,
                        worker: str, lease_until: float) -> None:
        """Save the queued response, its first events and its run (leased by `worker`), in
        one transaction."""
        ...

    async def update_response(self, record: StoredResponse) -> None:
        """Replace a saved response's object and output items (progress of a run, or its end
        when its worker died); its input items stay as saved (`record.input_items` unused)."""
        ...

    async def append_events(self, batches: Sequence[EventBatch]) -> list[str]:
        """Append each batch to its run's log, finishing the runs whose batch says so, in one
        transaction; wakes the waiters of topic `events:<response_id>`. A batch whose run is
        gone, finished or leased to another worker is left out; returns those runs' ids."""
        ...

    async def read_events(self, response_id: str, after: int, limit: int = 500
                          ) -> list[StoredEvent]:
        """Up to `limit` kept events with `seq > after`, in order."""
        ...

    async def get_run(self, owner: str, response_id: str) -> RunInfo | None:
        """The run of this owner's background response, or None (not a background response,
        unknown, or expired)."""
        ...

    async def renew_leases(self, worker: str, response_ids: Sequence[str],
                           lease_until: float) -> None:
        """Extend the leases `worker` holds on these unfinished runs."""
        ...

    async def request_cancel(self, response_id: str) -> None:
        """Mark an unfinished run to be cancelled; wakes topic `cancel:<worker>` of its
        worker."""
        ...

    async def cancel_requests(self, worker: str) -> list[str]:
        """Unfinished runs of `worker` whose cancellation was requested."""
        ...

    async def claim_expired_runs(self, worker: str, now: float, lease_until: float
                                 ) -> list[RunInfo]:
        """Take over unfinished runs whose lease ran out before `now` (their worker died):
        each is leased to `worker` until `lease_until`, so one process settles it."""
        ...

    async def count_runs(self, owner: str) -> int:
        """Unfinished runs of `owner`, in every process."""
        ...

    async def purge_events(self, now: float) -> int:
        """Drop the events of finished runs kept until before `now`; the responses stay."""
        ...

    # True if `wait_notice` is woken by other processes' changes; False: it only sleeps, and
    # callers poll at their own (short) interval.
    notifies: bool

    async def wait_notice(self, topic: str, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait for a notice on `topic` from any process, at most `timeout` seconds; True if
        one came (without notifications: sleeps `timeout`, returns False)."""
        ...
