"""Encoding Open Responses events as server-sent events.

Each event is one `event: <type>\\ndata: <json>\\n\\n` block with a single-line JSON payload
(some clients parse per read, so a block is never split across our writes), and the stream ends
with the literal `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ujson

DONE_BLOCK = b"data: [DONE]\n\n"
KEEPALIVE_BLOCK = b": keep-alive\n\n"


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 as is, `/` unescaped; falls back to ASCII escapes for lone surrogates."""
    text: str = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a `\\ud800` escape upstream) cannot be UTF-8; as an escape it
        # is still valid JSON.
        text = ujson.dumps(value, ensure_ascii=True, escape_forward_slashes=False)
    return text


def encode_event(event: dict[str, Any]) -> bytes:
    data: str = ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False)
    block = f"event: {event['type']}\ndata: {data}\n\n"
    try:
        return block.encode("utf-8")
    except UnicodeEncodeError:
        return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def encode_events(events: Iterable[dict[str, Any]]) -> bytes:
    return b"".join([encode_event(event) for event in events])
