"""Open Responses request → Chat Completions request.

Three steps: `normalize_input` turns the client's `input` into typed items with ids (what the
store keeps and what `input_items` lists), `to_chat_messages` turns a whole context (stored
lineage + new items) into Chat Completions messages, and `build_chat_request` wraps them with the
request's options into one `POST /chat/completions` body.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orp_proxy.config import Quirks, Settings
from orp_proxy.protocol.resource import new_id
from orp_proxy.protocol.tools import ToolSet, call_arguments, call_kind, output_text

_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "compaction": "cmp",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "shell_call": "sh",
    "shell_call_output": "sho",
    "local_shell_call": "lsh",
    "apply_patch_call": "apc",
    "apply_patch_call_output": "apco",
    "tool_search_call": "tsc",
    "tool_search_output": "tso",
}
# Items that become an assistant message's `tool_calls`, and those that become `tool` messages.
CALL_ITEMS = frozenset({"function_call", "custom_tool_call", "shell_call", "local_shell_call",
                        "apply_patch_call", "tool_search_call"})
OUTPUT_ITEMS = frozenset({"function_call_output", "custom_tool_call_output", "shell_call_output",
                          "local_shell_call_output", "apply_patch_call_output",
                          "tool_search_output"})


def item_type(item: Mapping[str, Any]) -> str:
    """The item's type, applying the spec's defaults for items that omit it."""
    kind = item.get("type")
    if kind:
        return str(kind)
    return "message" if "role" in item else "item_reference"


# Item types whose `status` the spec requires (messages, calls and their outputs), plus
# reasoning, which carries one in what we emit (as in OpenAI's API). Input items may omit it;
# what we store and list has it.
_WITH_STATUS = frozenset({"message", "function_call", "function_call_output", "reasoning"})


def with_status(item: dict[str, Any]) -> dict[str, Any]:
    """`item`, or a copy with `status: completed` if its type has a status and it lacks one
    (items stored before every item got one)."""
    if "status" in item or item.get("type") not in _WITH_STATUS:
        return item
    return dict(item, status="completed")


def normalize_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one validated input item with `type`, `id` and `status` set and string
    content as parts."""
    kind = item_type(item)
    out = dict(item)
    out["type"] = kind
    if not out.get("id"):
        out["id"] = new_id(_ID_PREFIX.get(kind, "item"))
    if kind == "message":
        content = out.get("content")
        if isinstance(content, str):
            if out.get("role") == "assistant":
                out["content"] = [{"type": "output_text", "text": content, "annotations": []}]
            else:
                out["content"] = [{"type": "input_text", "text": content}]
    if kind in _WITH_STATUS:
        out.setdefault("status", "completed")
    return out


def normalize_input(value: Any) -> list[dict[str, Any]]:
    """The request's `input` (string, item list or null) as normalised items.

    `item_reference` items are kept as they are; the handler resolves them against the store.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [normalize_item({"type": "message", "role": "user", "content": value})]
    return [
        dict(item) if item_type(item) == "item_reference" else normalize_item(item)
        for item in value
    ]


# -- items → chat messages ----------------------------------------------------------------


# Text parts of one message become one string joined with a newline, as vLLM joins them for
# its chat templates: "Translate this:" + "Bonjour" must not read "Translate this:Bonjour".
# (A string rather than a parts array: every chat template understands it.)
_PART_SEPARATOR = "\n"


def _joined_text(content: Any, key: str = "text") -> str:
    if isinstance(content, str):
        return content
    return _PART_SEPARATOR.join(part.get(key) or "" for part in content)


def _user_part(part: Mapping[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "input_text":
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail"):
            # "original" (full resolution) is OpenAI's; "high" is the most chat servers know.
            image["detail"] = "high" if part["detail"] == "original" else part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("filename", "file_data", "file_url") if part.get(k)}
        return {"type": "file", "file": file}
    if kind == "input_video":
        return {"type": "video_url", "video_url": {"url": part["video_url"]}}
    raise ValueError(f"unsupported content part {kind!r}")


def _user_content(content: Any) -> Any:
    if isinstance(content, str):
        return content
    parts = [_user_part(p) for p in content]
    if all(p["type"] == "text" for p in parts):
        # Text-only content as one string: the shape every legacy chat template understands.
        return _PART_SEPARATOR.join(p["text"] for p in parts)
    return parts


def reasoning_text(item: Mapping[str, Any]) -> str:
    """The text of a reasoning item: its `content` (raw reasoning), else its `summary` parts.

    Sealed items have been opened before this (`summaries.replay_sealed`), so `content` holds
    the unsealed text. Clients that only keep summaries (LangChain, pydantic-ai, the Vercel AI
    SDK) send those back, and for ORP's own output the summary is the same text.
    """
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            texts = [p.get("text") or "" for p in parts if isinstance(p, Mapping)]
            text = "\n\n".join(t for t in texts if t)
            if text:
                return text
    return ""


# Upstream message fields that carry replayed reasoning, per ORP_UPSTREAM_REASONING_FIELD.
REASONING_FIELDS = {
    "reasoning_content": ("reasoning_content",),
    "reasoning": ("reasoning",),
    "both": ("reasoning_content", "reasoning"),
    "none": (),
}


class _Messages:
    """Accumulates chat messages, merging what Chat Completions keeps in one message."""

    def __init__(self, developer_role: str, tools: ToolSet,
                 reasoning_field: str = "both") -> None:
        self.messages: list[dict[str, Any]] = []
        self.developer_role = developer_role
        self.tools = tools
        # local_shell_call_output names its call by the call item's `id`: id → call_id.
        self._local_shell_ids: dict[str, str] = {}
        self._last_search = ""
        self.reasoning_fields = REASONING_FIELDS[reasoning_field]
        # Reasoning waiting for the assistant message it belongs to (the next one).
        self._reasoning: list[str] = []
        # Non-text parts of tool outputs, sent as a user message after the run of tool messages
        # (Chat Completions `tool` messages carry text only).
        self._tool_media: list[dict[str, Any]] = []

    def _flush_media(self) -> None:
        if self._tool_media:
            self.messages.append({"role": "user", "content": self._tool_media})
            self._tool_media = []

    def add(self, item: Mapping[str, Any]) -> None:
        kind = item_type(item)
        if kind == "reasoning":
            if self.reasoning_fields:
                text = reasoning_text(item)
                if text:
                    self._reasoning.append(text)
            return
        if kind not in OUTPUT_ITEMS:
            self._flush_media()
        if kind == "message":
            self._message(item)
        elif kind in CALL_ITEMS:
            self._function_call(item)
        elif kind in OUTPUT_ITEMS:
            self._function_output(item)
        # Whatever reasoning is still pending was not followed by the model's own output (a
        # user message came next): no assistant message carries it, so it stays out.
        self._reasoning.clear()

    def _attach_reasoning(self, message: dict[str, Any]) -> None:
        """Put the pending reasoning on `message` (an assistant message) in the backend's field."""
        if not self._reasoning:
            return
        text = "\n\n".join(self._reasoning)
        self._reasoning.clear()
        for field in self.reasoning_fields:
            earlier = message.get(field)
            message[field] = f"{earlier}\n\n{text}" if earlier else text

    def _message(self, item: Mapping[str, Any]) -> None:
        role = item["role"]
        content = item["content"]
        if role == "user":
            self.messages.append({"role": "user", "content": _user_content(content)})
        elif role == "assistant":
            self._assistant(content)
        else:
            target = self.developer_role if role == "developer" else "system"
            self.messages.append({"role": target, "content": _joined_text(content)})

    def _assistant(self, content: Any) -> None:
        if isinstance(content, str):
            texts, refusals = [content], []
        else:
            texts = [p.get("text") or "" for p in content if p["type"] == "output_text"]
            refusals = [p.get("refusal") or "" for p in content if p["type"] == "refusal"]
        text = _PART_SEPARATOR.join(texts)
        refusal = _PART_SEPARATOR.join(refusals)
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            # Text after the calls of the same turn (output `[function_call, message]`) joins
            # the message holding the calls: the tool messages answering them must follow
            # it directly (OpenAI and Azure refuse anything in between).
            if text:
                last["content"] = _PART_SEPARATOR.join(filter(None, (last["content"], text)))
            if refusal:
                last["refusal"] = _PART_SEPARATOR.join(filter(None, (last.get("refusal"),
                                                                     refusal)))
            self._attach_reasoning(last)
            return
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if refusal:
            # Chat Completions has a field for it; in `content` the model would read its own
            # refusal as something it said.
            message["refusal"] = refusal
        self._attach_reasoning(message)
        self.messages.append(message)

    def _function_call(self, item: Mapping[str, Any]) -> None:
        kind = call_kind(item)
        call_id = item.get("call_id") or item.get("id") or new_id("call")
        if kind == "local_shell" and item.get("id"):
            self._local_shell_ids[item["id"]] = call_id
        elif kind == "tool_search":
            self._last_search = call_id  # its output may name no call_id (it is optional)
        name = self.tools.upstream_name(kind, item.get("name"), item.get("namespace"))
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": call_arguments(item)},
        }
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant":
            # The model's text and the calls it made in the same turn are one chat message,
            # and so is the reasoning that came before either.
            last.setdefault("tool_calls", []).append(call)
            if not last.get("content"):
                last["content"] = None
            self._attach_reasoning(last)
        else:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            self._attach_reasoning(message)
            self.messages.append(message)

    def _function_output(self, item: Mapping[str, Any]) -> None:
        text_only = output_text(item)
        if text_only is not None:
            call_id = item.get("call_id")
            if item["type"] == "local_shell_call_output":
                call_id = self._local_shell_ids.get(item["id"], item["id"])
            elif item["type"] == "tool_search_output" and not call_id:
                call_id = self._last_search
            self.messages.append({"role": "tool", "tool_call_id": call_id or "",
                                  "content": text_only})
            return
        output = item["output"]
        if isinstance(output, str):
            text = output
        else:
            texts = []
            for part in output:
                if part["type"] == "input_text":
                    texts.append(part["text"])
                else:
                    self._tool_media.append(_user_part(part))
            text = _PART_SEPARATOR.join(texts)
        self.messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})

    def finish(self) -> list[dict[str, Any]]:
        self._flush_media()
        return self.messages


def to_chat_messages(
    items: Iterable[Mapping[str, Any]], *, instructions: str | None, developer_role: str,
    reasoning_field: str = "both", tools: ToolSet | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for a context of items, `instructions` first as a system message.

    A reasoning item goes on the assistant message that follows it (the text and tool calls of
    the same turn), in the field(s) `reasoning_field` names; nothing else carries it.
    `tools` names the upstream functions of call items (namespaced, custom and built-in).
    """
    builder = _Messages(developer_role, tools if tools is not None else ToolSet(),
                        reasoning_field)
    if instructions:
        builder.messages.append({"role": "system", "content": instructions})
    for item in items:
        builder.add(item)
    return builder.finish()


# -- tools and the rest of the body -------------------------------------------------------


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        return None
    fmt = text.get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] != "json_schema":
        return None
    schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
    if fmt.get("description") is not None:
        schema["description"] = fmt["description"]
    if fmt.get("strict") is not None:
        schema["strict"] = fmt["strict"]
    return {"type": "json_schema", "json_schema": schema}


_PASSTHROUGH = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def build_chat_request(
    body: Mapping[str, Any],
    messages: list[dict[str, Any]],
    *,
    model: str,
    settings: Settings,
    quirks: Quirks | None = None,
    tools: ToolSet | None = None,
) -> dict[str, Any]:
    """The Chat Completions body: always streamed, always asking for usage. `quirks`: the
    target upstream's (default: the process-wide settings'). `tools`: the request's `ToolSet`
    (built from `body` if not given)."""
    q = quirks if quirks is not None else settings.quirks
    chat: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools is None:
        tools = ToolSet.build(body.get("tools"))
    if tools:
        chat["tools"] = tools.chat_tools()
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = tools.chat_tool_choice(body["tool_choice"],
                                                         q.tool_choice_object)
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get("max_output_tokens") is not None:
        chat[q.max_tokens_field] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None:
        switch = q.thinking_kwarg
        if switch:
            # Hybrid thinking models (Qwen3, GLM, DeepSeek-V3.1 …) switch thinking with a chat
            # template argument; "none" and "minimal" turn it off and then no effort is sent
            # (vLLM accepts only low, medium and high there).
            thinking = effort not in ("none", "minimal")
            chat["chat_template_kwargs"] = {switch: thinking}
            if thinking:
                chat["reasoning_effort"] = effort
        else:
            chat["reasoning_effort"] = effort
    for name in _PASSTHROUGH:
        if body.get(name) is not None:
            chat[name] = body[name]
    forward = settings.forward_fields
    for name in ("prompt_cache_key", "safety_identifier", "user", "service_tier"):
        if name in forward and body.get(name) is not None:
            chat[name] = body[name]
    if chat.get("service_tier") in ("fast", "ultrafast"):
        # Responses-only names; OpenAI serves them as (and reports) "priority", the chat name.
        chat["service_tier"] = "priority"
    text = body.get("text")
    if "verbosity" in forward and isinstance(text, dict) and text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    if "message.output_text.logprobs" in (body.get("include") or ()):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    for name, value in q.extra_body.items():
        chat.setdefault(name, value)  # the request's own fields win over the operator's
    return chat
