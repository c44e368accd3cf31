"""Which reasoning event names a client reads, decided from its request headers.

The spec names raw-reasoning events `response.reasoning.delta/.done`; OpenAI's API (and so every
client built on it) names them `response.reasoning_text.delta/.done`. Read from the clients'
sources (README, "Reasoning event names"):
- the `openai` Python SDK parses `response.reasoning.delta` as an audio event, so code matching
  on `response.reasoning_text.delta` (LangChain, pydantic-ai, the Agents SDK…) never sees it;
- the Vercel AI SDK's `@ai-sdk/open-responses` streams reasoning only from
  `response.reasoning_text.delta` or the summary events;
- Codex turns `response.reasoning_text.delta` into its raw-reasoning events;
- openresponses-py (strict) and the official compliance suite validate the spec's names.
`auto` therefore gives OpenAI's names to the clients that identify as one of the former and the
spec's names to everyone else.
"""

from __future__ import annotations

from collections.abc import Mapping


def _openai_client(headers: Mapping[str, str]) -> bool:
    agent = (headers.get("User-Agent") or "").lower()
    return (
        # Stainless-generated SDKs (openai Python and Node) send X-Stainless-Lang on every request.
        headers.get("X-Stainless-Lang") is not None
        or agent.startswith("openai/")
        # The Vercel AI SDK appends `ai-sdk/<provider>/<version>` to the User-Agent.
        or "ai-sdk/" in agent
        # Codex sends an `originator` header (codex_cli_rs, codex_exec, …).
        or headers.get("originator") is not None
        or agent.startswith("codex")
    )


def reasoning_event_style(setting: str, headers: Mapping[str, str] | None) -> str:
    """`spec` or `openai` for one request: the setting, or for `auto` the client's kind."""
    if setting != "auto":
        return setting
    return "openai" if headers is not None and _openai_client(headers) else "spec"
