"""What ORP does with each request field of the Responses API: one treatment per field (the
data behind the README's "Request fields" table, which `test_surface` keeps equal to it).

The table covers the `openai` SDK's `ResponseCreateParams` and WebSocket `response.create`, the
spec's `CreateResponseBody`, and what real clients add (Codex's `client_metadata`).
`test_surface` walks the SDK's parameter types, so that a field added by a future SDK fails a
test instead of a client.

* translated: sent upstream in its Chat Completions form;
* honoured: ORP itself does what the field asks;
* no effect: accepted (shape checked), changes nothing in the result;
* refused: 400 `unsupported_parameter` naming the field (only for values that ORP can neither
  do nor ignore without silently changing the result). `null` means absent everywhere.
"""

from __future__ import annotations

from typing import Final

TRANSLATED: Final = "translated"
HONOURED: Final = "honoured"
NO_EFFECT: Final = "no effect"
REFUSED: Final = "refused"

# field path → (treatment, what exactly happens). `[]` marks the entries of an array.
FIELDS: Final[dict[str, tuple[str, str]]] = {
    "model": (HONOURED, "ORP_MODEL_MAP aliases resolved, then sent upstream; echoed as asked"),
    "input": (TRANSLATED, "items → chat messages (see Translation and Tools)"),
    "instructions": (TRANSLATED, "a leading system message; not carried to the next turn"),
    "previous_response_id": (HONOURED, "the stored (or connection-local) context is replayed"),
    "store": (HONOURED, "false: nothing written; null/absent: stored"),
    "stream": (HONOURED, "SSE when true; over WebSocket true is accepted, false refused"),
    "stream_options": (NO_EFFECT, "only with stream: true (HTTP)"),
    "stream_options.include_obfuscation": (NO_EFFECT, "ORP adds no obfuscation padding"),
    "metadata": (HONOURED, "stored and echoed"),
    "include": (HONOURED, "message.output_text.logprobs → chat logprobs; "
                "reasoning.encrypted_content: see Reasoning; the six hosted-tool values have "
                "nothing to include"),
    "tools": (TRANSLATED, "see Tools"),
    "tool_choice": (TRANSLATED, "see Tools"),
    "parallel_tool_calls": (TRANSLATED, "parallel_tool_calls (when there are tools)"),
    "max_tool_calls": (HONOURED, "see Tools"),
    "max_output_tokens": (TRANSLATED, "max_tokens (ORP_MAX_TOKENS_FIELD); at least 16"),
    "temperature": (TRANSLATED, "temperature"),
    "top_p": (TRANSLATED, "top_p"),
    "presence_penalty": (TRANSLATED, "presence_penalty (spec only; not in the SDK)"),
    "frequency_penalty": (TRANSLATED, "frequency_penalty (spec only; not in the SDK)"),
    "top_logprobs": (TRANSLATED, "top_logprobs, with include message.output_text.logprobs"),
    "text": (TRANSLATED, "see its fields"),
    "text.format": (TRANSLATED, "response_format (json_schema, json_object; text is the "
                    "default)"),
    "text.verbosity": (TRANSLATED, "verbosity (ORP_UPSTREAM_FORWARD)"),
    "reasoning": (TRANSLATED, "see its fields"),
    "reasoning.effort": (TRANSLATED, "reasoning_effort, every value incl. \"max\" verbatim"),
    "reasoning.summary": (HONOURED, "see Reasoning"),
    "reasoning.generate_summary": (HONOURED, "the deprecated name of reasoning.summary"),
    "reasoning.context": (NO_EFFECT, "the reasoning the client sends back is what is replayed"),
    "reasoning.mode": (REFUSED, "\"standard\" accepted; \"pro\" and others refused"),
    "prompt_cache_key": (TRANSLATED, "prompt_cache_key (ORP_UPSTREAM_FORWARD); echoed"),
    "safety_identifier": (TRANSLATED, "safety_identifier (ORP_UPSTREAM_FORWARD); up to 128 "
                          "characters as OpenAI documents (the spec says 64); echoed"),
    "user": (TRANSLATED, "user (ORP_UPSTREAM_FORWARD)"),
    "service_tier": (TRANSLATED, "service_tier (ORP_UPSTREAM_FORWARD; \"fast\" and "
                     "\"ultrafast\" as \"priority\"); the echo is the tier the upstream "
                     "reports, else \"default\""),
    "prompt_cache_retention": (NO_EFFECT, "a cache hint; backends cache prefixes themselves"),
    "prompt_cache_options": (NO_EFFECT, "see its fields"),
    "prompt_cache_options.mode": (NO_EFFECT, "a cache hint"),
    "prompt_cache_options.ttl": (NO_EFFECT, "a cache hint"),
    "prompt_cache_options.comparison_response_id": (NO_EFFECT, "a cache diagnostic"),
    "prompt_cache_options.prewarm": (HONOURED, "true: a warm-up like WebSocket generate: "
                                     "false (completed at once, no output, continuable)"),
    "truncation": (HONOURED, "\"auto\": when the upstream says the context does not fit, "
                   "the older half of the turns is dropped and the request sent again (system "
                   "and developer messages kept, a turn never split); \"disabled\"/null: that "
                   "400 context_length_exceeded is the answer"),
    "background": (HONOURED, "true: a background response (see Background responses); needs "
                             "store"),
    "background_options": (REFUSED, "see its fields"),
    "background_options.completion_window": (REFUSED, "\"soonest\" accepted (no effect); "
                                             "\"2h\"/\"8h\" (background only) refused"),
    "background_options.continuation_id": (REFUSED, "continues a background response"),
    "conversation": (REFUSED, "the Conversations API is OpenAI's; use previous_response_id"),
    "prompt": (REFUSED, "prompt templates live on OpenAI"),
    "moderation": (REFUSED, "no moderation model here; ignoring a block policy is unsafe"),
    "context_management": (REFUSED, "null and [] accepted; automatic compaction is not done "
                           "(use POST /v1/responses/compact)"),
    "context_management[].type": (REFUSED, "see context_management"),
    "context_management[].compact_threshold": (REFUSED, "see context_management"),
    "image": (NO_EFFECT, "see its fields"),
    "image.context_compression": (NO_EFFECT, "\"auto\"/\"disabled\" accepted; \"enabled\" "
                                  "refused"),
    "access_programs": (NO_EFFECT, "see its fields"),
    "access_programs.cyber": (NO_EFFECT, "\"standard\" accepted; other programs refused"),
    "multi_agent": (REFUSED, "beta; null or enabled: false accepted, enabled: true refused"),
    "multi_agent.enabled": (REFUSED, "see multi_agent"),
    "multi_agent.max_concurrent_subagents": (NO_EFFECT, "without enabled: true"),
    "client_metadata": (NO_EFFECT, "Codex's per-request labels"),
    # WebSocket response.create only.
    "type": (HONOURED, "WebSocket: \"response.create\" (other events: 400 naming type)"),
    "generate": (HONOURED, "WebSocket: false is a warm-up without the upstream"),
    "stream_id": (HONOURED, "WebSocket: echoed on every event of the turn"),
}

# Below these the SDK's types are not walked: input items and tools have their own sections,
# and nothing below a refused field is looked at.
OPAQUE: Final = frozenset({"input", "tools", "tool_choice", "text.format", "metadata",
                           "conversation", "prompt", "moderation", "client_metadata"})

# Fields refused whatever their (non-null) value.
ALWAYS_REFUSED: Final = frozenset({"conversation", "prompt", "moderation", "context_management",
                                   "background_options.continuation_id"})

# Fields where only these (non-null) values pass; every other valid value is refused.
ACCEPTED_ONLY: Final[dict[str, frozenset[object]]] = {
    "background_options.completion_window": frozenset({"soonest"}),
    "image.context_compression": frozenset({"auto", "disabled"}),
    "access_programs.cyber": frozenset({"standard"}),
    "reasoning.mode": frozenset({"standard"}),
    "multi_agent.enabled": frozenset({False}),
}

__all__ = ["ACCEPTED_ONLY", "ALWAYS_REFUSED", "FIELDS", "HONOURED", "NO_EFFECT", "OPAQUE",
           "REFUSED", "TRANSLATED"]
