"""Chat Completions chunks in, Open Responses events out: the pure state machine at ORP's core.

No I/O happens here. The HTTP handler feeds decoded upstream chunks and takes the events to
write (streaming) or just the final response object (JSON): one transcoder, both modes.

Output items, in the order the model produces them:
- reasoning text (`delta.reasoning_content` / `delta.reasoning`) → a `reasoning` item with one
  `reasoning_text` part; when the request asked for a reasoning summary, the same text is also
  the item's one `summary_text` part and streams as the summary events (the content part then
  gets only its `done` event, so no client reading both counts the text twice); with
  `reasoning.encrypted_content` included, the finished item carries the text sealed;
- text and refusals (`delta.content` / `delta.refusal`) → a `message` item whose parts are
  `output_text` and `refusal`;
- tool calls (`delta.tool_calls`, fragments keyed by `index`, possibly interleaved) → one
  `function_call` item each. Servers that omit `index` (Gemini, Mistral) or send the same one
  for every call (Ollama) are handled too: a fragment with a new `id` (or, without ids, a new
  `name`) in a slot starts a new call there and ends the one before.
  Each item has the type the called tool's kind has (`tools.ToolSet`): `function_call` (with
  `namespace` for a namespace member), `custom_tool_call` (its input streamed out of the JSON
  arguments as `response.custom_tool_call_input.*`), `shell_call`, `local_shell_call`,
  `apply_patch_call`, `tool_search_call` (no argument events; the item is whole at `.done`).
  A call to a tool the request never declared passes as a `function_call` unless
  `undeclared_tools` is "fail"; calls past `max_tool_calls` are left out.
Reasoning and message items are exclusive: one kind of content arriving closes the other.
Function calls stay open until the upstream finishes, since fragments can come in any order.
Only choice 0 is the answer; other choices (`n > 1`, misbehaving servers) are left out and
noted once in `notices`, which the caller logs (this module does no I/O).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from orp_proxy.protocol.resource import new_id, usage_from_chat
from orp_proxy.protocol.tools import (
    CALL_ID_PREFIXES,
    CALL_ITEM_TYPES,
    JsonStringStream,
    ToolSet,
    ToolSpec,
    call_fields,
    call_fields_pending,
)

Event = dict[str, Any]

TERMINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})

# How each upstream `finish_reason` ends the response (the README has the table).
_COMPLETED_REASONS = frozenset({"stop", "tool_calls", "function_call", "eos", "eos_token",
                                "stop_sequence", "end_turn"})
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "max_tokens": "max_output_tokens",
                       "model_length": "max_output_tokens", "content_filter": "content_filter"}
# The server gave up: the output may be cut anywhere, so the response fails.
_FAILED_REASONS = {
    "abort": ("upstream_aborted", "The upstream aborted the generation (finish_reason 'abort')"),
    "error": ("upstream_error", "The upstream failed during generation (finish_reason 'error')"),
    "insufficient_system_resource": (
        "upstream_overloaded", "The upstream ran out of resources during generation "
        "(finish_reason 'insufficient_system_resource')"),
}

# Reasoning text event names: the spec's, or OpenAI's for clients that only know those.
REASONING_EVENT_NAMES = {
    "spec": ("response.reasoning.delta", "response.reasoning.done"),
    "openai": ("response.reasoning_text.delta", "response.reasoning_text.done"),
}


def _text(value: Any, field: str) -> str:
    if type(value) is not str:
        raise ValueError(f"'{field}' is not a string")
    return value


class _Text:
    """Accumulated text of a part or a call's arguments, joined once at the end.

    Not one small str per token until then (memory per open stream: a token's str costs
    more than its text): every 16 pieces are joined into a chunk, and every 8 chunks into one
    string, so an open stream holds its text as one string and at most 23 small ones. The
    text so far is copied once per 112 pieces; a 32K-token answer copies some 18 MB in all.
    """

    __slots__ = ("chunks", "pieces")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.pieces: list[str] = []

    def append(self, text: str) -> None:
        pieces = self.pieces
        pieces.append(text)
        if len(pieces) >= 16:
            chunks = self.chunks
            chunks.append("".join(pieces))
            pieces.clear()
            if len(chunks) >= 8:
                chunks[:] = ["".join(chunks)]

    def __bool__(self) -> bool:
        return bool(self.pieces or self.chunks)

    def value(self) -> str:
        if self.pieces:
            self.chunks.append("".join(self.pieces))
            self.pieces.clear()
        if len(self.chunks) > 1:
            self.chunks[:] = ["".join(self.chunks)]
        return self.chunks[0] if self.chunks else ""


class _Part:
    """An open content part: its dict (already in the item's content) and its text pieces.

    `summary` is the reasoning item's summary part presenting the same text, if any."""

    __slots__ = ("index", "kind", "part", "summary", "text")

    def __init__(self, kind: str, index: int, part: dict[str, Any]) -> None:
        self.kind = kind
        self.index = index
        self.part = part
        self.summary: dict[str, Any] | None = None
        self.text = _Text()


class _Item:
    """An open output item."""

    __slots__ = ("id", "item", "output_index", "part")

    def __init__(self, item: dict[str, Any], output_index: int) -> None:
        self.item = item
        self.id: str = item["id"]
        self.output_index = output_index
        self.part: _Part | None = None


class _Call(_Item):
    """An open function call; fragments may arrive before its name is known."""

    __slots__ = ("announced", "arguments", "decoder", "dropped", "name", "spec", "streamed",
                 "upstream_id")

    def __init__(self, item: dict[str, Any], output_index: int) -> None:
        super().__init__(item, output_index)
        self.arguments = _Text()
        self.announced = False
        self.upstream_id: str | None = None  # the call's `id` as the upstream sent it
        self.dropped = False  # past the call limit: its fragments are swallowed
        self.name: str | None = None  # the upstream function name, once it came
        self.spec: ToolSpec | None = None  # the declared tool called (None: undeclared)
        # Custom tools: the input decoded out of the arguments so far, and what was sent.
        self.decoder: JsonStringStream | None = None
        self.streamed = _Text()


class ToolNotAllowed(Exception):
    """The model called a tool outside the set the request allows."""


class StreamFailure(Exception):
    """The upstream's chunks are well-formed but the answer is unusable; `code` names why.

    Raised by `feed`; the caller fails the response with it (after which it saves and sends,
    in that order, as for any failure)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _starts_new_call(call: _Call, upstream_id: str | None, name: str | None) -> bool:
    """Whether a fragment for `call`'s slot belongs to another call: a different `id`, or
    (without ids to compare) a different name once the call has one."""
    if upstream_id is not None and call.upstream_id is not None:
        return upstream_id != call.upstream_id
    return bool(name) and call.name is not None and name != call.name


class Transcoder:
    """Turns one upstream chunk stream into one Open Responses event stream.

    `response` is the in-progress response object (see `resource.build_response`); it is
    updated in place and is the final object once a terminal event has been produced.
    `tools` maps upstream function names back to the declared tools. `allowed_tools`, when
    given, is the set of upstream names the model may call; a call to any other name fails the
    response instead of reaching the client (the spec's hard `allowed_tools` rule). Without it, a
    call to an undeclared name passes as a `function_call`, or fails if `undeclared_tools` is
    "fail". At most `max_tool_calls` calls reach the client: the first ones to get a name.
    `reasoning_summary` presents reasoning as the item's summary too (the request set
    `reasoning.summary`); `seal_reasoning` (given when the request includes
    `reasoning.encrypted_content`) turns a reasoning item's text into its `encrypted_content`.
    """

    def __init__(
        self,
        response: dict[str, Any],
        *,
        tools: ToolSet | None = None,
        allowed_tools: Iterable[str] | None = None,
        undeclared_tools: str = "pass",
        max_tool_calls: int | None = None,
        reasoning_events: str = "spec",
        reasoning_summary: bool = False,
        seal_reasoning: Callable[[str], str] | None = None,
        include_logprobs: bool = False,
        id_factory: Callable[[str], str] = new_id,
    ) -> None:
        self.response = response
        self._new_id = id_factory
        self.tools = tools if tools is not None else ToolSet()
        self.allowed_tools = None if allowed_tools is None else frozenset(allowed_tools)
        self.undeclared_tools = undeclared_tools
        self.max_tool_calls = max_tool_calls
        self.announced_calls = 0
        self.dropped_calls = 0  # calls past `max_tool_calls`, left out
        self._reasoning_delta, self._reasoning_done = REASONING_EVENT_NAMES[reasoning_events]
        self._summary = reasoning_summary
        self._seal = seal_reasoning
        self._reasoning_chunks = 0  # an estimate of reasoning tokens for upstreams that count none
        self._logprobs = include_logprobs
        self._events: list[Event] = []
        self._seq = 0
        self._output: list[dict[str, Any]] = response["output"]
        self._content: _Item | None = None  # the open message or reasoning item
        # Open calls by slot: the fragments' `index`, None for servers that send none.
        self._calls: dict[int | None, _Call] = {}
        self._last: _Item | None = None  # the item that received the latest delta
        self._finish_reason: str | None = None
        self._other_choices = False
        self.finished = False
        self.saw_finish_reason = False
        # Oddities of the upstream worth a log line (the caller logs them; no I/O here).
        self.notices: list[str] = []

    # -- driving -------------------------------------------------------------------------

    def take(self) -> list[Event]:
        """Events produced since the last call."""
        events, self._events = self._events, []
        return events

    def queue(self) -> None:
        """A background response: `response.created` and `response.queued`, status `queued`
        (then `start` moves it to `in_progress`)."""
        self.response["status"] = "queued"
        self._emit({"type": "response.created", "response": self._snapshot()})
        self._emit({"type": "response.queued", "response": self._snapshot()})

    def start(self) -> None:
        """`response.created` (unless `queue` sent it) then `response.in_progress`."""
        if self.response["status"] == "queued":
            self.response["status"] = "in_progress"
        else:
            self._emit({"type": "response.created", "response": self._snapshot()})
        self._emit({"type": "response.in_progress", "response": self._snapshot()})

    def feed(self, chunk: Any) -> None:
        """One decoded `chat.completion.chunk`, or the 1-tuple `(text,)` standing for a plain
        text chunk (see `UpstreamStream.batches`).

        Raises `ToolNotAllowed`, and `ValueError` for a chunk whose shape is not one a Chat
        Completions server sends (the caller fails the response as `upstream_bad_response`).
        """
        if self.finished:
            return
        if type(chunk) is tuple:
            # `(text,)`: a chunk the upstream reader proved to carry only choice 0's text
            # (`chunks.PlainText`); JSON never decodes to a tuple.
            if chunk[0]:
                self._message_text("output_text", chunk[0], None)
            return
        if type(chunk) is not dict:
            raise ValueError("upstream chunk is not a JSON object")
        choices = chunk.get("choices")
        if choices:
            if type(choices) is not list or type(choices[0]) is not dict:
                raise ValueError("'choices' is not a list of objects")
            choice: dict[str, Any] | None = choices[0]
            if len(choices) > 1 or choices[0].get("index") not in (0, None):
                choice = self._answer_choice(choices)
            if choice is not None:
                self._choice(choice)
        tier = chunk.get("service_tier")
        if type(tier) is str and tier:
            # The tier that served the request, as the upstream reports it (OpenAI, Azure):
            # the response echoes this, never simply the tier that was asked for.
            self.response["service_tier"] = tier
        usage = chunk.get("usage")
        if usage:
            if type(usage) is not dict:
                raise ValueError("'usage' is not an object")
            self.response["usage"] = usage_from_chat(
                usage, reasoning_estimate=self._reasoning_chunks)

    def _answer_choice(self, choices: list[Any]) -> dict[str, Any] | None:
        """Choice 0 of a chunk that has others (or only others); they are noted once."""
        answer = None
        for choice in choices:
            if type(choice) is not dict:
                raise ValueError("'choices' is not a list of objects")
            if choice.get("index") in (0, None):
                answer = answer or choice
            elif not self._other_choices:
                self._other_choices = True
                self.notices.append("the upstream sent choices other than choice 0 (index "
                                    f"{str(choice.get('index'))[:20]}); only choice 0 is used")
        return answer

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if delta:
            if type(delta) is not dict:
                raise ValueError("'delta' is not an object")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self._reasoning_text(_text(reasoning, "reasoning"))
            content = delta.get("content")
            if content:
                self._message_text("output_text", _text(content, "content"),
                                   choice.get("logprobs"))
            refusal = delta.get("refusal")
            if refusal:
                self._message_text("refusal", _text(refusal, "refusal"), None)
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                if type(tool_calls) is not list:
                    raise ValueError("'tool_calls' is not a list")
                for fragment in tool_calls:
                    self._tool_fragment(fragment)
        finish = choice.get("finish_reason")
        if finish:
            self._finish_reason = _text(finish, "finish_reason")
            self.saw_finish_reason = True

    def finish(self) -> None:
        """The upstream ended normally: close every open item, then the terminal event.

        How it ends follows `finish_reason`: completed, incomplete (`length`,
        `content_filter`), or failed when the server says it gave up (`abort`, `error`) or a
        tool call's name never arrived."""
        if self.finished:
            return
        finish_reason = self._finish_reason or ""
        failed = _FAILED_REASONS.get(finish_reason)
        if failed is not None:
            self.fail(*failed)
            return
        reason = _INCOMPLETE_REASONS.get(finish_reason)
        if reason is None:
            if any(c.upstream_id or c.arguments for c in self._calls.values()
                   if not c.announced and not c.dropped):
                # Not "completed" without the call the model made. (A response cut short is
                # `incomplete` anyway: there the unfinished call is left out.)
                self.fail("upstream_tool_call_without_name",
                          "The upstream sent a tool call whose function name never arrived")
                return
            if finish_reason and finish_reason not in _COMPLETED_REASONS:
                self.notices.append(
                    f"unknown finish_reason {finish_reason[:40]!r} taken as 'stop'")
        still_open = self._open_items()
        # The item cut short is the one that received the latest delta, if it is still open
        # (a call starting closes the message before `_last` moves on to the call).
        cut = next((it for it in still_open if it is self._last), None) if reason else None
        for open_item in still_open:
            if open_item is not cut:
                self._close(open_item, "completed")
        if cut is not None:
            self._close(cut, "incomplete")
        self._calls.clear()
        self.finished = True
        response = self.response
        if reason is not None:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": reason}
            self._emit({"type": "response.incomplete", "response": response})
        else:
            response["status"] = "completed"
            response["completed_at"] = int(time.time())
            self._emit({"type": "response.completed", "response": response})

    def fail(self, code: str, message: str, *, type: str = "server_error") -> None:
        """An `error` event then `response.failed`, keeping whatever output had arrived."""
        if self.finished:
            return
        self._abandon_open_items()
        self.finished = True
        self._emit(
            {
                "type": "error",
                "error": {"type": type, "code": code, "message": message, "param": None},
            }
        )
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        self._emit({"type": "response.failed", "response": self.response})

    def retract_terminal(self) -> None:
        """Take back the terminal event (taken, not yet sent) so that `fail` can replace it."""
        self._seq -= 1
        self.finished = False
        self.response["completed_at"] = None
        self.response["incomplete_details"] = None

    def cancel(self) -> None:
        """The owner cancelled the (background) response: status `cancelled`, the output so far
        kept, and a terminal event. The spec has no `response.cancelled`; `response.failed`
        ends the stream for every client, and its response says `cancelled`."""
        if self.finished:
            return
        self._abandon_open_items()
        self.finished = True
        self.response["status"] = "cancelled"
        self._emit({"type": "response.failed", "response": self.response})

    def progress(self) -> dict[str, Any]:
        """A copy of the response as it stands, open items with the text they have so far."""
        items = {id(it.item): it for it in self._open_items()}
        output = []
        for item in self._output:
            copy = dict(item)
            open_item = items.get(id(item))
            if isinstance(open_item, _Call):
                copy["arguments"] = open_item.arguments.value()
            elif open_item is not None and open_item.part is not None:
                part = open_item.part
                key = "refusal" if part.kind == "refusal" else "text"
                copy["content"] = [dict(p) for p in item["content"]]
                copy["content"][part.index] = dict(part.part, **{key: part.text.value()})
            output.append(copy)
        return dict(self.response, output=output)

    def interrupt(self, reason: str = "client_disconnected") -> None:
        """The client went away: settle the response as incomplete, producing no events."""
        if self.finished:
            return
        self._abandon_open_items()
        self.finished = True
        self.response["status"] = "incomplete"
        self.response["incomplete_details"] = {"reason": reason}

    # -- content -------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        event["sequence_number"] = self._seq
        self._seq += 1
        self._events.append(event)

    def _snapshot(self) -> dict[str, Any]:
        return dict(self.response, output=[dict(item) for item in self._output])

    def _open_item(self, item: dict[str, Any]) -> int:
        index = len(self._output)
        self._output.append(item)
        snapshot = dict(item)
        # Lists of its own: the item's `content` and `summary` fill up before this event is
        # encoded.
        if "content" in snapshot:
            snapshot["content"] = []
        if "summary" in snapshot:
            snapshot["summary"] = []
        self._emit({"type": "response.output_item.added", "output_index": index, "item": snapshot})
        return index

    def _content_item(self, item_type: str) -> _Item:
        current = self._content
        if current is not None:
            if current.item["type"] == item_type:
                return current
            self._close(current, "completed")
        if item_type == "message":
            item = {
                "id": self._new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        else:
            # `status` is not in the spec's reasoning item, but OpenAI's has it (and clients
            # read it); it tells a reasoning item cut short from a finished one.
            item = {"id": self._new_id("rs"), "type": "reasoning", "status": "in_progress",
                    "summary": [], "content": []}
        opened = _Item(item, 0)
        opened.output_index = self._open_item(item)
        self._content = opened
        return opened

    def _part(self, owner: _Item, kind: str) -> _Part:
        current = owner.part
        if current is not None:
            if current.kind == kind:
                return current
            self._close_part(owner, current)
        if kind == "output_text":
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [],
                                    "logprobs": []}
        elif kind == "refusal":
            part = {"type": "refusal", "refusal": ""}
        else:
            part = {"type": "reasoning_text", "text": ""}
        content = owner.item["content"]
        opened = _Part(kind, len(content), part)
        content.append(part)
        owner.part = opened
        snapshot = dict(part)
        if kind == "output_text":
            # Its own lists: the part's `logprobs` grows with every later token.
            snapshot["annotations"] = []
            snapshot["logprobs"] = []
        if kind == "reasoning_text" and self._summary:
            summaries = owner.item["summary"]
            opened.summary = {"type": "summary_text", "text": ""}
            summaries.append(opened.summary)
            self._emit(
                {
                    "type": "response.reasoning_summary_part.added",
                    "item_id": owner.id,
                    "output_index": owner.output_index,
                    "summary_index": len(summaries) - 1,
                    "part": dict(opened.summary),
                }
            )
        self._emit(
            {
                "type": "response.content_part.added",
                "item_id": owner.id,
                "output_index": owner.output_index,
                "content_index": opened.index,
                "part": snapshot,
            }
        )
        return opened

    def _message_text(self, kind: str, text: str, logprobs: Any) -> None:
        # Per-token path: skip the helper calls while the same part stays open.
        item = self._content
        if item is None or item.item["type"] != "message":
            item = self._content_item("message")
        part = item.part
        if part is None or part.kind != kind:
            part = self._part(item, kind)
        part.text.append(text)
        self._last = item
        if kind == "refusal":
            self._emit(
                {
                    "type": "response.refusal.delta",
                    "item_id": item.id,
                    "output_index": item.output_index,
                    "content_index": part.index,
                    "delta": text,
                }
            )
            return
        tokens: list[Any] = []
        if self._logprobs and logprobs:
            # Checked: a malformed upstream value is the upstream's fault (a ValueError becomes
            # upstream_bad_response), not a crash of ours, nor characters passed off as tokens.
            if type(logprobs) is not dict:
                raise ValueError("'logprobs' is not an object")
            tokens = logprobs.get("content") or []
            if type(tokens) is not list or not all(type(t) is dict for t in tokens):
                raise ValueError("'logprobs.content' is not a list of objects")
            part.part["logprobs"].extend(tokens)
        self._emit(
            {
                "type": "response.output_text.delta",
                "item_id": item.id,
                "output_index": item.output_index,
                "content_index": part.index,
                "delta": text,
                "logprobs": tokens,
            }
        )

    def _reasoning_text(self, text: str) -> None:
        item = self._content
        if item is None or item.item["type"] != "reasoning":
            item = self._content_item("reasoning")
        part = item.part
        if part is None:
            part = self._part(item, "reasoning_text")
        part.text.append(text)
        self._last = item
        self._reasoning_chunks += 1
        if part.summary is not None:
            self._emit(
                {
                    "type": "response.reasoning_summary_text.delta",
                    "item_id": item.id,
                    "output_index": item.output_index,
                    "summary_index": len(item.item["summary"]) - 1,
                    "delta": text,
                }
            )
            return
        self._emit(
            {
                "type": self._reasoning_delta,
                "item_id": item.id,
                "output_index": item.output_index,
                "content_index": part.index,
                "delta": text,
            }
        )

    def _tool_fragment(self, fragment: Any) -> None:
        if type(fragment) is not dict:
            raise ValueError("a tool call fragment is not an object")
        index = fragment.get("index")  # None: servers that send none (Gemini, Mistral)
        if index is not None and type(index) is not int:
            raise ValueError("a tool call's 'index' is not an integer")
        function = fragment.get("function") or {}
        if type(function) is not dict:
            raise ValueError("a tool call's 'function' is not an object")
        upstream_id = fragment.get("id") or None
        if upstream_id is not None:
            upstream_id = _text(upstream_id, "tool call id")
        name = function.get("name")
        if name is not None and type(name) is not str:
            raise ValueError("a tool call's 'function.name' is not a string")
        call = self._calls.get(index)
        if call is not None and _starts_new_call(call, upstream_id, name):
            # Same slot, another call (Ollama numbers every call 0; no index at all from
            # Gemini, Mistral): nothing can reach the previous one any more.
            self._end_call(call)
            call = None
        if call is None:
            # A call arriving ends any message or reasoning in progress: the model moved on.
            if self._content is not None:
                self._close(self._content, "completed")
            item = {
                "id": self._new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": self._new_id("call"),
                "name": "",
                "arguments": "",
            }
            call = self._calls[index] = _Call(item, -1)
        arguments = function.get("arguments")
        if arguments:
            call.arguments.append(_text(arguments, "function.arguments"))
        if call.announced:
            if arguments:
                self._emit_arguments(call, arguments)
        else:
            if upstream_id is not None and call.upstream_id is None:
                call.upstream_id = call.item["call_id"] = upstream_id
            if not name:
                return  # `output_item.added` needs the name: hold the fragments until it comes
            if not self._announce(call, name):
                return
            if call.arguments:
                self._emit_arguments(call, call.arguments.value())
        self._last = call

    def _end_call(self, call: _Call) -> None:
        """Close a call that a new one replaced in its slot."""
        if call.announced:
            self._close(call, "completed")
        elif (call.upstream_id or call.arguments) and not call.dropped:
            raise StreamFailure("upstream_tool_call_without_name",
                                "The upstream sent a tool call whose function name never "
                                "arrived")

    def _announce(self, call: _Call, name: str) -> bool:
        """The call's name arrived: its item opens (False: it is over the limit, dropped)."""
        if call.dropped:
            return False
        call.name = name
        spec = self.tools.lookup(name)
        if self.allowed_tools is not None and name not in self.allowed_tools:
            raise ToolNotAllowed(name)
        if spec is None and self.undeclared_tools == "fail":
            raise ToolNotAllowed(name)
        if self.max_tool_calls is not None and self.announced_calls >= self.max_tool_calls:
            call.dropped = True
            self.dropped_calls += 1
            return False
        self.announced_calls += 1
        kind = spec.kind if spec is not None else "function"
        item = call.item
        call_id = item["call_id"]
        item.clear()
        item.update(id=call.id if kind == "function" else self._new_id(CALL_ID_PREFIXES[kind]),
                    type=CALL_ITEM_TYPES[kind], status="in_progress", call_id=call_id)
        if kind in ("function", "custom"):
            item["name"] = spec.name if spec is not None else name
            if spec is not None and spec.namespace is not None:
                item["namespace"] = spec.namespace
        item.update(call_fields_pending(spec))
        call.id = item["id"]
        call.spec = spec
        if kind == "custom":
            call.decoder = JsonStringStream()
        call.output_index = self._open_item(item)
        call.announced = True
        return True

    def _emit_input(self, call: _Call, delta: str) -> None:
        self._emit(
            {
                "type": "response.custom_tool_call_input.delta",
                "item_id": call.id,
                "output_index": call.output_index,
                "delta": delta,
            }
        )

    def _emit_arguments(self, call: _Call, delta: str) -> None:
        decoder = call.decoder
        if decoder is not None:
            text = decoder.feed(delta)
            if text:
                call.streamed.append(text)
                self._emit_input(call, text)
            return
        if call.spec is not None and call.spec.kind != "function":
            return  # built-in calls: the item is whole at `output_item.done`
        self._emit(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": call.id,
                "output_index": call.output_index,
                "delta": delta,
            }
        )

    # -- closing -------------------------------------------------------------------------

    def _open_items(self) -> list[_Item]:
        items: list[_Item] = [c for c in self._calls.values() if c.announced]
        if self._content is not None:
            items.append(self._content)
        items.sort(key=lambda it: it.output_index)
        return items

    def _close_part(self, owner: _Item, part: _Part) -> None:
        text = part.text.value()
        base = {"item_id": owner.id, "output_index": owner.output_index,
                "content_index": part.index}
        if part.kind == "refusal":
            part.part["refusal"] = text
            self._emit({"type": "response.refusal.done", **base, "refusal": text})
        elif part.kind == "output_text":
            part.part["text"] = text
            self._emit({"type": "response.output_text.done", **base, "text": text,
                        "logprobs": part.part["logprobs"]})
        else:
            part.part["text"] = text
            summary = part.summary
            if summary is not None:
                summary["text"] = text
                at = {"item_id": owner.id, "output_index": owner.output_index,
                      "summary_index": len(owner.item["summary"]) - 1}
                self._emit({"type": "response.reasoning_summary_text.done", **at, "text": text})
                self._emit({"type": "response.reasoning_summary_part.done", **at,
                            "part": summary})
            self._emit({"type": self._reasoning_done, **base, "text": text})
            self._seal_item(owner.item, text)
        self._emit({"type": "response.content_part.done", **base, "part": part.part})
        owner.part = None

    def _seal_item(self, item: dict[str, Any], text: str) -> None:
        if self._seal is not None:
            item["encrypted_content"] = self._seal(text)

    def _close(self, open_item: _Item, status: str) -> None:
        item = open_item.item
        if isinstance(open_item, _Call):
            self._close_call(open_item, status)
        else:
            if open_item.part is not None:
                self._close_part(open_item, open_item.part)
            item["status"] = status
            self._content = None
        self._emit(
            {"type": "response.output_item.done", "output_index": open_item.output_index,
             "item": item}
        )

    def _close_call(self, call: _Call, status: str) -> None:
        arguments = call.arguments.value()
        item = call.item
        item.update(call_fields(call.spec, arguments))
        item["status"] = status
        kind = call.spec.kind if call.spec is not None else "function"
        base = {"item_id": call.id, "output_index": call.output_index}
        if kind == "function":
            self._emit({"type": "response.function_call_arguments.done", **base,
                        "arguments": arguments})
        elif kind == "shell":
            # OpenAI streams each command of a shell call; here they are whole once the
            # arguments are, so each comes as added (empty), one delta, done.
            where = {"output_index": call.output_index}
            for index, command in enumerate(item["action"]["commands"]):
                at = {**where, "command_index": index}
                self._emit({"type": "response.shell_call_command.added", **at, "command": ""})
                self._emit({"type": "response.shell_call_command.delta", **at, "delta": command})
                self._emit({"type": "response.shell_call_command.done", **at,
                            "command": command})
        elif kind == "custom":
            assert call.decoder is not None
            streamed = call.streamed.value()
            # Decoded to its closing quote, or cut off inside the string (a response cut short):
            # what was streamed is the input. Otherwise the arguments were some other shape.
            decoded = call.decoder.done or (streamed and not call.decoder.gave_up)
            final = streamed if decoded else item["input"]
            if final != streamed and final.startswith(streamed):
                # The arguments were not the `{"input": ...}` asked for: what the decoder
                # could not stream comes now, so the deltas still add up to the input.
                self._emit_input(call, final[len(streamed):])
            item["input"] = final
            self._emit({"type": "response.custom_tool_call_input.done", **base,
                        "input": final})

    def _abandon_open_items(self) -> None:
        """Settle open items as incomplete with the text they have, without events."""
        for open_item in self._open_items():
            item = open_item.item
            if isinstance(open_item, _Call):
                item.update(call_fields(open_item.spec, open_item.arguments.value()))
                if open_item.decoder is not None:
                    item["input"] = open_item.streamed.value()
            elif open_item.part is not None:
                part = open_item.part
                key = "refusal" if part.kind == "refusal" else "text"
                text = part.part[key] = part.text.value()
                if part.kind == "reasoning_text":
                    if part.summary is not None:
                        part.summary["text"] = text
                    self._seal_item(item, text)
            if "status" in item:
                item["status"] = "incomplete"
        self._calls.clear()
        self._content = None
