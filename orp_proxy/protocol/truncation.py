"""`truncation: "auto"`: what is left of a context when it does not fit the model's window.

The spec lets a server drop earlier parts of the context for "auto" (preserving system messages
and recent turns). ORP cannot know a backend's window or tokenizer in advance, so it only
shortens after the upstream said the context does not fit, and then by whole turns: a turn
starts at a user message, so a tool call is never separated from its output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_INSTRUCTION_ROLES = frozenset({"system", "developer"})


def _is_message(item: Mapping[str, Any], roles: frozenset[str]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") in roles


def drop_older_turns(context: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """`context` without the older half of its turns (the leading system and developer
    messages kept); None when only the latest turn is left, so nothing can be dropped."""
    lead = 0
    while lead < len(context) and _is_message(context[lead], _INSTRUCTION_ROLES):
        lead += 1
    rest = context[lead:]
    starts = [i for i, item in enumerate(rest)
              if i > 0 and _is_message(item, frozenset({"user"}))]
    if not starts:
        return None
    half = len(rest) // 2
    cut = next((i for i in starts if i >= half), starts[-1])
    return [*context[:lead], *rest[cut:]]


__all__ = ["drop_older_turns"]
