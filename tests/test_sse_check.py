"""The stream checker itself must reject broken streams, or the e2e tests prove nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from orp_proxy.protocol.resource import build_response
from orp_proxy.protocol.sse import DONE_BLOCK, encode_events
from orp_proxy.protocol.transcoder import Transcoder
from orp_proxy.upstream.mock import text_chunks
from tests.sse_check import parse_sse


def good_events() -> list[dict[str, Any]]:
    tc = Transcoder(build_response({"model": "m"}, model="m"))
    tc.start()
    for chunk in text_chunks(["a", "b"]):
        tc.feed(chunk)
    tc.finish()
    return copy.deepcopy(tc.take())


def test_good_stream_passes() -> None:
    events, done = parse_sse(encode_events(good_events()) + DONE_BLOCK)
    assert done and len(events) == 10


def drop_required_key(events: list[dict[str, Any]]) -> bytes:
    del events[-1]["response"]["temperature"]
    return encode_events(events) + DONE_BLOCK


def null_top_p(events: list[dict[str, Any]]) -> bytes:
    events[0]["response"]["top_p"] = None
    return encode_events(events) + DONE_BLOCK


def skip_sequence(events: list[dict[str, Any]]) -> bytes:
    events[3]["sequence_number"] = 7
    return encode_events(events) + DONE_BLOCK


def delta_after_done(events: list[dict[str, Any]]) -> bytes:
    events.insert(8, dict(events[4]))
    for i, event in enumerate(events):
        event["sequence_number"] = i
    return encode_events(events) + DONE_BLOCK


def no_done(events: list[dict[str, Any]]) -> bytes:
    return encode_events(events)


def mismatched_event_name(events: list[dict[str, Any]]) -> bytes:
    return encode_events(events).replace(b"event: response.in_progress",
                                         b"event: response.created", 1) + DONE_BLOCK


def missing_terminal(events: list[dict[str, Any]]) -> bytes:
    return encode_events(events[:-1]) + DONE_BLOCK


def two_data_lines(events: list[dict[str, Any]]) -> bytes:
    return encode_events(events).replace(b"data: {", b"data: \ndata: {", 1) + DONE_BLOCK


@pytest.mark.parametrize("breaker", [drop_required_key, null_top_p, skip_sequence,
                                     delta_after_done, no_done, mismatched_event_name,
                                     missing_terminal, two_data_lines])
def test_broken_streams_are_rejected(breaker: Callable[[list[dict[str, Any]]], bytes]) -> None:
    with pytest.raises(Exception):  # noqa: B017 - assertion or validation error, either way
        parse_sse(breaker(good_events()))
