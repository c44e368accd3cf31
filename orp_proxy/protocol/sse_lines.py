"""Hand-rolled line buffer for the upstream's `text/event-stream` body.

Bytes arrive split anywhere: mid-line, between CR and LF, inside a UTF-8 sequence. We split on
the LF *byte* and decode nothing here: UTF-8 never uses 0x0A inside a multi-byte character, and
the JSON decoder takes bytes, so a character cut in half by the network is joined again before
anyone looks at it. Lines are capped so a broken upstream cannot make us buffer without bound.
"""

from __future__ import annotations

DONE = b"[DONE]"
"""The payload of the stream's last line, `data: [DONE]`."""


class LineTooLong(ValueError):
    """The upstream sent a line longer than the configured cap."""


class SSELineBuffer:
    """Feeds raw body bytes, yields the payload of each `data:` line (`DONE` at the end).

    Chat Completions servers put one JSON object per `data:` line; blank lines, comments
    (`: keep-alive`), `event:`/`id:`/`retry:` fields are ignored, as is a trailing CR.
    """

    __slots__ = ("_max_line", "_parts", "_size")

    def __init__(self, max_line_bytes: int = 4 * 1024 * 1024) -> None:
        # An unfinished line is kept as its pieces: each read is scanned once, so a long line
        # arriving in many reads costs linear time, not a rescan of everything pending.
        self._parts: list[bytes] = []
        self._size = 0
        self._max_line = max_line_bytes

    def _too_long(self) -> LineTooLong:
        return LineTooLong(f"upstream line longer than {self._max_line} bytes")

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete `data:` payloads in `data` (plus what was pending)."""
        out: list[bytes] = []
        start = 0
        find = data.find
        if self._parts:
            end = find(b"\n")
            if end < 0:
                self._parts.append(data)
                self._size += len(data)
                if self._size > self._max_line:
                    raise self._too_long()
                return out
            self._parts.append(data[:end])
            line = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            if len(line) > self._max_line:
                raise self._too_long()
            self._line(line, 0, len(line), out)
            start = end + 1
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            if end - start > self._max_line:
                raise self._too_long()
            self._line(data, start, end, out)
            start = end + 1
        rest = len(data) - start
        if rest:
            if rest > self._max_line:
                raise self._too_long()
            self._parts.append(data[start:])
            self._size = rest
        return out

    def flush(self) -> list[bytes]:
        """At end of body: a last line without its newline still counts."""
        out: list[bytes] = []
        if self._parts:
            line = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            self._line(line, 0, len(line), out)
        return out

    @staticmethod
    def _line(data: bytes, start: int, end: int, out: list[bytes]) -> None:
        if end > start and data[end - 1] == 13:  # CRLF line end
            end -= 1
        if end - start < 5 or data[start : start + 5] != b"data:":
            # Blank line, comment or another field; Chat Completions carries nothing there.
            # A lone CR as line separator is not used by any server we know of.
            return
        start += 5
        if start < end and data[start] == 32:
            start += 1
        if start < end:
            out.append(data[start:end])
