"""How items and responses are written as JSON text in either store, and read back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ujson

if TYPE_CHECKING:
    from orp_proxy.store.base import StoredResponse

# The `kind` column of an item row.
INPUT = 0
OUTPUT = 1

RecordRow = tuple[str, str, str | None, int, str, float | None, str]
ItemRow = tuple[int, int, str | None, str]


def dumps(obj: Any) -> str:
    """Compact JSON text, non-ASCII kept as is, that encodes to UTF-8 (a database's text)."""
    text: str = ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)
    if not text.isascii():
        # A lone surrogate (valid in a Python str, and in JSON as an escape) cannot be encoded
        # as UTF-8; the ASCII form escapes it and loads back identically.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = ujson.dumps(obj, ensure_ascii=True, escape_forward_slashes=False)
    return text


def loads_list(bodies: Iterable[str]) -> list[dict[str, Any]]:
    """Parse item bodies; one parse of the joined array is much faster than one per item."""
    items: list[dict[str, Any]] = ujson.loads("[" + ",".join(bodies) + "]")
    return items


def item_id(item: dict[str, Any]) -> str | None:
    """The item's `id` if it has a string one (what `item_reference` resolves against)."""
    value = item.get("id")
    return value if isinstance(value, str) else None


def encode_record(record: StoredResponse) -> tuple[RecordRow, list[ItemRow]]:
    """`record` as the `responses` row (its response without the output items) and the item
    rows (kind, position, id, JSON): the same for both stores and every write of a record."""
    response = dict(record.response)
    output = response.get("output")
    if output is None:
        output = []
    elif not isinstance(output, list):
        raise TypeError("response['output'] must be a list of items")
    if "output" in response:
        response["output"] = []
    items = [(INPUT, seq, item_id(item), dumps(item))
             for seq, item in enumerate(record.input_items)]
    items += [(OUTPUT, seq, item_id(item), dumps(item)) for seq, item in enumerate(output)]
    row = (record.id, record.owner, record.previous_response_id, int(record.created_at),
           record.status, record.expires_at, dumps(response))
    return row, items
