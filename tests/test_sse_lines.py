"""The upstream line buffer: bytes split anywhere give the same payloads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orp_proxy.protocol.sse_lines import DONE, LineTooLong, SSELineBuffer


def feed_all(pieces: list[bytes], cap: int = 1 << 20) -> list[bytes]:
    buffer = SSELineBuffer(cap)
    out: list[bytes] = []
    for piece in pieces:
        out.extend(buffer.feed(piece))
    out.extend(buffer.flush())
    return out


def test_plain_events_and_done() -> None:
    data = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert feed_all([data]) == [b'{"a":1}', b'{"b":2}', DONE]


def test_crlf_comments_other_fields_and_no_space() -> None:
    data = (b': keep-alive\r\n\r\nevent: x\r\nid: 7\r\nretry: 10\r\ndata:{"a":1}\r\n\r\n'
            b"data: [DONE]\r\n\r\n")
    assert feed_all([data]) == [b'{"a":1}', DONE]


def test_several_data_lines_in_one_read_and_last_line_without_newline() -> None:
    assert feed_all([b'data: {"a":1}\ndata: {"b":2}\ndata: {"c":3}']) == [
        b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_split_inside_utf8_character_is_joined_before_decoding() -> None:
    text = 'data: {"content":"h\u00e9llo \u4e16\u754c \U0001f600"}\n\n'.encode()
    cut = text.index(b"\xe4") + 1  # in the middle of a three-byte character
    assert feed_all([text[:cut], text[cut:]]) == [text[6:-2]]


def test_empty_data_lines_are_skipped() -> None:
    assert feed_all([b"data:\n\ndata: \n\n"]) == []


def test_line_cap_applies_to_complete_and_pending_lines() -> None:
    with pytest.raises(LineTooLong):
        feed_all([b"data: " + b"x" * 100 + b"\n"], cap=50)
    with pytest.raises(LineTooLong):
        feed_all([b"data: " + b"x" * 100], cap=50)


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=30),
       st.booleans())
def test_any_split_gives_identical_payloads(cuts: list[int], crlf: bool) -> None:
    body = ('data: {"content":"caf\u00e9 \U0001f600"}\n\n: ping\n\n'
            'data: {"x":[1,2,"\\n\\u00e9"]}\n\ndata: [DONE]\n\n').encode()
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert feed_all(pieces) == feed_all([body])
