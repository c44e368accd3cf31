"""The response store's interface: what the gateway needs from wherever responses are kept.

What `previous_response_id`, `GET/DELETE /v1/responses/{id}` and `/input_items` read, and what
`item_reference` inputs resolve against. `sqlite.SQLiteStore` is the embedded implementation,
`postgres.PostgresStore` the one several hosts share; `factory.open_store` picks one by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
class InputItemsPage:
    """A page of `GET /v1/responses/{id}/input_items`."""

    data: list[dict[str, Any]]
    has_more: bool


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

    async def close(self) -> None:
        """Finish pending writes and release the database."""
        ...
