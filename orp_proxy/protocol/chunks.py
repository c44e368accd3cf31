"""A shortcut past the JSON decoder for the one chunk shape that dominates a stream.

A Chat Completions server sends almost every token as the same bytes around a different
string: `{"id":"chatcmpl-1",...,"choices":[{"index":0,"delta":{"content":"` + text +
`"},"logprobs":null,"finish_reason":null}]}`. Once one such chunk has been decoded in full and
found to carry nothing but its text (`PlainText.learn`), a later payload that starts and ends
with exactly the same bytes differs from it only inside that string. It therefore means the
same to the transcoder except for the text, which is all `PlainText.text` decodes. Anything
else (another shape, a key that changes per chunk, a finish reason) misses the template and
takes the full decoder; so does a string the shortcut cannot prove is one JSON string.
"""

from __future__ import annotations

from typing import Any

import ujson

_CONTENT = b'"content":"'
_QUOTE = b'"'
_BACKSLASH = b"\\"


class PlainText:
    """The learnt template of a stream's plain text chunks (one per upstream stream)."""

    __slots__ = ("_end", "_hits", "_learning", "_prefix", "_size", "_start", "_suffix",
                 "_useless")

    def __init__(self) -> None:
        self._prefix = b""
        self._suffix = b""
        self._size = -1  # prefix + suffix; -1 until a template is learnt
        self._start = self._end = 0  # the text's slice: [len(prefix):-len(suffix)]
        self._hits = 0  # payloads the current template matched
        self._useless = 0  # templates replaced without a single match
        self._learning = True

    def text(self, payload: bytes) -> str | None:
        """The text of `payload` if it is a plain text chunk of the learnt shape, else None
        (the caller then decodes it in full)."""
        size = self._size
        if (size < 0 or len(payload) < size or not payload.startswith(self._prefix)
                or not payload.endswith(self._suffix)):
            return None
        middle = payload[self._start:self._end]
        if _BACKSLASH not in middle:
            if _QUOTE in middle:
                return None  # an unescaped quote: not one string, not the learnt shape
            try:
                text = middle.decode()
            except UnicodeDecodeError:
                return None  # the full decoder reports it
            self._hits += 1
            return text
        # Escapes: decoded by the JSON decoder, which also refuses a quote that would end the
        # string early (the rest would be trailing data).
        try:
            text = ujson.loads(b'"' + middle + b'"')
        except ValueError:
            return None
        if type(text) is not str:
            return None
        self._hits += 1
        return text

    def learn(self, payload: bytes, chunk: Any) -> None:
        """Take `payload` (decoded as `chunk`) as the template if it is a plain text chunk:
        one choice (0) whose delta has non-empty text and nothing else the transcoder reads,
        no finish reason, logprobs, usage, service tier or error, and text that appears in
        the payload exactly once, unescaped."""
        if not self._learning or type(chunk) is not dict or chunk.get("usage") or (
                chunk.get("error") or chunk.get("object") == "error"
                or chunk.get("service_tier")):
            return
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return
        choice = choices[0]
        if type(choice) is not dict or choice.get("index") not in (0, None) or (
                choice.get("finish_reason") or choice.get("logprobs")):
            return
        delta = choice.get("delta")
        if type(delta) is not dict:
            return
        content = delta.get("content")
        if type(content) is not str or not content or (
                delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("refusal") or delta.get("tool_calls")):
            return
        try:
            raw = content.encode()
        except UnicodeEncodeError:
            return  # a lone surrogate: it came escaped
        if _QUOTE in raw or _BACKSLASH in raw:
            return  # it came escaped; a later chunk will do
        needle = _CONTENT + raw + _QUOTE
        at = payload.find(needle)
        if at < 0 or payload.find(needle, at + 1) >= 0:
            return
        start = at + len(_CONTENT)
        prefix, suffix = payload[:start], payload[start + len(raw):]
        # Proof that the hole is the text the transcoder reads (and not, say, another
        # `content` key elsewhere): the template around another string decodes to it there.
        try:
            probe = ujson.loads(prefix + b"orp" + suffix)
            if probe["choices"][0]["delta"]["content"] != "orp":
                return
        except (ValueError, LookupError, TypeError):
            return
        if self._size >= 0 and not self._hits:
            # The last template never matched: this upstream varies its chunks (e.g. a
            # per-chunk nonce). After a few tries, stop paying for learning.
            self._useless += 1
            if self._useless >= 3:
                self._learning = False
        self._prefix, self._suffix = prefix, suffix
        self._size = len(prefix) + len(suffix)
        self._start, self._end = len(prefix), -len(suffix)  # the suffix holds the quote
        self._hits = 0
