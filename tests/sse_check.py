"""Checks a byte stream of Open Responses events with clients we did not write.

- framing: `openresponses` (openresponses-py) `SSEParser`, exactly as its client reads a stream;
- each event: `openresponses-types` pydantic model for its `type`, and openresponses-py's own
  streaming-event union;
- lifecycle: openresponses-py's `StreamState` (sequence numbers, item/part added-before-done,
  nothing after done, `error` followed by `response.failed`, terminal event last);
- our own stricter rules on top: `event:` equals `type`, no `id:`, one `data:` line per event,
  sequence numbers 0, 1, 2, …, `[DONE]` last, every response object with all required keys.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import openresponses_types.types as ort
from openresponses.streaming import SSEParser, StreamState
from openresponses.types.protocol import StreamingEventAdapter
from pydantic import BaseModel

_SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "openapi-2026-04-24.json"
# Every key the spec marks required on a ResponseResource.
RESPONSE_KEYS: tuple[str, ...] = tuple(
    json.loads(_SPEC.read_text())["components"]["schemas"]["ResponseResource"]["required"])


EVENT_MODELS: dict[str, type[BaseModel]] = {}
for _name, _cls in vars(ort).items():
    if inspect.isclass(_cls) and _name.endswith("StreamingEvent") and issubclass(_cls, BaseModel):
        _type = _cls.model_fields["type"].annotation
        for _member in _type:  # type: ignore[union-attr]
            EVENT_MODELS[_member.value] = _cls

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def check_response_object(response: dict[str, Any]) -> None:
    missing = [key for key in RESPONSE_KEYS if key not in response]
    assert not missing, f"response object lacks required keys {missing}"
    ort.ResponseResource.model_validate(response)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                "top_logprobs", "tool_choice", "truncation", "tools", "text", "store",
                "background", "service_tier", "parallel_tool_calls", "metadata"):
        assert response[key] is not None, f"{key} must not be null"
    for item in response["output"]:
        for part in item.get("content") or ():
            if part["type"] == "output_text":
                assert part.get("logprobs") == [] or isinstance(part.get("logprobs"), list)


def check_event(event: dict[str, Any]) -> None:
    model = EVENT_MODELS.get(event["type"])
    assert model is not None, f"unknown event type {event['type']}"
    model.model_validate(event)
    if "response" in event:
        check_response_object(event["response"])


def parse_sse(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Events and whether `[DONE]` ended the stream, after every check above."""
    # Our own framing rules, on the raw text.
    text = data.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n"), f"stream must end with [DONE]: {text[-200:]!r}"
    blocks = text[: -len("data: [DONE]\n\n")].split("\n\n")
    assert blocks[-1] == ""
    for block in blocks[:-1]:
        if block.startswith(":"):
            continue  # keep-alive comment
        lines = block.split("\n")
        assert len(lines) == 2, f"an event is one event: line and one data: line: {block!r}"
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        payload = json.loads(lines[1][6:])
        assert lines[0][7:] == payload["type"]

    parser = SSEParser()
    parsed = parser.feed(data) + parser.finish()
    state = StreamState()
    events: list[dict[str, Any]] = []
    done = False
    for item in parsed:
        assert item.id is None, "servers SHOULD NOT use id"
        if item.data == "[DONE]":
            assert state.terminal_seen, "[DONE] before the terminal event"
            done = True
            continue
        assert not done, "nothing may follow [DONE]"
        payload = json.loads(item.data)
        assert item.event == payload["type"]
        check_event(payload)
        state.accept(StreamingEventAdapter.validate_python(payload))
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events and events[-1]["type"] in TERMINAL
    return events, done


def check_events(events: list[dict[str, Any]]) -> None:
    """The same checks for events that were not encoded (the transcoder's direct output)."""
    from orp_proxy.protocol.sse import DONE_BLOCK, encode_events

    parsed, done = parse_sse(encode_events(events) + DONE_BLOCK)
    assert done and parsed == json.loads(json.dumps(events))
