"""Encoding Open Responses events as server-sent events.

Each event is one `event: <type>\\ndata: <json>\\n\\n` block with a single-line JSON payload
(some clients parse per read, so a block is never split across our writes), and the stream ends
with the literal `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from json.encoder import encode_basestring as _json_string
from typing import Any

import ujson

DONE_BLOCK = b"data: [DONE]\n\n"
KEEPALIVE_BLOCK = b": keep-alive\n\n"


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, `/` unescaped; lone surrogates (from a `\\ud800` escape upstream)
    cannot be UTF-8, so such a value falls back to ASCII escapes, still valid JSON."""
    text: str = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return ujson.dumps(value, ensure_ascii=True, escape_forward_slashes=False).encode()


def dumps(value: Any) -> str:
    """`json_bytes` as text (for log lines and WebSocket text frames)."""
    return json_bytes(value).decode()


def encode_event(event: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json_bytes(event))


_TEXT_DELTA = "response.output_text.delta"


def _text_delta_block(event: dict[str, Any]) -> str:
    """A text delta from a fixed template: only the delta string is escaped.

    Item ids are ours (`msg_` + hex) and the numbers are ints, so nothing else needs escaping.
    The standard library's C string escaper (`"`, `\\`, control characters; the rest as is)
    costs a tenth of a `ujson.dumps` call with options, on the path taken once per token.
    """
    return (
        'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        f'"sequence_number":{event["sequence_number"]},"item_id":"{event["item_id"]}",'
        f'"output_index":{event["output_index"]},"content_index":{event["content_index"]},'
        f'"delta":{_json_string(event["delta"])},"logprobs":[]}}\n\n'
    )


def encode_events(events: Sequence[dict[str, Any]]) -> bytes:
    """The SSE blocks of `events`, encoded to UTF-8 once for the whole batch."""
    blocks = []
    for event in events:
        if event["type"] == _TEXT_DELTA and not event["logprobs"]:
            blocks.append(_text_delta_block(event))
        else:
            blocks.append(f"event: {event['type']}\ndata: "
                          f"{ujson.dumps(event, ensure_ascii=False, escape_forward_slashes=False)}"
                          "\n\n")
    text = "".join(blocks)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Rare: a lone surrogate somewhere in the batch; encode event by event with escapes.
        return b"".join([encode_event(event) for event in events])
