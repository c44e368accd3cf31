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
        if self._parts:
            if data.find(b"\n") < 0:
                self._parts.append(data)
                self._size += len(data)
                if self._size > self._max_line:
                    raise self._too_long()
                return []
            # The pending line ends in this read: it is scanned once more, in one piece.
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
        # One C-level split per read, not a find per line: a fast upstream packs dozens of
        # chunks into one read.
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(data) > self._max_line and (
                len(rest) > self._max_line or any(len(line) > self._max_line for line in lines)):
            raise self._too_long()
        if rest:
            self._parts.append(rest)
            self._size = len(rest)
        out: list[bytes] = []
        for line in lines:
            if line.startswith(b"data:"):
                if line.endswith(b"\r"):  # CRLF line end
                    line = line[:-1]
                payload = line[6:] if line[5:6] == b" " else line[5:]
                if payload:
                    out.append(payload)
            # Anything else is a blank line, a comment or another field: Chat Completions
            # carries nothing there. A lone CR as line separator is used by no server we know.
        return out

    def flush(self) -> list[bytes]:
        """At end of body: a last line without its newline still counts."""
        if not self._parts:
            return []
        line = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return self.feed(line + b"\n")
