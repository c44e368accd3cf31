"""The `ResponseResource` object: ids, and the request settings it echoes.

Every response object we send (in `response.created`, `response.in_progress`, the terminal event
and the JSON body) carries all keys the spec marks required, with zero values instead of nulls
where the spec says the field is not nullable.
"""

from __future__ import annotations

import time
from typing import Any

from orp_proxy.ids import random_hex
from orp_proxy.protocol.tools import is_hosted


def new_id(prefix: str) -> str:
    """`resp_…`, `msg_…`, `fc_…`, `rs_…`: a prefix and 32 random hex digits."""
    return f"{prefix}_{random_hex()}"


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    """A declared tool as the response echoes it: as declared, functions with every key of the
    spec's form."""
    if tool.get("type") != "function":
        return dict(tool)
    return {
        **tool,
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _tool_choice_echo(choice: Any) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "allowed_tools":
        return {
            "type": "allowed_tools",
            "tools": [dict(t) for t in choice["tools"]],
            "mode": choice.get("mode") or "auto",
        }
    return dict(choice)


def _text_echo(text: Any, *, verbosity_applied: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"format": {"type": "text"}}
    if not isinstance(text, dict):
        return out
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["format"] = {
            "type": "json_schema",
            "name": fmt["name"],
            "description": fmt.get("description"),
            "schema": fmt.get("schema"),
            "strict": bool(fmt.get("strict")),
        }
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["format"] = {"type": "json_object"}
    if verbosity_applied and text.get("verbosity") is not None:
        out["verbosity"] = text["verbosity"]
    return out


def _number(value: Any, default: float) -> float:
    return default if value is None else float(value)


def build_response(
    body: dict[str, Any],
    *,
    model: str,
    response_id: str | None = None,
    created_at: int | None = None,
    verbosity_applied: bool = True,
) -> dict[str, Any]:
    """The in-progress response object for a validated request body.

    `model` is the name the client asked for (aliases are resolved only on the way upstream).
    `verbosity_applied`: whether `text.verbosity` goes upstream; the echo never claims a
    setting that was not passed on.
    """
    reasoning = body.get("reasoning")
    return {
        "id": response_id or new_id("resp"),
        "object": "response",
        "created_at": int(time.time()) if created_at is None else created_at,
        "completed_at": None,
        "status": "in_progress",
        "incomplete_details": None,
        "model": model,
        "previous_response_id": body.get("previous_response_id"),
        "instructions": body.get("instructions"),
        "output": [],
        "error": None,
        # Hosted tools ORP dropped are not echoed: the model never had them (the
        # X-ORP-Dropped-Tools header and the log name them).
        "tools": [_tool_echo(t) for t in body.get("tools") or () if not is_hosted(t)],
        "tool_choice": _tool_choice_echo(body.get("tool_choice")),
        "truncation": body.get("truncation") or "disabled",
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "text": _text_echo(body.get("text"), verbosity_applied=verbosity_applied),
        "top_p": _number(body.get("top_p"), 1.0),
        "presence_penalty": _number(body.get("presence_penalty"), 0.0),
        "frequency_penalty": _number(body.get("frequency_penalty"), 0.0),
        "top_logprobs": body.get("top_logprobs") or 0,
        "temperature": _number(body.get("temperature"), 1.0),
        "reasoning": (
            {"effort": reasoning.get("effort"),
             "summary": reasoning.get("summary") or reasoning.get("generate_summary")}
            if isinstance(reasoning, dict)
            else None
        ),
        "usage": None,
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "store": body.get("store") is not False,
        "background": False,
        # What the upstream reports serving it with (the transcoder sets it), else "default".
        "service_tier": "default",
        "metadata": body.get("metadata") or {},
        "safety_identifier": body.get("safety_identifier"),
        "prompt_cache_key": body.get("prompt_cache_key"),
    }


def _count(value: Any) -> int:
    """A token count as the spec wants it: a non-negative integer (0 for anything else)."""
    if type(value) is int:
        return value if value >= 0 else 0
    if type(value) is float and value == value and 0 <= value < 2**63:
        return int(value)
    return 0


def _details(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else {}


def _reported_reasoning(usage: dict[str, Any]) -> Any:
    """The upstream's reasoning-token count, wherever it puts it; None if it reports none.

    OpenAI, DeepSeek and OpenRouter use `completion_tokens_details.reasoning_tokens`, SGLang a
    top-level `reasoning_tokens`; vLLM and llama.cpp report no such count."""
    details = _details(usage.get("completion_tokens_details"))
    if details.get("reasoning_tokens") is not None:
        return details["reasoning_tokens"]
    return usage.get("reasoning_tokens")


def usage_from_chat(usage: dict[str, Any], *, reasoning_estimate: int = 0) -> dict[str, Any]:
    """Chat Completions `usage` → Open Responses `usage`, every detail field present.

    `reasoning_estimate` stands in for the reasoning-token count when the upstream reports none
    (capped at the output tokens)."""
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    reported = _reported_reasoning(usage)
    reasoning = (_count(reported) if reported is not None
                 else min(reasoning_estimate, completion))
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": _count(usage.get("total_tokens")) or prompt + completion,
        "input_tokens_details": {
            "cached_tokens": _count(_details(usage.get("prompt_tokens_details"))
                                    .get("cached_tokens"))},
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }
