"""Scrubbing upstream error messages before a client sees them.

An upstream's error text is written for its operator: it may name internal hosts, addresses,
URLs, or echo a key. Clients get the message with those replaced by markers, unless the operator
opts in to verbatim messages (`ORP_EXPOSE_UPSTREAM_ERRORS`). The patterns err towards removing
too much (a file name that looks like a host name is lost) rather than too little.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_BEARER = re.compile(r"(?i)\b(?:bearer|basic|token)\s+[^\s'\",;]+")
# OpenAI-style keys (sk-..., sk-proj-..., masked ones with '*') and `api_key=...` pairs.
_KEY_LIKE = re.compile(r"(?i)\b(?:sk|pk|rk)-[A-Za-z0-9_*\-]{6,}"
                       r"|(?i:api[_-]?key|secret|password|token)\s*[=:]\s*[^\s'\",;]+")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=*]{32,}")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b")
_IPV6 = re.compile(r"\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\](?::\d{1,5})?"
                   r"|\b(?:[0-9a-fA-F]{1,4}:){3,7}[0-9a-fA-F]{1,4}\b"
                   r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:)*:(?::?[0-9a-fA-F]{1,4})+\b")
# Dotted names whose last label looks like a top-level domain (starts with a letter, 2+ chars):
# `gpu-7.cluster.internal`, not `llama-3.1-8b` or `e.g.`.
_DOTTED_HOST = re.compile(r"\b(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.)+"
                          r"[a-zA-Z][a-zA-Z0-9-]*[a-zA-Z0-9]\b(?::\d{1,5})?")
_HOST_PORT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9-]*:\d{2,5}\b")
# A last label that names a Python class, not a domain: `litellm.RateLimitError`,
# `openai.APIError`, `litellm.Timeout` (CamelCase, or an exception's usual ending).
_CLASS_LABEL = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*[A-Z][A-Za-z0-9]*"
                          r"|(?:[A-Z][A-Za-z0-9]*)?(?:Error|Exception|Warning|Timeout)")


def _host_or_name(match: re.Match[str]) -> str:
    text = match.group(0)
    if ":" not in text and _CLASS_LABEL.fullmatch(text.rsplit(".", 1)[1]):
        return text  # an exception's dotted name, which the client may need to see
    return "[host]"


class Scrubber:
    """Removes hosts, addresses, URLs and secrets from text; `literals` are always removed
    (the upstream's host name and the keys in use, which need not match any pattern)."""

    def __init__(self, literals: Iterable[str] = ()) -> None:
        words = sorted({w for w in literals if w and len(w) >= 3}, key=len, reverse=True)
        self._literals = (re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE)
                          if words else None)

    def __call__(self, text: str) -> str:
        if self._literals is not None:
            text = self._literals.sub("[redacted]", text)
        text = _URL.sub("[url]", text)
        text = _BEARER.sub("[redacted]", text)
        text = _KEY_LIKE.sub("[redacted]", text)
        text = _IPV4.sub("[address]", text)
        text = _IPV6.sub("[address]", text)
        text = _DOTTED_HOST.sub(_host_or_name, text)
        text = _HOST_PORT.sub("[host]", text)
        return _LONG_TOKEN.sub("[redacted]", text)
