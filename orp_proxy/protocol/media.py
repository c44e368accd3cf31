"""The media type of a `Content-Type` header, without aiohttp's parse.

aiohttp's `content_type` runs the email header parser and caches its result (a dict and a
mapping proxy) on the request or response for as long as that lives, which for a stream is
the whole stream: two of those per open stream, for one comparison each.
"""

from __future__ import annotations

DEFAULT = "application/octet-stream"


def media_type(value: str | None) -> str:
    """`type/subtype` of a Content-Type value, lower case, parameters dropped; as aiohttp's
    `content_type`, `application/octet-stream` for a missing or malformed value."""
    found = (value or "").partition(";")[0].strip().lower()
    return found if found.count("/") == 1 else DEFAULT
