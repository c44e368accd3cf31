"""Strict validation of Open Responses request bodies (spec 2026-04-24) at the gateway's edge.

Every request body is checked here before anything else looks at it, so the rest of the gateway
may trust the shapes it reads. Failures raise `ApiError(400, ...)` with OpenAI-style `code`s and
`param` set to the exact path of the offending value (`input[2].content[0].type`).

The validators return the body they were given: nothing is copied or filled in. They run on
every request, so they use plain `isinstance` checks driven by small per-object field tables,
build paths only when they need them, and never recurse on client-controlled depth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import ujson

from orp_proxy.errors import ApiError, invalid
from orp_proxy.protocol.tools import BUILTIN_TYPES, HOSTED_TYPES

__all__ = [
    "DEFAULT_LIMITS",
    "RequestLimits",
    "validate_compact_body",
    "validate_create_body",
    "validate_input_items",
]


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Size limits applied to request bodies; the defaults follow the spec where it has one."""

    max_input_items: int = 4096
    max_tools: int = 128
    max_metadata_keys: int = 16  # spec MetadataParam maxProperties
    max_metadata_key_length: int = 64
    max_metadata_value_length: int = 512  # spec
    max_schema_depth: int = 64  # nesting of tools[].parameters and text.format.schema
    max_string_length: int = 10_485_760  # spec maxLength of text fields


DEFAULT_LIMITS: Final = RequestLimits()

# Fixed by the spec rather than configurable.
_MAX_IMAGE_URL_LENGTH: Final = 20_971_520
_MAX_FILE_DATA_LENGTH: Final = 33_554_432
_MAX_NAME_LENGTH: Final = 64
_MAX_ID_FIELD_LENGTH: Final = 64  # call_id, safety_identifier, prompt_cache_key
_MAX_ALLOWED_TOOLS: Final = 128
_NAME_PATTERN: Final = "^[a-zA-Z0-9_-]+$"
_name_match = re.compile(r"[a-zA-Z0-9_-]+").fullmatch  # fullmatch: `$` would allow a "\n"

# --------------------------------------------------------------------------------------------
# Error construction. Only strings and numbers are ever echoed back, never containers, so that a
# pathological value cannot blow up (or bloat) the message.


def _join(parent: str, key: object) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a value of type {type(value).__name__}"


def _show(text: str) -> str:
    return f"'{text}'" if len(text) <= 80 else f"'{text[:80]}...'"


def _show_number(value: int | float) -> str:
    # Huge ints would hit Python's int-to-str digit limit; nobody needs to see them verbatim.
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"
    return repr(value) if isinstance(value, int) else f"{value:g}"


def _type_error(path: str, expected: str, value: object) -> ApiError:
    return invalid(
        f"Invalid type for '{path}': expected {expected}, but got {_describe(value)} instead.",
        path,
        "invalid_type",
    )


def _missing(path: str) -> ApiError:
    return invalid(f"Missing required parameter: '{path}'.", path, "missing_required_parameter")


def _unknown(path: str) -> ApiError:
    return invalid(f"Unknown parameter: '{path}'.", path, "unknown_parameter")


def _bad_choice(path: str, value: str, allowed: tuple[str, ...]) -> ApiError:
    supported = ", ".join(f"'{v}'" for v in allowed)
    return invalid(
        f"Invalid value for '{path}': {_show(value)}. Supported values are: {supported}.",
        path,
        "invalid_value",
    )


def _too_long(path: str, limit: int, length: int, what: str = "string") -> ApiError:
    noun = "an array" if what == "array" else "a string"
    return invalid(
        f"Invalid '{path}': {what} too long. Expected {noun} with maximum length {limit}, "
        f"but got {noun} with length {length} instead.",
        path,
        f"{what}_above_max_length",
    )


def _unsupported(path: str, why: str) -> ApiError:
    return invalid(f"Unsupported parameter: '{path}'. {why}", path, "unsupported_parameter")


def _empty_string(path: str) -> ApiError:
    return invalid(
        f"Invalid '{path}': empty string. Expected a string with minimum length 1, "
        "but got an empty string instead.",
        path,
        "empty_string",
    )


# --------------------------------------------------------------------------------------------
# Field checkers. A checker gets (value, parent path, key) so that the full path is only built
# when something is wrong or when it has to descend into a container.

_Check = Callable[[Any, str, str], None]
_ObjectCheck = Callable[[dict[str, Any], str], None]


def _skip(value: Any, parent: str, key: str) -> None:
    """For discriminator fields the dispatcher has already checked."""


def _string(
    *, nullable: bool = False, max_len: int | None = None, non_empty: bool = False
) -> _Check:
    def check(value: Any, parent: str, key: str) -> None:
        if isinstance(value, str):
            if non_empty and not value:
                raise _empty_string(_join(parent, key))
            if max_len is not None and len(value) > max_len:
                raise _too_long(_join(parent, key), max_len, len(value))
        elif value is not None or not nullable:
            raise _type_error(_join(parent, key), "a string", value)

    return check


def _name(value: Any, parent: str, key: str) -> None:
    """A function or schema name: `^[a-zA-Z0-9_-]+$`, at most 64 characters."""
    if not isinstance(value, str):
        raise _type_error(_join(parent, key), "a string", value)
    if not value:
        raise _empty_string(_join(parent, key))
    if len(value) > _MAX_NAME_LENGTH:
        raise _too_long(_join(parent, key), _MAX_NAME_LENGTH, len(value))
    if _name_match(value) is None:
        path = _join(parent, key)
        raise invalid(
            f"Invalid '{path}': string does not match pattern. Expected a string that matches "
            f"the pattern '{_NAME_PATTERN}'.",
            path,
            "invalid_value",
        )


def _enum(*allowed: str, nullable: bool = False) -> _Check:
    values = frozenset(allowed)

    def check(value: Any, parent: str, key: str) -> None:
        if isinstance(value, str):
            if value not in values:
                raise _bad_choice(_join(parent, key), value, allowed)
        elif value is not None or not nullable:
            raise _type_error(_join(parent, key), "a string", value)

    return check


def _boolean(*, nullable: bool = False) -> _Check:
    def check(value: Any, parent: str, key: str) -> None:
        if value is True or value is False or (value is None and nullable):
            return
        raise _type_error(_join(parent, key), "a boolean", value)

    return check


def _integer(*, minimum: int, maximum: int | None = None, nullable: bool = True) -> _Check:
    def check(value: Any, parent: str, key: str) -> None:
        if value is None and nullable:
            return
        # bool is an int subclass, and JSON `16.0` parses as a float: neither is an integer.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(_join(parent, key), "an integer", value)
        if value < minimum:
            path = _join(parent, key)
            raise invalid(
                f"Invalid '{path}': integer below minimum value. Expected a value >= {minimum}, "
                f"but got {_show_number(value)} instead.",
                path,
                "integer_below_min_value",
            )
        if maximum is not None and value > maximum:
            path = _join(parent, key)
            raise invalid(
                f"Invalid '{path}': integer above maximum value. Expected a value <= {maximum}, "
                f"but got {_show_number(value)} instead.",
                path,
                "integer_above_max_value",
            )

    return check


def _number(*, minimum: float, maximum: float) -> _Check:
    """A nullable number in [minimum, maximum]; the sampling parameters are all of this kind."""

    def check(value: Any, parent: str, key: str) -> None:
        if value is None:
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                path = _join(parent, key)
                raise invalid(
                    f"Invalid '{path}': expected a finite number, but got {value!r} instead.",
                    path,
                    "invalid_value",
                )
        elif not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(_join(parent, key), "a number", value)
        if value < minimum:
            path = _join(parent, key)
            raise invalid(
                f"Invalid '{path}': decimal below minimum value. Expected a value >= {minimum:g}, "
                f"but got {_show_number(value)} instead.",
                path,
                "decimal_below_min_value",
            )
        if value > maximum:
            path = _join(parent, key)
            raise invalid(
                f"Invalid '{path}': decimal above maximum value. Expected a value <= {maximum:g}, "
                f"but got {_show_number(value)} instead.",
                path,
                "decimal_above_max_value",
            )

    return check


def _check_depth(root: dict[str, Any], path: str, limit: int, what: str = "JSON schema") -> None:
    """Reject a JSON value nested deeper than `limit` (the root object is depth 1).

    Walks level by level instead of recursing, so a 10,000-deep value costs no stack. (A value
    that contains itself, possible only from Python callers, also ends as "too deep".)
    """
    level: list[Any] = [root]
    depth = 1
    while level:
        if depth > limit:
            raise invalid(
                f"Invalid '{path}': the {what} is nested too deeply. "
                f"Expected at most {limit} levels of nesting.",
                path,
                "invalid_value",
            )
        below: list[Any] = []
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, (dict, list)):
                    below.append(child)
                elif isinstance(child, float) and not math.isfinite(child):
                    # NaN / Infinity (or 1e400) parse, but are not JSON: they would reach the
                    # upstream and the stored response as invalid JSON.
                    raise invalid(
                        f"Invalid '{path}': the {what} contains a number that is not finite "
                        "(NaN, Infinity or out of range).",
                        path,
                        "invalid_value",
                    )
        level = below
        depth += 1


def _schema(*, limit: int, nullable: bool) -> _Check:
    """A free-form JSON-schema object, only its nesting depth bounded."""

    def check(value: Any, parent: str, key: str) -> None:
        if isinstance(value, dict):
            _check_depth(value, _join(parent, key), limit)
        elif value is not None or not nullable:
            raise _type_error(_join(parent, key), "an object", value)

    return check


def _array(
    element: Callable[[Any, str], None],
    *,
    nullable: bool = False,
    min_items: int = 0,
    max_items: int | None = None,
) -> _Check:
    def check(value: Any, parent: str, key: str) -> None:
        if not isinstance(value, list):
            if value is None and nullable:
                return
            raise _type_error(_join(parent, key), "an array", value)
        path = _join(parent, key)
        _check_length(value, path, min_items, max_items)
        for i, item in enumerate(value):
            element(item, f"{path}[{i}]")

    return check


def _check_length(value: list[Any], path: str, min_items: int, max_items: int | None) -> None:
    if max_items is not None and len(value) > max_items:
        raise _too_long(path, max_items, len(value), "array")
    if len(value) < min_items:
        raise invalid(
            f"Invalid '{path}': array too short. Expected an array with minimum length "
            f"{min_items}, but got an array with length {len(value)} instead.",
            path,
            "array_below_min_length",
        )


def _refused(why: str) -> _Check:
    """A field ORP cannot honour and must not ignore: only null (= absent) passes."""

    def check(value: Any, parent: str, key: str) -> None:
        if value is not None:
            raise _unsupported(_join(parent, key), why)

    return check


def _only(check: _Check, accepted: frozenset[Any], why: str) -> _Check:
    """`check` (the field's shape), then refuse the valid values outside `accepted`."""

    def wrapped(value: Any, parent: str, key: str) -> None:
        check(value, parent, key)
        if value is not None and value not in accepted:
            path = _join(parent, key)
            shown = _show(value) if isinstance(value, str) else repr(value)
            raise invalid(f"Unsupported value for '{path}': {shown}. {why}", path,
                          "unsupported_parameter")

    return wrapped


def _object_of(shape: _Shape, *, nullable: bool = False) -> _Check:
    def check(value: Any, parent: str, key: str) -> None:
        if value is None and nullable:
            return
        shape.check(value, _join(parent, key))

    return check


def _union_of(
    shapes: Mapping[str, _Shape], *, nullable: bool = False
) -> Callable[[Any, str], None]:
    """Element checker for an object discriminated by its `type`."""

    def check(value: Any, path: str) -> None:
        if value is None and nullable:
            return
        _dispatch(value, path, shapes)

    return check


def _dispatch(value: Any, path: str, shapes: Mapping[str, _Shape]) -> None:
    if not isinstance(value, dict):
        raise _type_error(path, "an object", value)
    kind = value.get("type")
    if not isinstance(kind, str):
        if "type" not in value:
            raise _missing(f"{path}.type")
        raise _type_error(f"{path}.type", "a string", kind)
    shape = shapes.get(kind)
    if shape is None:
        raise _bad_choice(f"{path}.type", kind, tuple(shapes))
    shape.check(value, path)


@dataclass(frozen=True, slots=True)
class _Shape:
    """An object's allowed fields, its required ones, and an optional cross-field check."""

    fields: Mapping[str, _Check]
    required: tuple[str, ...] = ()
    after: _ObjectCheck | None = None
    # Hosted tools: ORP does not use their settings, so any key passes (`after` bounds depth).
    open_fields: bool = False

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        fields = self.fields
        for key, item in value.items():
            field_check = fields.get(key)
            if field_check is None:
                if self.open_fields:
                    continue
                raise _unknown(_join(path, key))
            field_check(item, path, key)
        for key in self.required:
            if key not in value:
                raise _missing(_join(path, key))
        if self.after is not None:
            self.after(value, path)


# --------------------------------------------------------------------------------------------
# Shapes that do not depend on the limits.

_STATUS = _enum("in_progress", "completed", "incomplete", nullable=True)
_OPT_STRING = _string(nullable=True)
_STRING = _string()


def _opaque_objects(limit: int) -> _Check:
    """A nullable array of objects we carry but do not interpret (output_text logprobs)."""

    def element(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        _check_depth(value, path, limit, "value")

    return _array(element, nullable=True)


_ID_FIELD = _string(non_empty=True, max_len=_MAX_ID_FIELD_LENGTH)
_SHORT_STRING = _string(nullable=True, max_len=_MAX_ID_FIELD_LENGTH)


def _image_url_required(part: dict[str, Any], path: str) -> None:
    # The spec types image_url as nullable, but with no file_id in the spec it is the only source.
    if part.get("image_url") is None:
        raise _missing(f"{path}.image_url")


def _file_source_required(part: dict[str, Any], path: str) -> None:
    if part.get("file_data") is None and part.get("file_url") is None:
        raise invalid(
            f"Missing required parameter: one of '{path}.file_data' or '{path}.file_url' "
            "must be provided.",
            f"{path}.file_data",
            "missing_required_parameter",
        )


_URL_CITATION = _Shape(
    {
        "type": _skip,
        "start_index": _integer(minimum=0, nullable=False),
        "end_index": _integer(minimum=0, nullable=False),
        "url": _STRING,
        "title": _STRING,
    },
    ("start_index", "end_index", "url", "title"),
)

_NO_FILES_API = _refused(
    "File ids need OpenAI's Files API, which this gateway does not provide; send the content "
    "inline ('image_url' / 'file_data') or by URL instead.")
# A hint for OpenAI's prompt cache: no effect here (backends cache prefixes themselves).
_CACHE_BREAKPOINT = _object_of(
    _Shape({"mode": _enum("explicit"), "ttl": _enum("30m", "12h")}, ("mode",)), nullable=True)

_INPUT_IMAGE = _Shape(
    {
        "type": _skip,
        "image_url": _string(nullable=True, max_len=_MAX_IMAGE_URL_LENGTH),
        # "original" goes upstream as "high", the most a Chat Completions server knows.
        "detail": _enum("low", "high", "auto", "original", nullable=True),
        "file_id": _NO_FILES_API,
        "prompt_cache_breakpoint": _CACHE_BREAKPOINT,
    },
    after=_image_url_required,
)

_INPUT_FILE = _Shape(
    {
        "type": _skip,
        "filename": _OPT_STRING,
        "file_data": _string(nullable=True, max_len=_MAX_FILE_DATA_LENGTH),
        "file_url": _OPT_STRING,
        # How finely OpenAI renders a file; Chat Completions has no such knob.
        "detail": _enum("auto", "low", "high", nullable=True),
        "file_id": _NO_FILES_API,
        "prompt_cache_breakpoint": _CACHE_BREAKPOINT,
    },
    after=_file_source_required,
)

_INPUT_VIDEO = _Shape({"type": _skip, "video_url": _STRING}, ("video_url",))

_FUNCTION_CHOICE = _Shape({"type": _skip, "name": _STRING}, ("name",))
_BUILTIN_CHOICE = _Shape({"type": _skip})
# The tools a choice can name: those that become an upstream function.
_CHOICE_TARGETS: Final = {
    "function": _FUNCTION_CHOICE,
    "custom": _FUNCTION_CHOICE,
    **{kind: _BUILTIN_CHOICE for kind in BUILTIN_TYPES},
}
_ALLOWED_TOOLS = _Shape(
    {
        "type": _skip,
        "tools": _array(_union_of(_CHOICE_TARGETS), min_items=1, max_items=_MAX_ALLOWED_TOOLS),
        "mode": _enum("none", "auto", "required"),
    },
    ("tools",),
)
_TOOL_CHOICE_MODES: Final = ("none", "auto", "required")
_TOOL_CHOICE_SHAPES: Final = {**_CHOICE_TARGETS, "allowed_tools": _ALLOWED_TOOLS}


def _opt_name(value: Any, parent: str, key: str) -> None:
    if value is not None:
        _name(value, parent, key)


def _no_async(value: Any, parent: str, key: str) -> None:
    if value is True:
        path = _join(parent, key)
        raise invalid(f"Unsupported value for '{path}': asynchronous tool calls are not "
                      "supported by this gateway.", path, "unsupported_value")
    _boolean(nullable=True)(value, parent, key)


def _directly_callable(tool: dict[str, Any], path: str) -> None:
    callers = tool.get("allowed_callers")
    if callers is not None and "direct" not in callers:
        raise invalid(f"Unsupported value for '{path}.allowed_callers': this gateway has no "
                      "programmatic tool calling, so a tool must allow 'direct' calls.",
                      f"{path}.allowed_callers", "unsupported_value")


def _string_item(value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise _type_error(path, "a string", value)


def _string_map(value: Any, parent: str, key: str) -> None:
    if value is None:
        return
    path = _join(parent, key)
    if not isinstance(value, dict):
        raise _type_error(path, "an object", value)
    for name, entry in value.items():
        if not isinstance(entry, str):
            raise _type_error(_join(path, name), "a string", entry)


def _tool_choice(value: Any, parent: str, key: str) -> None:
    if isinstance(value, str):
        if value not in _TOOL_CHOICE_MODES:
            raise _bad_choice(_join(parent, key), value, _TOOL_CHOICE_MODES)
    elif value is not None:
        _dispatch(value, _join(parent, key), _TOOL_CHOICE_SHAPES)


_SUMMARY = _enum("concise", "detailed", "auto", nullable=True)
_REASONING_PARAM = _Shape(
    {
        "effort": _enum("none", "minimal", "low", "medium", "high", "xhigh", "max",
                        nullable=True),
        "summary": _SUMMARY,
        "generate_summary": _SUMMARY,  # the deprecated name of `summary`
        # Which turns' reasoning the model sees: ORP replays what the client sends back.
        "context": _enum("auto", "current_turn", "all_turns", nullable=True),
        "mode": _only(_string(nullable=True), frozenset({"standard"}),
                      "Only the 'standard' reasoning mode exists behind this gateway."),
    }
)
_STREAM_OPTIONS = _Shape({"include_obfuscation": _boolean()})
_PROMPT_CACHE_OPTIONS = _Shape(
    {
        "mode": _enum("implicit", "explicit"),
        "ttl": _enum("30m", "12h"),
        "prewarm": _boolean(),
        "comparison_response_id": _string(nullable=True),
    }
)
_BACKGROUND_OPTIONS = _Shape(
    {
        "completion_window": _only(
            _enum("soonest", "2h", "8h"), frozenset({"soonest"}),
            "Background responses are not supported by this gateway."),
        "continuation_id": _refused("Background responses are not supported by this gateway."),
    }
)
_IMAGE_OPTIONS = _Shape(
    {
        "context_compression": _only(
            _enum("auto", "enabled", "disabled"), frozenset({"auto", "disabled"}),
            "This gateway does not compress images in the context."),
    }
)
_ACCESS_PROGRAMS = _Shape(
    {
        "cyber": _only(_enum("standard", "daybreak_blue", "daybreak_red"),
                       frozenset({"standard"}),
                       "Access programs are OpenAI's; this gateway serves 'standard' only."),
    }
)
_MULTI_AGENT = _Shape(
    {
        "enabled": _only(_boolean(), frozenset({False}),
                         "Hosted multi-agent runs are not available behind this gateway."),
        "max_concurrent_subagents": _integer(minimum=1),
    },
    ("enabled",),
)
_CONTEXT_MANAGEMENT_ENTRY = _Shape(
    {"type": _STRING, "compact_threshold": _integer(minimum=1)}, ("type",)
)
_INCLUDABLE = (
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
    # Outputs of hosted tools, which never run here: nothing to include.
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
)
_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")


def _context_entry(value: Any, path: str) -> None:
    _CONTEXT_MANAGEMENT_ENTRY.check(value, path)


_CONTEXT_ENTRIES = _array(_context_entry, nullable=True)


def _context_management(value: Any, parent: str, key: str) -> None:
    """Null and [] mean none. Compaction by threshold is not automatic here: ignoring it would
    let the context grow into the model's limit unannounced."""
    _CONTEXT_ENTRIES(value, parent, key)
    if value:
        raise _unsupported(
            f"{_join(parent, key)}[0]",
            "This gateway does not compact automatically; call POST /v1/responses/compact "
            "and continue from its output instead.")

_ROLES: Final = ("user", "assistant", "system", "developer")
_ITEM_TYPES: Final = (
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "shell_call",
    "shell_call_output",
    "local_shell_call",
    "local_shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "tool_search_call",
    "tool_search_output",
    "reasoning",
    "item_reference",
    "compaction",
)
_HOSTED_ITEM = ("comes from one of OpenAI's hosted tools, which never run behind this gateway; "
                "leave it out of the input (or replace it with a message saying what it found).")
# Item types of OpenAI's API that ORP cannot take, and why (400 unsupported_parameter on their
# `type`, rather than a bare "invalid value").
_UNSUPPORTED_ITEMS: Final = {
    "web_search_call": _HOSTED_ITEM,
    "file_search_call": _HOSTED_ITEM,
    "code_interpreter_call": _HOSTED_ITEM,
    "image_generation_call": _HOSTED_ITEM,
    "mcp_list_tools": _HOSTED_ITEM,
    "mcp_call": _HOSTED_ITEM,
    "mcp_approval_request": _HOSTED_ITEM,
    "mcp_approval_response": _HOSTED_ITEM,
    "computer_call": "needs a computer-use model and tool, which this gateway does not offer.",
    "computer_call_output": "needs a computer-use model and tool, which this gateway does not "
                            "offer.",
    "program": "belongs to programmatic tool calling, which this gateway does not offer.",
    "program_output": "belongs to programmatic tool calling, which this gateway does not offer.",
    "compaction_trigger": "asks for compaction inside a response, which this gateway does not "
                          "do; call POST /v1/responses/compact and continue from its output.",
    "configuration_update": "changes settings mid-conversation, which this gateway does not "
                            "do; send the settings (reasoning, text) with the request instead.",
    "additional_tools": "adds tools mid-conversation, which this gateway does not do; declare "
                        "every tool in the request's 'tools'.",
}


def _websocket_stream(value: Any, parent: str, key: str) -> None:
    """`stream` on a socket: the spec says clients must not send it, but Codex and openai-agents
    always send `true`. True (or null) is what happens anyway; false cannot be honoured."""
    if value is None or value is True:
        return
    path = _join(parent, key)
    if value is False:
        raise invalid(
            f"Unsupported value for '{path}': false. Responses over a WebSocket are always "
            "streamed; omit 'stream' (or send true).",
            path,
            "unsupported_parameter",
        )
    raise _type_error(path, "a boolean", value)


def _websocket_background(value: Any, parent: str, key: str) -> None:
    """Background responses do not exist on a socket (nor in this gateway); false/null is the
    default and harmless."""
    if value is None or value is False:
        return
    path = _join(parent, key)
    if value is True:
        raise invalid(
            f"Unsupported value for '{path}': true. Background responses are not available over "
            "a WebSocket.",
            path,
            "unsupported_parameter",
        )
    raise _type_error(path, "a boolean", value)


# Client events of OpenAI's WebSocket mode that ORP does not offer: steering a running response
# (the SDK's `response.steer`) and appending to one (Codex, when a server allows it).
_UNSUPPORTED_EVENTS: Final = frozenset({"response.steer", "response.append"})


def _websocket_type(value: Any, parent: str, key: str) -> None:
    if not isinstance(value, str):
        raise _type_error(_join(parent, key), "a string", value)
    if value in _UNSUPPORTED_EVENTS:
        path = _join(parent, key)
        raise invalid(
            f"Unsupported event type '{value}': this gateway does not change a response once "
            "it runs. Send 'response.create' with previous_response_id (and the new items) "
            "after it ends.",
            path,
            "unsupported_parameter",
        )
    if value != "response.create":
        raise _bad_choice(_join(parent, key), value, ("response.create",))


# --------------------------------------------------------------------------------------------
# Shapes whose limits are configurable, built once per RequestLimits.


class _Validator:
    """The field tables for one `RequestLimits`; cached, as limits rarely vary per process."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        text = _string(max_len=limits.max_string_length)

        input_text = _Shape(
            {"type": _skip, "text": text, "prompt_cache_breakpoint": _CACHE_BREAKPOINT},
            ("text",))
        output_text = _Shape(
            {
                "type": _skip,
                "text": text,
                "annotations": _array(_union_of({"url_citation": _URL_CITATION})),
                # Opaque: only carried so our own output can be sent back as input.
                "logprobs": _opaque_objects(limits.max_schema_depth),
            },
            ("text",),
        )
        refusal = _Shape({"type": _skip, "refusal": text}, ("refusal",))
        user_parts = {
            "input_text": input_text,
            "input_image": _INPUT_IMAGE,
            "input_file": _INPUT_FILE,
        }
        instruction_parts = {"input_text": input_text}
        assistant_parts = {"output_text": output_text, "refusal": refusal}
        tool_output_parts = {**user_parts, "input_video": _INPUT_VIDEO}

        def message(parts: Mapping[str, _Shape]) -> _Shape:
            fields: dict[str, _Check] = {
                "id": _OPT_STRING,
                "type": _skip,
                "role": _skip,
                "content": self._text_or_parts(parts),
                "status": _STATUS,
            }
            # Nullable (unlike the spec) so that SDK-serialised output round-trips; the SDK's
            # easy input message allows it on every role. A label only: no effect upstream.
            fields["phase"] = _enum("commentary", "final_answer", nullable=True)
            return _Shape(fields, ("content",))

        self.messages: dict[str, _Shape] = {
            "user": message(user_parts),
            "assistant": message(assistant_parts),
            "system": message(instruction_parts),
            "developer": message(instruction_parts),
        }
        self.items: dict[str, _Shape] = {
            "function_call": _Shape(
                {
                    "id": _OPT_STRING,
                    "type": _skip,
                    "call_id": _ID_FIELD,
                    "name": _name,
                    "namespace": _opt_name,
                    "arguments": _STRING,
                    "status": _STATUS,
                },
                ("call_id", "name", "arguments"),
            ),
            "function_call_output": _Shape(
                {
                    "id": _OPT_STRING,
                    "type": _skip,
                    "call_id": _ID_FIELD,
                    "output": self._text_or_parts(tool_output_parts),
                    "status": _STATUS,
                },
                ("call_id", "output"),
            ),
            "reasoning": _Shape(
                {
                    "id": _OPT_STRING,
                    "type": _skip,
                    "summary": _array(
                        _union_of(
                            {"summary_text": _Shape({"type": _skip, "text": text}, ("text",))}
                        )
                    ),
                    "content": _array(
                        _union_of(
                            {"reasoning_text": _Shape({"type": _skip, "text": text}, ("text",))}
                        ),
                        nullable=True,
                    ),
                    "encrypted_content": _OPT_STRING,
                    "status": _STATUS,
                },
                ("summary",),
            ),
            **self._tool_items(text, self._text_or_parts(tool_output_parts)),
            "item_reference": _Shape({"type": _skip, "id": _STRING}, ("id",)),
            "compaction": _Shape(
                {
                    "id": _OPT_STRING,
                    "type": _skip,
                    "encrypted_content": text,
                    "created_by": _OPT_STRING,
                },
                ("encrypted_content",),
            ),
        }

        schema = _schema(limit=limits.max_schema_depth, nullable=False)
        self.tools = self._tool_shapes(text)
        text_formats = {
            "text": _Shape({"type": _skip}),
            "json_schema": _Shape(
                {
                    "type": _skip,
                    "name": _name,
                    "schema": schema,
                    "description": _STRING,
                    "strict": _boolean(nullable=True),
                },
                ("name", "schema"),
            ),
            "json_object": _Shape({"type": _skip}),
        }
        text_param = _Shape(
            {
                "format": self._element_as_field(_union_of(text_formats, nullable=True)),
                "verbosity": _enum("low", "medium", "high", nullable=True),
            }
        )

        create: dict[str, _Check] = {
            "model": _string(nullable=True, non_empty=True),
            "input": self._input,
            "previous_response_id": _string(nullable=True, non_empty=True),
            "include": _array(self._element_as_item(_enum(*_INCLUDABLE)), nullable=True),
            "tools": self._tools,
            "tool_choice": _tool_choice,
            "metadata": self._metadata,
            "text": _object_of(text_param, nullable=True),
            "temperature": _number(minimum=0, maximum=2),
            "top_p": _number(minimum=0, maximum=1),
            "presence_penalty": _number(minimum=-2, maximum=2),
            "frequency_penalty": _number(minimum=-2, maximum=2),
            "parallel_tool_calls": _boolean(nullable=True),
            "stream": _boolean(nullable=True),
            "stream_options": _object_of(_STREAM_OPTIONS, nullable=True),
            "background": _boolean(nullable=True),
            "background_options": _object_of(_BACKGROUND_OPTIONS, nullable=True),
            "max_output_tokens": _integer(minimum=16),
            "max_tool_calls": _integer(minimum=1),
            "reasoning": _object_of(_REASONING_PARAM, nullable=True),
            # 128 as OpenAI documents it (the spec says 64).
            "safety_identifier": _string(nullable=True, max_len=128),
            "prompt_cache_key": _SHORT_STRING,
            "prompt_cache_retention": _enum("in_memory", "24h", nullable=True),
            "prompt_cache_options": _object_of(_PROMPT_CACHE_OPTIONS, nullable=True),
            "user": _string(nullable=True, max_len=limits.max_string_length),
            "truncation": _enum("auto", "disabled", nullable=True),
            "instructions": _OPT_STRING,
            "store": _boolean(nullable=True),
            "service_tier": _enum(*_SERVICE_TIERS, nullable=True),
            "top_logprobs": _integer(minimum=0, maximum=20),
            "context_management": _context_management,
            "conversation": _refused(
                "Conversations live on OpenAI; continue with 'previous_response_id' instead."),
            "prompt": _refused(
                "Prompt templates live on OpenAI; send 'instructions' and 'input' instead."),
            "moderation": _refused("This gateway has no moderation models to apply."),
            "image": _object_of(_IMAGE_OPTIONS, nullable=True),
            "access_programs": _object_of(_ACCESS_PROGRAMS, nullable=True),
            "multi_agent": _object_of(_MULTI_AGENT, nullable=True),
            # Codex's per-request labels (turn, session, window ids): logged by nobody, no effect.
            "client_metadata": self._client_metadata,
        }
        self.create = _Shape(create)
        self.create_websocket = _Shape(
            {
                **create,
                "type": _websocket_type,
                "stream": _websocket_stream,
                # Only shapes the stream (obfuscation padding, which ORP never adds): no effect.
                "stream_options": _object_of(_STREAM_OPTIONS, nullable=True),
                "background": _websocket_background,
                # False: a warm-up that stores the context without generating (Codex, the SDK).
                "generate": _boolean(nullable=True),
                # The SDK's WebSocket lane: echoed on every event of the turn.
                "stream_id": _string(nullable=True, max_len=_MAX_ID_FIELD_LENGTH * 4),
            },
            ("type",),
        )
        self.compact = _Shape(
            {
                "model": _string(non_empty=True),
                "input": self._input,
                "previous_response_id": _string(nullable=True, non_empty=True),
                "instructions": _OPT_STRING,
                "prompt_cache_key": _SHORT_STRING,
            },
            ("model",),
        )

    # -- tools and their items ---------------------------------------------------------------

    def _tool_shapes(self, text: _Check) -> dict[str, _Shape]:
        """Every declarable tool: those that translate, and hosted ones (`tools.HOSTED_TYPES`)
        whose settings are not read (ORP drops or refuses them)."""
        depth = self.limits.max_schema_depth
        nullable_schema = _schema(limit=depth, nullable=True)
        callers = _array(self._element_as_item(_enum("direct", "programmatic")), nullable=True)
        common: dict[str, _Check] = {
            "type": _skip,
            "name": _name,
            "description": _OPT_STRING,
            "defer_loading": _boolean(nullable=True),
            "allowed_callers": callers,
            "async": _no_async,
        }
        function = _Shape(
            {
                **common,
                "parameters": nullable_schema,
                # Nullable because the openai SDK's FunctionToolParam sends `strict: null`.
                "strict": _boolean(nullable=True),
                "output_schema": nullable_schema,
            },
            ("name",),
            after=_directly_callable,
        )
        grammar = _Shape({"type": _skip, "syntax": _enum("lark", "regex"), "definition": text},
                         ("syntax", "definition"))
        custom_formats = {"text": _Shape({"type": _skip}), "grammar": grammar}
        custom = _Shape(
            {**common, "format": self._element_as_field(_union_of(custom_formats,
                                                                  nullable=True))},
            ("name",),
            after=_directly_callable,
        )
        members = _union_of({"function": function, "custom": custom})

        def unique_members(tool: dict[str, Any], path: str) -> None:
            _unique_names(tool["tools"], f"{path}.tools")

        def bounded(tool: dict[str, Any], path: str) -> None:
            _check_depth(tool, path, depth, "tool")

        hosted = _Shape({"type": _skip}, open_fields=True, after=bounded)
        builtin = {"type": _skip, "allowed_callers": callers}
        return {
            "function": function,
            "custom": custom,
            "namespace": _Shape(
                {
                    "type": _skip,
                    "name": _name,
                    "description": _OPT_STRING,
                    "tools": _array(members, min_items=1, max_items=self.limits.max_tools),
                },
                ("name", "tools"),
                after=unique_members,
            ),
            "tool_search": _Shape({"type": _skip,
                                   "execution": _enum("server", "client", nullable=True),
                                   "description": _OPT_STRING,
                                   "parameters": nullable_schema}),
            "local_shell": _Shape({"type": _skip}),
            "shell": _Shape({**builtin, "environment": _schema(limit=depth, nullable=True)},
                            after=_directly_callable),
            "apply_patch": _Shape(builtin, after=_directly_callable),
            **{kind: hosted for kind in sorted(HOSTED_TYPES)},
        }

    def _tool_items(self, text: _Check, tool_output: _Check) -> dict[str, _Shape]:
        """The call and output items of the client-executed tools (`tools.CALL_ITEM_TYPES`)."""
        base: dict[str, _Check] = {"id": _OPT_STRING, "type": _skip, "status": _STATUS,
                                   "created_by": _OPT_STRING}
        strings = _array(_string_item)
        opt_int = _integer(minimum=0)
        outcome = _union_of({
            "exit": _Shape({"type": _skip, "exit_code": _integer(minimum=-(2**31),
                                                                 nullable=False)},
                           ("exit_code",)),
            "timeout": _Shape({"type": _skip}),
        })
        shell_output = _Shape({"stdout": text, "stderr": text,
                               "outcome": self._element_as_field(outcome),
                               "created_by": _OPT_STRING}, ("stdout", "stderr", "outcome"))
        path_field = {"type": _skip, "path": text}
        operation = _union_of({
            "create_file": _Shape({**path_field, "diff": text}, ("path", "diff")),
            "update_file": _Shape({**path_field, "diff": text}, ("path", "diff")),
            "delete_file": _Shape(path_field, ("path",)),
        })
        depth = self.limits.max_schema_depth
        return {
            "custom_tool_call": _Shape(
                {**base, "call_id": _ID_FIELD, "name": _name, "namespace": _opt_name,
                 "input": text},
                ("call_id", "name", "input"),
            ),
            "custom_tool_call_output": _Shape(
                {**base, "call_id": _ID_FIELD, "output": tool_output}, ("call_id", "output")
            ),
            "shell_call": _Shape(
                {**base, "call_id": _ID_FIELD,
                 "action": _object_of(_Shape({"commands": strings, "timeout_ms": opt_int,
                                              "max_output_length": opt_int}, ("commands",))),
                 "environment": _schema(limit=depth, nullable=True)},
                ("call_id", "action"),
            ),
            "shell_call_output": _Shape(
                {**base, "call_id": _ID_FIELD,
                 "output": _array(self._element_as_item(_object_of(shell_output))),
                 "max_output_length": opt_int},
                ("call_id", "output"),
            ),
            "local_shell_call": _Shape(
                {**base, "call_id": _ID_FIELD,
                 "action": _object_of(_Shape({"type": _enum("exec"), "command": strings,
                                              "env": _string_map, "timeout_ms": opt_int,
                                              "user": _OPT_STRING,
                                              "working_directory": _OPT_STRING},
                                             ("command",)))},
                ("call_id", "action"),
            ),
            "local_shell_call_output": _Shape({**base, "id": _ID_FIELD, "output": text},
                                              ("id", "output")),
            "apply_patch_call": _Shape(
                {**base, "call_id": _ID_FIELD,
                 "operation": self._element_as_field(operation)},
                ("call_id", "operation"),
            ),
            "apply_patch_call_output": _Shape(
                {**base, "call_id": _ID_FIELD, "status": _enum("completed", "failed"),
                 "output": _OPT_STRING},
                ("call_id", "status"),
            ),
            "tool_search_call": _Shape(
                {**base, "call_id": _string(nullable=True, non_empty=True,
                                            max_len=_MAX_ID_FIELD_LENGTH),
                 "arguments": _schema(limit=depth, nullable=True),
                 "execution": _enum("server", "client", nullable=True)},
                ("arguments",),
            ),
            "tool_search_output": _Shape(
                {**base, "call_id": _string(nullable=True, non_empty=True,
                                            max_len=_MAX_ID_FIELD_LENGTH),
                 "tools": self._tools,
                 "execution": _enum("server", "client", nullable=True)},
                ("tools",),
            ),
        }

    # -- helpers that close over self ---------------------------------------------------------

    def _text_or_parts(self, parts: Mapping[str, _Shape]) -> _Check:
        """Message content or tool output: a string, or an array of the given part types."""
        max_len = self.limits.max_string_length
        element = _union_of(parts)

        def check(value: Any, parent: str, key: str) -> None:
            if isinstance(value, str):
                if len(value) > max_len:
                    raise _too_long(_join(parent, key), max_len, len(value))
            elif isinstance(value, list):
                path = _join(parent, key)
                for i, part in enumerate(value):
                    element(part, f"{path}[{i}]")
            else:
                raise _type_error(_join(parent, key), "a string or an array", value)

        return check

    @staticmethod
    def _element_as_field(element: Callable[[Any, str], None]) -> _Check:
        return lambda value, parent, key: element(value, _join(parent, key))

    @staticmethod
    def _element_as_item(field_check: _Check) -> Callable[[Any, str], None]:
        # An array element's path is the entry itself (`include[1]`): an empty parent.
        return lambda value, path: field_check(value, "", path)

    def _input(self, value: Any, parent: str, key: str) -> None:
        if isinstance(value, list):
            self.input_items(value, _join(parent, key))
        elif isinstance(value, str):
            if len(value) > self.limits.max_string_length:
                raise _too_long(_join(parent, key), self.limits.max_string_length, len(value))
        elif value is not None:
            raise _type_error(_join(parent, key), "a string or an array of input items", value)

    def input_items(self, value: Any, path: str) -> None:
        """The body of `validate_input_items`, dispatching each item on `type` (or its shape)."""
        if not isinstance(value, list):
            raise _type_error(path, "an array of input items", value)
        _check_length(value, path, 0, self.limits.max_input_items)
        items = self.items
        messages = self.messages
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if not isinstance(item, dict):
                raise _type_error(item_path, "an object", item)
            kind = item.get("type")
            if kind is None:
                # Typeless items: OpenAI's "easy input message" has a role, a bare reference an id.
                if "role" in item:
                    kind = "message"
                elif "id" in item:
                    kind = "item_reference"
                elif "content" in item:
                    raise _missing(f"{item_path}.role")
                else:
                    raise _missing(f"{item_path}.type")
            elif not isinstance(kind, str):
                raise _type_error(f"{item_path}.type", "a string", kind)
            if kind == "message":
                role = item.get("role")
                if not isinstance(role, str):
                    if "role" not in item:
                        raise _missing(f"{item_path}.role")
                    raise _type_error(f"{item_path}.role", "a string", role)
                shape = messages.get(role)
                if shape is None:
                    raise _bad_choice(f"{item_path}.role", role, _ROLES)
            else:
                shape = items.get(kind)
                if shape is None:
                    why = _UNSUPPORTED_ITEMS.get(kind)
                    if why is not None:
                        raise invalid(f"Unsupported item type '{kind}': it {why}",
                                      f"{item_path}.type", "unsupported_parameter")
                    raise _bad_choice(f"{item_path}.type", kind, _ITEM_TYPES)
            shape.check(item, item_path)

    def _tools(self, value: Any, parent: str, key: str) -> None:
        if value is None:
            return
        path = _join(parent, key)
        if not isinstance(value, list):
            raise _type_error(path, "an array", value)
        _check_length(value, path, 0, self.limits.max_tools)
        for i, tool in enumerate(value):
            _dispatch(tool, f"{path}[{i}]", self.tools)
        _unique_names(value, path)

    def _client_metadata(self, value: Any, parent: str, key: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise _type_error(_join(parent, key), "an object", value)
        _check_depth(value, _join(parent, key), self.limits.max_schema_depth, "object")

    def _metadata(self, value: Any, parent: str, key: str) -> None:
        if value is None:
            return
        path = _join(parent, key)
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        limits = self.limits
        if len(value) > limits.max_metadata_keys:
            raise invalid(
                f"Invalid '{path}': too many properties. Expected an object with at most "
                f"{limits.max_metadata_keys} properties, but got an object with {len(value)} "
                "properties instead.",
                path,
                "object_above_max_properties",
            )
        for name, entry in value.items():
            entry_path = _join(path, name)
            if not isinstance(name, str):
                raise _type_error(entry_path, "a string key", name)
            if len(name) > limits.max_metadata_key_length:
                raise invalid(
                    f"Invalid '{entry_path}': metadata key too long. Expected a key with maximum "
                    f"length {limits.max_metadata_key_length}, but got a key with length "
                    f"{len(name)} instead.",
                    entry_path,
                    "string_above_max_length",
                )
            if not isinstance(entry, str):
                raise _type_error(entry_path, "a string", entry)
            if len(entry) > limits.max_metadata_value_length:
                raise _too_long(entry_path, limits.max_metadata_value_length, len(entry))


def _unique_names(tools: list[dict[str, Any]], path: str) -> None:
    """Named tools (functions, custom tools, namespaces) unique by name; built-ins by type."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        kind = tool["type"]
        if "name" in tool and kind in ("function", "custom", "namespace"):
            key, what, field_path = tool["name"], "tool name", f"{path}[{i}].name"
        elif kind in BUILTIN_TYPES:
            key, what, field_path = f"type:{kind}", "tool type", f"{path}[{i}].type"
        else:
            continue
        if key in seen:
            shown = tool["name"] if what == "tool name" else kind
            raise invalid(
                f"Invalid '{field_path}': duplicate {what} {_show(shown)}. "
                f"Each {what} may be declared once.",
                field_path,
                "invalid_value",
            )
        seen.add(key)


@lru_cache(maxsize=16)
def _validator(limits: RequestLimits) -> _Validator:
    return _Validator(limits)


# --------------------------------------------------------------------------------------------
# Cross-field rules and the public entry points.


def _require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(
            f"Invalid request body: expected a JSON object, but got {_describe(body)} instead.",
            None,
            "invalid_type",
        )
    return body


def _require_input(body: dict[str, Any]) -> None:
    items = body.get("input")
    if (items is None or (isinstance(items, list) and not items)) and body.get(
        "previous_response_id"
    ) is None:
        raise invalid(
            "Missing required parameter: 'input'. Provide 'input' (a string or a non-empty array "
            "of input items) or a 'previous_response_id' to continue from.",
            "input",
            "missing_required_parameter",
        )


def _declares(tools: Any, entry: dict[str, Any]) -> bool:
    """Whether `tools` declares what a tool choice (or allowed_tools entry) names; a function
    or custom tool may be a namespace member."""
    kind = entry["type"]
    for tool in tools:
        if tool["type"] == kind and (kind in BUILTIN_TYPES or tool["name"] == entry["name"]):
            return True
        if tool["type"] == "namespace" and kind in ("function", "custom") and any(
                m["type"] == kind and m["name"] == entry["name"] for m in tool["tools"]):
            return True
    return False


def _check_tool_choice_names(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    tools = body.get("tools") or ()
    if choice == "required" and not tools:
        raise invalid(
            "Invalid value for 'tool_choice': 'required' needs at least one tool in 'tools'.",
            "tool_choice",
            "invalid_value",
        )
    if not isinstance(choice, dict):
        return
    if choice["type"] == "allowed_tools":
        wanted = [(f"tool_choice.tools[{i}]", entry) for i, entry in enumerate(choice["tools"])]
    else:
        wanted = [("tool_choice", choice)]
    for path, entry in wanted:
        if not _declares(tools, entry):
            named = "name" in entry
            what = (f"no {entry['type']} tool named {_show(entry['name'])}" if named
                    else f"no {entry['type']} tool")
            raise invalid(
                f"Invalid value for '{path}{'.name' if named else '.type'}': {what} is "
                "declared in 'tools'.",
                f"{path}.name" if named else f"{path}.type",
                "invalid_value",
            )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _shown_key(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_unicode(body: dict[str, Any]) -> None:
    """Reject a lone UTF-16 surrogate (a `\\ud800` escape without its pair) in any string or
    key: it is not Unicode, so it cannot be sent on as UTF-8, and upstream servers answer 5xx
    to it as an escape. One C-speed encode finds out whether there is one; only then a walk
    (by levels, no recursion) finds its path."""
    try:
        ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    except (OverflowError, ValueError, TypeError):
        pass  # a value the encoder refuses for another reason: the walk decides
    level: list[tuple[Any, str]] = [(body, "")]
    seen: set[int] = set()  # a value that contains itself (Python callers only) ends
    while level:
        below: list[tuple[Any, str]] = []
        for node, path in level:
            if id(node) in seen:
                continue
            seen.add(id(node))
            pairs = (node.items() if isinstance(node, dict)
                     else ((f"{path}[{i}]", v) for i, v in enumerate(node)))
            for key, child in pairs:
                if isinstance(node, dict):
                    if _SURROGATE.search(key):
                        where = _join(path, _shown_key(key))
                        raise _lone_surrogate(where, "name")
                    key = _join(path, key)
                if isinstance(child, str):
                    if not child.isascii() and _SURROGATE.search(child):
                        raise _lone_surrogate(key, "value")
                elif isinstance(child, (dict, list)):
                    below.append((child, key))
        level = below


def _lone_surrogate(path: str, what: str) -> ApiError:
    return invalid(f"Invalid {what} at '{path}': the string contains a lone UTF-16 surrogate "
                   "(an escape such as \\ud800 without its pair), which is not valid Unicode.",
                   path, "invalid_unicode")


def validate_create_body(
    body: object, *, limits: RequestLimits = DEFAULT_LIMITS, websocket: bool = False
) -> dict[str, Any]:
    """Validate a `CreateResponseBody` (or, with `websocket=True`, a `response.create` event).

    Returns `body` itself; raises `ApiError` (400) naming the first offending path.
    """
    body = _require_object(body)
    _check_unicode(body)
    validator = _validator(limits)
    (validator.create_websocket if websocket else validator.create).check(body, "")
    _require_input(body)
    if not websocket and body.get("stream_options") is not None and body.get("stream") is not True:
        raise invalid(
            "Invalid value for 'stream_options': 'stream_options' is only allowed when 'stream' "
            "is true.",
            "stream_options",
            "invalid_value",
        )
    _check_tool_choice_names(body)
    return body


def validate_compact_body(
    body: object, *, limits: RequestLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Validate a `/responses/compact` body (`CompactResponseMethodPublicBody`); returns it."""
    body = _require_object(body)
    _check_unicode(body)
    _validator(limits).compact.check(body, "")
    _require_input(body)
    return body


def validate_input_items(items: object, param: str, limits: RequestLimits) -> None:
    """Validate an array of input items (`ItemParam`) found at path `param`, e.g. `input`."""
    _validator(limits).input_items(items, param)
