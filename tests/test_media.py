"""`media_type` reads a Content-Type as aiohttp's `content_type` does, without its parse."""

from __future__ import annotations

import pytest
from aiohttp.helpers import parse_content_type

from orp_proxy.protocol.media import media_type


@pytest.mark.parametrize("value", [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
    " application/json ;charset=UTF-8", "text/event-stream", "text/event-stream; charset=utf-8",
    "text/plain", "multipart/form-data; boundary=x", "application/x-ndjson", "", "json",
    "application/json garbage", "a/b/c", "application/problem+json",
])
def test_same_media_type_as_aiohttp(value: str) -> None:
    assert media_type(value) == parse_content_type(value)[0]


def test_missing_header_is_octet_stream_as_in_aiohttp() -> None:
    assert media_type(None) == "application/octet-stream"
