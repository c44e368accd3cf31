"""Tool outputs must answer a call of their context, as OpenAI requires.

Chat backends differ here: vLLM and llama.cpp accept a `tool` message whose `tool_call_id`
matches nothing and the model answers as if it had called something; others fail with a 400
that names no input item. So ORP checks it itself, on every backend, with the client's path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from orp_proxy.errors import invalid

# Items that call a client-side tool, and the items that carry its result back.
CALL_TYPES: Final = frozenset({"function_call", "custom_tool_call", "shell_call",
                               "apply_patch_call", "local_shell_call", "tool_search_call"})
OUTPUT_TYPES: Final = frozenset({"function_call_output", "custom_tool_call_output",
                                 "shell_call_output", "apply_patch_call_output"})


def check_outputs_answer_calls(history: Sequence[Mapping[str, Any]],
                               new_items: Sequence[Mapping[str, Any]]) -> None:
    """400 `input[i].call_id` for the first new output whose call is nowhere in the context
    (the history, or the new input before or after it).

    After a `compaction` item the calls before it are folded into its summary and cannot be
    looked up, so outputs after one are not checked (a client may answer a call the summary
    ends with)."""
    outputs = [i for i, item in enumerate(new_items) if item.get("type") in OUTPUT_TYPES]
    if not outputs:
        return
    calls: set[str] = set()
    compacted = False
    for item in history:
        kind = item.get("type")
        if kind in CALL_TYPES and isinstance(item.get("call_id"), str):
            calls.add(item["call_id"])
        elif kind == "compaction":
            compacted = True
    compacted_from = len(new_items)  # index of the first compaction item of the new input
    for i, item in enumerate(new_items):
        kind = item.get("type")
        if kind in CALL_TYPES and isinstance(item.get("call_id"), str):
            calls.add(item["call_id"])
        elif kind == "compaction" and compacted_from == len(new_items):
            compacted_from = i
    for i in outputs:
        call_id = new_items[i].get("call_id")
        if compacted or i > compacted_from or not isinstance(call_id, str):
            continue
        if call_id not in calls:
            shown = call_id if len(call_id) <= 64 else f"{call_id[:64]}..."
            raise invalid(
                f"No tool call found for {new_items[i]['type']} with call_id '{shown}': "
                "each tool output must answer a call in the input or in the response it "
                "continues (previous_response_id).",
                f"input[{i}].call_id",
                "invalid_value",
            )


__all__ = ["CALL_TYPES", "OUTPUT_TYPES", "check_outputs_answer_calls"]
