"""Declared tools ↔ Chat Completions function tools, both ways (pure, no I/O).

A Chat Completions backend knows one kind of tool: a function with a name matching
`[a-zA-Z0-9_-]{1,64}` and a JSON-schema of arguments. Agents declare more kinds; each one the
client runs itself becomes such a function, and each call the model makes is turned back into the
item type the client declared:

- `function` → itself → `function_call`;
- `namespace` {name, tools} → each member as `{namespace}__{name}` → `function_call` or
  `custom_tool_call` with `namespace` set;
- `custom` (free text or a grammar) → one string parameter `input` → `custom_tool_call`;
- `shell` (local environment) → `shell` {commands, timeout_ms, max_output_length} →
  `shell_call`;
- `local_shell` → `local_shell` {command, env, ...} → `local_shell_call`;
- `apply_patch` → `apply_patch` {type, path, diff} → `apply_patch_call`;
- `tool_search` (execution "client") → `tool_search` with its `parameters` → `tool_search_call`.

Hosted tools (web search, file search, code interpreter, image generation, computer use, MCP
servers, server-side tool search, shell in a container) need OpenAI's servers; `ToolSet.build`
drops or refuses them (ORP_HOSTED_TOOLS) and lists what it dropped.

Upstream names are reversible through the `ToolSet` built from the same request. A flattened or
built-in name that is too long or collides with another tool's gets a short hash suffix instead.
Tools loaded by a `tool_search_output` item in the context are declared as well, as OpenAI makes
them callable from then on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orp_proxy.errors import ApiError, invalid

HOSTED_TYPES: frozenset[str] = frozenset({
    "web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11",
    "file_search", "code_interpreter", "image_generation", "computer", "computer_use",
    "computer_use_preview", "mcp", "programmatic_tool_calling",
})
# Built-in tools the client executes: declared once each, no name of their own.
BUILTIN_TYPES: tuple[str, ...] = ("shell", "local_shell", "apply_patch", "tool_search")
# The item type a call to each kind of tool comes back as.
CALL_ITEM_TYPES: dict[str, str] = {
    "function": "function_call",
    "custom": "custom_tool_call",
    "shell": "shell_call",
    "local_shell": "local_shell_call",
    "apply_patch": "apply_patch_call",
    "tool_search": "tool_search_call",
}
CALL_ID_PREFIXES: dict[str, str] = {
    "function": "fc", "custom": "ctc", "shell": "sh", "local_shell": "lsh",
    "apply_patch": "apc", "tool_search": "tsc",
}

_MAX_NAME = 64
_valid_name = re.compile(r"[a-zA-Z0-9_-]{1,64}").fullmatch

_STRING_LIST = {"type": "array", "items": {"type": "string"}}
_CUSTOM_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's whole input text."}},
    "required": ["input"],
    "additionalProperties": False,
}
_BUILTIN_FUNCTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "shell": (
        "Runs shell commands on the user's machine, in order, and returns their output "
        "(stdout, stderr and exit code of each).",
        {
            "type": "object",
            "properties": {
                "commands": {**_STRING_LIST, "description": "Shell command lines to run."},
                "timeout_ms": {"type": "integer", "description": "Time limit per command."},
                "max_output_length": {"type": "integer",
                                      "description": "Characters of output to keep."},
            },
            "required": ["commands"],
        },
    ),
    "local_shell": (
        "Runs one command on the user's machine and returns its output.",
        {
            "type": "object",
            "properties": {
                "command": {**_STRING_LIST,
                            "description": "The program and its arguments (argv)."},
                "working_directory": {"type": "string"},
                "timeout_ms": {"type": "integer"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "user": {"type": "string"},
            },
            "required": ["command"],
        },
    ),
    "apply_patch": (
        "Creates, updates or deletes one file on the user's machine. For create_file and "
        "update_file, `diff` is a V4A diff of the file (lines prefixed '+', '-' or ' ', hunks "
        "introduced by '@@'); delete_file takes no diff.",
        {
            "type": "object",
            "properties": {
                "type": {"type": "string",
                         "enum": ["create_file", "update_file", "delete_file"]},
                "path": {"type": "string", "description": "Path of the file."},
                "diff": {"type": "string"},
            },
            "required": ["type", "path"],
        },
    ),
    "tool_search": (
        "Searches for more tools and makes the ones found available.",
        {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for."}},
            "required": ["query"],
        },
    ),
}


def flat_name(namespace: str, name: str) -> str:
    """The upstream function name of `name` inside `namespace` (without collisions)."""
    return _fit(f"{namespace}__{name}")


def _fit(base: str) -> str:
    if _valid_name(base):
        return base
    digest = hashlib.sha1(base.encode()).hexdigest()[:8]
    head = re.sub(r"[^a-zA-Z0-9_-]", "_", base)[: _MAX_NAME - 9]
    return f"{head}_{digest}"


def _hashed(base: str, attempt: int) -> str:
    digest = hashlib.sha1(f"{base}\0{attempt}".encode()).hexdigest()[:8]
    return f"{base[: _MAX_NAME - 9]}_{digest}"


@dataclass(frozen=True)
class ToolSpec:
    """One callable tool: what the client declared and the function the upstream sees."""

    kind: str  # "function", "custom" or one of BUILTIN_TYPES
    name: str  # the name the client knows (the member's own name inside a namespace)
    upstream: str  # the Chat Completions function name
    namespace: str | None = None
    declared: Mapping[str, Any] = field(default_factory=dict)

    @property
    def item_type(self) -> str:
        return CALL_ITEM_TYPES[self.kind]

    def chat_tool(self) -> dict[str, Any]:
        """The Chat Completions tool for this one."""
        tool = self.declared
        function: dict[str, Any] = {"name": self.upstream}
        if self.kind == "function":
            if tool.get("description") is not None:
                function["description"] = tool["description"]
            function["parameters"] = tool.get("parameters") or {"type": "object",
                                                                "properties": {}}
            if tool.get("strict") is not None:
                function["strict"] = tool["strict"]
        elif self.kind == "custom":
            function["description"] = custom_description(tool)
            function["parameters"] = _CUSTOM_PARAMETERS
        else:
            description, parameters = _BUILTIN_FUNCTIONS[self.kind]
            if self.kind == "tool_search":
                description = tool.get("description") or description
                parameters = tool.get("parameters") or parameters
            function["description"] = description
            function["parameters"] = parameters
        return {"type": "function", "function": function}


def custom_description(tool: Mapping[str, Any]) -> str:
    """A custom tool's description for a function with one `input` string: the grammar, if
    any, goes in it so that the model sees what the input must look like."""
    lines = [tool.get("description") or ""]
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        syntax = "Lark grammar" if fmt.get("syntax") == "lark" else "regular expression"
        lines.append(f"The `input` argument is free-form text that must match this {syntax}:"
                     f"\n```\n{fmt.get('definition', '')}\n```")
    else:
        lines.append("The `input` argument is free-form text.")
    return "\n\n".join(line for line in lines if line)


@dataclass
class ToolSet:
    """The request's tools, as the upstream sees them and as they map back."""

    specs: list[ToolSpec] = field(default_factory=list)
    by_upstream: dict[str, ToolSpec] = field(default_factory=dict)
    # Hosted tools left out (their type, or `mcp:<server_label>`), for the log and the header.
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, tools: Iterable[Mapping[str, Any]] | None,
              context: Iterable[Mapping[str, Any]] = (), *, hosted: str = "drop") -> ToolSet:
        """The tool set of a validated request; `context` is every item it continues with
        (history and input), whose `tool_search_output` items declare more tools.

        Raises `ApiError` (400) for a hosted tool when `hosted` is "refuse"."""
        declared = [(f"tools[{i}]", t) for i, t in enumerate(tools or ())]
        for item in context:
            if item.get("type") == "tool_search_output":
                declared.extend(("", t) for t in item.get("tools") or ())
        out = cls()
        members: list[tuple[str, str, Mapping[str, Any]]] = []
        builtins: list[Mapping[str, Any]] = []
        taken: set[str] = set()
        for path, tool in declared:
            kind = tool.get("type")
            if is_hosted(tool):
                if hosted == "refuse" and path:
                    raise ApiError(
                        400, f"The tool '{path}' of type {kind!r} runs on OpenAI's servers, "
                        "which this gateway's Chat Completions backend cannot do.",
                        param=f"{path}.type", code="unsupported_tool")
                label = tool.get("server_label") if kind == "mcp" else None
                out.dropped.append(f"mcp:{label}" if label else str(kind))
            elif kind in ("function", "custom"):
                if tool["name"] not in taken:
                    out._add(ToolSpec(kind, tool["name"], tool["name"], None, tool))
                    taken.add(tool["name"])
            elif kind == "namespace":
                members.extend((tool["name"], m["type"], m) for m in tool["tools"])
            elif kind in BUILTIN_TYPES:
                builtins.append(tool)
        for namespace, kind, member in members:
            if out.find(kind, member["name"], namespace) is None:
                out._add(ToolSpec(kind, member["name"], out._free(flat_name(namespace,
                                                                             member["name"])),
                                  namespace, member))
        for tool in builtins:
            if out.find(tool["type"]) is None:
                out._add(ToolSpec(tool["type"], tool["type"], out._free(tool["type"]), None,
                                  tool))
        return out

    def _add(self, spec: ToolSpec) -> None:
        self.specs.append(spec)
        self.by_upstream[spec.upstream] = spec

    def _free(self, base: str) -> str:
        name, attempt = base, 0
        while name in self.by_upstream:
            attempt += 1
            name = _hashed(base, attempt)
        return name

    def __bool__(self) -> bool:
        return bool(self.specs)

    def chat_tools(self) -> list[dict[str, Any]]:
        return [spec.chat_tool() for spec in self.specs]

    def lookup(self, upstream: str) -> ToolSpec | None:
        """The tool an upstream call's function name refers to, if the request declared one."""
        return self.by_upstream.get(upstream)

    def find(self, kind: str, name: str | None = None, namespace: str | None = None
             ) -> ToolSpec | None:
        for spec in self.specs:
            if spec.kind == kind and spec.namespace == namespace and (
                    name is None or spec.name == name):
                return spec
        return None

    def upstream_name(self, kind: str, name: str | None = None,
                      namespace: str | None = None) -> str:
        """The upstream function name for a call item in the context (the same as the
        model would use now); for a tool no longer declared, the deterministic default."""
        spec = self.find(kind, name, namespace)
        if spec is not None:
            return spec.upstream
        if kind in BUILTIN_TYPES:
            return kind
        assert name is not None
        return flat_name(namespace, name) if namespace else name

    def choice_targets(self, entry: Mapping[str, Any]) -> list[str]:
        """Upstream names a `tool_choice` (or `allowed_tools` entry) designates; a function's
        name may be that of a namespace member."""
        kind = entry.get("type")
        if kind in ("function", "custom"):
            return [s.upstream for s in self.specs
                    if s.kind == kind and s.name == entry.get("name")]
        if kind in BUILTIN_TYPES:
            spec = self.find(str(kind))
            return [spec.upstream] if spec else []
        return []

    def allowed(self, choice: Any) -> frozenset[str] | None:
        """The upstream names the model may call, or None when any call may pass (`auto`,
        `required`, no choice): then a call to an undeclared tool follows
        ORP_UNDECLARED_TOOLS."""
        if choice is None or choice in ("auto", "required"):
            return None
        if choice == "none":
            return frozenset()
        if choice.get("type") == "allowed_tools":
            if choice.get("mode") == "none":
                return frozenset()
            return frozenset(n for entry in choice["tools"] for n in self.choice_targets(entry))
        return frozenset(self.choice_targets(choice))

    def chat_tool_choice(self, choice: Any, object_form: bool = True) -> Any:
        """`tool_choice` in the Chat Completions form. `object_form` False: the backend takes
        only the string forms, so a forced tool becomes "required" (the allowed set is enforced
        on the way back)."""
        if isinstance(choice, str):
            return choice
        if choice.get("type") == "allowed_tools":
            # All tools stay visible upstream (the prompt cache stays warm); the subset is
            # enforced on the way back. A single required tool can be forced exactly.
            mode = choice.get("mode") or "auto"
            allowed = self.allowed(choice) or frozenset()
            if mode == "required" and len(allowed) == 1 and object_form:
                return {"type": "function", "function": {"name": next(iter(allowed))}}
            return mode
        if not object_form:
            return "required"
        targets = self.choice_targets(choice)
        if not targets:
            raise invalid(f"Invalid value for 'tool_choice': no declared tool matches "
                          f"{choice.get('type')!r}.", "tool_choice")
        return {"type": "function", "function": {"name": targets[0]}}


def is_hosted(tool: Mapping[str, Any]) -> bool:
    """Whether the tool runs on OpenAI's servers (which a Chat Completions backend cannot do)."""
    kind = tool.get("type")
    if kind in HOSTED_TYPES:
        return True
    if kind == "tool_search":
        return tool.get("execution") != "client"
    if kind == "shell":
        env = tool.get("environment")
        return isinstance(env, dict) and env.get("type") != "local"
    return False


# -- call items: upstream arguments → item, and back ------------------------------------------


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return None


def custom_input(arguments: str) -> str:
    """The text of a custom tool call from the function arguments the upstream produced:
    `{"input": "..."}` as asked, a lone string member otherwise, else the raw arguments."""
    value = _parsed(arguments)
    if isinstance(value, dict):
        if isinstance(value.get("input"), str):
            return str(value["input"])
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    if isinstance(value, str):
        return value
    return arguments


def _string_list(value: Any, fallback: str) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, str):
        return [value]
    return [fallback] if fallback else []


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def call_fields(spec: ToolSpec | None, arguments: str) -> dict[str, Any]:
    """The kind-specific fields of a finished call item (besides id, type, status, call_id).

    Arguments the model got wrong are passed on as well as they fit, never dropped: the client
    reports the failure to the model, as it does against OpenAI."""
    kind = spec.kind if spec else "function"
    if kind == "function":
        return {"arguments": arguments}
    if kind == "custom":
        return {"input": custom_input(arguments)}
    args = _parsed(arguments)
    # Not a JSON object: the model wrote the command (or query) itself; it is passed as such.
    raw = "" if isinstance(args, dict) else arguments
    if not isinstance(args, dict):
        args = {}
    assert spec is not None
    if kind == "shell":
        env = spec.declared.get("environment")
        return {"action": {"commands": _string_list(args.get("commands"), raw),
                           "timeout_ms": _int_or_none(args.get("timeout_ms")),
                           "max_output_length": _int_or_none(args.get("max_output_length"))},
                "environment": env if isinstance(env, dict) else {"type": "local"}}
    if kind == "local_shell":
        env = args.get("env")
        return {"action": {
            "type": "exec",
            "command": _string_list(args.get("command"), raw),
            "env": ({k: v for k, v in env.items() if isinstance(v, str)}
                    if isinstance(env, dict) else {}),
            "timeout_ms": _int_or_none(args.get("timeout_ms")),
            "user": _str_or_none(args.get("user")),
            "working_directory": _str_or_none(args.get("working_directory")),
        }}
    if kind == "apply_patch":
        op_type = args.get("type")
        if op_type not in ("create_file", "update_file", "delete_file"):
            op_type = "update_file"
        operation: dict[str, Any] = {"type": op_type, "path": str(args.get("path") or "")}
        if op_type != "delete_file":
            operation["diff"] = str(args.get("diff") or "")
        return {"operation": operation}
    # tool_search: the arguments as an object, as OpenAI sends them.
    return {"arguments": {"query": raw} if raw.strip() else args, "execution": "client"}


def call_fields_pending(spec: ToolSpec | None) -> dict[str, Any]:
    """The kind-specific fields of a call item as `output_item.added` shows it."""
    kind = spec.kind if spec else "function"
    if kind == "function":
        return {"arguments": ""}
    if kind == "custom":
        return {"input": ""}
    return call_fields(spec, "{}")


def call_arguments(item: Mapping[str, Any]) -> str:
    """The upstream function arguments of a call item of the context (the inverse of
    `call_fields`)."""
    kind = item["type"]
    if kind == "function_call":
        return str(item["arguments"])
    if kind == "custom_tool_call":
        return json.dumps({"input": item["input"]}, ensure_ascii=False)
    if kind == "shell_call":
        value = item["action"]
    elif kind == "local_shell_call":
        value = {k: v for k, v in item["action"].items() if k != "type"}
    elif kind == "apply_patch_call":
        value = item["operation"]
    else:  # tool_search_call
        value = item.get("arguments") or {}
    return json.dumps({k: v for k, v in value.items() if v is not None}, ensure_ascii=False)


def call_kind(item: Mapping[str, Any]) -> str:
    """The tool kind a call item of the context belongs to."""
    kind = str(item["type"])
    return {"function_call": "function", "custom_tool_call": "custom"}.get(
        kind, kind.removesuffix("_call"))


def output_text(item: Mapping[str, Any]) -> str | None:
    """The text of a tool-output item that has no content parts (None for those that may:
    `function_call_output`, `custom_tool_call_output`)."""
    kind = item["type"]
    if kind == "shell_call_output":
        blocks = []
        for entry in item["output"]:
            outcome = entry.get("outcome") or {}
            status = ("timed out" if outcome.get("type") == "timeout"
                      else f"exit code {outcome.get('exit_code')}")
            blocks.append(f"[{status}]\nstdout:\n{entry.get('stdout') or ''}\n"
                          f"stderr:\n{entry.get('stderr') or ''}")
        return "\n\n".join(blocks)
    if kind == "local_shell_call_output":
        return str(item["output"])
    if kind == "apply_patch_call_output":
        return item.get("output") or f"The patch {item.get('status') or 'completed'}."
    if kind == "tool_search_output":
        names: list[str] = []
        for tool in item.get("tools") or ():
            if tool.get("type") == "namespace":
                names.extend(f"{tool['name']}.{m['name']}" for m in tool["tools"])
            else:
                names.append(str(tool.get("name") or tool.get("type")))
        return ("Tools now available: " + ", ".join(names)) if names else "No tools found."
    return None


# -- streaming a custom tool's input out of the JSON arguments ----------------------------------

_SEEK_OBJECT, _SEEK_KEY, _IN_KEY, _SEEK_COLON, _SEEK_VALUE, _IN_VALUE, _DONE, _GAVE_UP = range(8)
_WHITESPACE = " \t\r\n"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}
_plain_run = re.compile(r'[^"\\]+')


_INPUT_KEY = "input"


class JsonStringStream:
    """Decodes, as the pieces of a JSON object's text arrive, the value of its first member
    when that member is `input` and its value a string: `{"input": "a\\nb` yields `a`, `\n`,
    `b` as they come.

    Escapes split across pieces are held until complete. Anything else (another first key,
    another shape, bad JSON) stops the decoding (`gave_up`); the caller then takes the value
    from the whole arguments at the end (`custom_input`), which looks for `input` anywhere.
    """

    __slots__ = ("_key", "_pending", "_state", "done", "gave_up")

    def __init__(self) -> None:
        self._state = _SEEK_OBJECT
        self._key = ""
        self._pending = ""
        self.done = False  # the closing quote was seen: everything decoded is the value
        self.gave_up = False

    def feed(self, piece: str) -> str:
        """The decoded text this piece adds ('' if none)."""
        state = self._state
        if state >= _DONE:
            return ""
        text = self._pending + piece
        self._pending = ""
        out: list[str] = []
        i, end = 0, len(text)
        while i < end:
            c = text[i]
            if state == _IN_VALUE:
                if c == '"':
                    state = _DONE
                    self.done = True
                    break
                if c == "\\":
                    decoded, used = _escape(text, i)
                    if used == 0:
                        self._pending = text[i:]
                        break
                    if decoded is None:
                        state = _GAVE_UP
                        break
                    out.append(decoded)
                    i += used
                    continue
                run = _plain_run.match(text, i)
                assert run is not None
                out.append(run.group())
                i = run.end()
                continue
            if state == _IN_KEY:
                # Only an `input` member is the custom tool's text: streaming another string
                # (`{"reason": "…", "input": "…"}`) would hand the client the wrong input.
                if c == '"':
                    if self._key != _INPUT_KEY:
                        state = _GAVE_UP
                        break
                    state = _SEEK_COLON
                elif c == "\\" or len(self._key) >= len(_INPUT_KEY):
                    state = _GAVE_UP
                    break
                else:
                    self._key += c
                i += 1
                continue
            if c not in _WHITESPACE:
                expected = {_SEEK_OBJECT: "{", _SEEK_KEY: '"', _SEEK_COLON: ":",
                            _SEEK_VALUE: '"'}[state]
                if c != expected:
                    state = _GAVE_UP
                    break
                state = {_SEEK_OBJECT: _SEEK_KEY, _SEEK_KEY: _IN_KEY, _SEEK_COLON: _SEEK_VALUE,
                         _SEEK_VALUE: _IN_VALUE}[state]
            i += 1
        self._state = state
        self.gave_up = state == _GAVE_UP
        return "".join(out)


def _escape(text: str, i: int) -> tuple[str | None, int]:
    """The escape at `text[i]` (a backslash): (decoded, length), (None, n) if invalid, or
    (None, 0) if it is cut off at the end of `text`."""
    end = len(text)
    if i + 1 >= end:
        return None, 0
    kind = text[i + 1]
    if kind != "u":
        return _ESCAPES.get(kind), 2
    if i + 6 > end:
        return None, 0
    try:
        code = int(text[i + 2:i + 6], 16)
    except ValueError:
        return None, 6
    if 0xD800 <= code < 0xDC00:  # a high surrogate: its pair follows as another \u escape
        if i + 12 > end:
            return None, 0
        if text[i + 6:i + 8] == "\\u":
            try:
                low = int(text[i + 8:i + 12], 16)
            except ValueError:
                return None, 12
            if 0xDC00 <= low < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), 12
        return "\ufffd", 6
    return chr(code), 6
