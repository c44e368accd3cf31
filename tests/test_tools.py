"""Tools as agents declare them (`protocol/tools.py`): each kind to a Chat Completions function
and back, the incremental decoding of a custom tool's input, hosted and undeclared tools, limits.

Output items and events are checked against the `openai` SDK's own models (the spec has only
function tools, so `tests.sse_check` cannot judge these)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.responses import (
    ResponseApplyPatchToolCall,
    ResponseCustomToolCall,
    ResponseFunctionShellToolCall,
    ResponseFunctionToolCall,
    ResponseOutputItem,
    ResponseStreamEvent,
    ResponseToolSearchCall,
)
from openai.types.responses.response_output_item import LocalShellCall
from pydantic import TypeAdapter

from orp_proxy.config import Settings
from orp_proxy.errors import ApiError
from orp_proxy.protocol.resource import build_response
from orp_proxy.protocol.tools import JsonStringStream, ToolSet, custom_input, flat_name
from orp_proxy.protocol.transcoder import ToolNotAllowed, Transcoder
from orp_proxy.protocol.translate import build_chat_request, normalize_input, to_chat_messages
from orp_proxy.protocol.validation import validate_create_body
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, tool_call_chunks
from tests.conftest import Proxy

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
ITEMS: TypeAdapter[Any] = TypeAdapter(ResponseOutputItem)

GRAMMAR = 'start: "*** Begin Patch" LF body "*** End Patch"\nbody: /(.|\\n)*/\n%import common.LF'
EXEC = {"type": "function", "name": "exec_command", "description": "Runs a command.",
        "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                       "required": ["cmd"]}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edits files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": GRAMMAR}}
AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
          "tools": [{"type": "function", "name": "spawn_agent", "strict": False,
                     "parameters": {"type": "object", "properties": {}}},
                    {"type": "custom", "name": "note"}]}
SEARCH = {"type": "tool_search", "execution": "client", "description": "Find tools.",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                         "required": ["query"]}}
# What Codex 0.171 declares for a catalog model (descriptions shortened), plus the built-ins.
CODEX_TOOLS: list[dict[str, Any]] = [
    EXEC, APPLY_PATCH, AGENTS, SEARCH,
    {"type": "web_search", "external_web_access": True, "search_content_types": ["text"]},
]
ALL_TOOLS: list[dict[str, Any]] = [
    *CODEX_TOOLS, {"type": "shell", "environment": {"type": "local"}}, {"type": "local_shell"},
    {"type": "apply_patch"}, {"type": "mcp", "server_label": "crm", "server_url": "https://x"},
]


# -- the incremental decoder ------------------------------------------------------------------


def decode_in_pieces(text: str, cuts: list[int]) -> tuple[str, JsonStringStream]:
    stream = JsonStringStream()
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    out = "".join(stream.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    return out, stream


@given(st.text(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       st.booleans())
def test_decoder_yields_the_string_however_it_is_cut(value: str, cuts: list[int],
                                                     ascii_only: bool) -> None:
    args = json.dumps({"input": value}, ensure_ascii=ascii_only)
    out, stream = decode_in_pieces(args, cuts)
    assert out == value and stream.done


def test_decoder_character_by_character_with_every_escape() -> None:
    value = 'a"b\\c/d\be\ff\ng\rh\ti\u00e9 \U0001F600 end'
    args = json.dumps({"input": value}, ensure_ascii=True).replace("/", "\\/")
    stream = JsonStringStream()
    assert "".join(stream.feed(c) for c in args) == value
    assert stream.done and not stream.gave_up


@pytest.mark.parametrize("args", ['{"n": 1}', '["x"]', 'plain text', '{"a": "\\x"}',
                                  '{"reason": "thinking", "input": "ls"}', '{"inputs": "x"}',
                                  '{"in\\u0070ut": "x"}'])
def test_decoder_gives_up_on_other_shapes(args: str) -> None:
    stream = JsonStringStream()
    assert stream.feed(args) == ""
    assert not stream.done


def test_custom_input_fallbacks() -> None:
    assert custom_input('{"input": "x"}') == "x"
    assert custom_input('{"patch": "x", "n": 1}') == "x"  # the lone string member
    assert custom_input('"x"') == "x"
    assert custom_input("*** Begin Patch") == "*** Begin Patch"  # raw text as produced


# -- the tool set -----------------------------------------------------------------------------


def test_codex_tools_become_functions() -> None:
    tools = ToolSet.build(CODEX_TOOLS)
    chat = {t["function"]["name"]: t["function"] for t in tools.chat_tools()}
    assert list(chat) == ["exec_command", "apply_patch", "multi_agent_v1__spawn_agent",
                          "multi_agent_v1__note", "tool_search"]
    assert chat["exec_command"] == {"name": "exec_command", "description": "Runs a command.",
                                    "parameters": EXEC["parameters"], "strict": False}
    patch = chat["apply_patch"]
    assert patch["parameters"]["properties"] == {
        "input": {"type": "string", "description": "The tool's whole input text."}}
    assert patch["description"].startswith("Edits files.") and GRAMMAR in patch["description"]
    assert "Lark grammar" in patch["description"]
    assert chat["tool_search"]["parameters"] == SEARCH["parameters"]
    assert tools.dropped == ["web_search"]
    spec = tools.lookup("multi_agent_v1__spawn_agent")
    assert spec is not None and (spec.kind, spec.name, spec.namespace) == (
        "function", "spawn_agent", "multi_agent_v1")


def test_hosted_tools_refused_on_request() -> None:
    with pytest.raises(ApiError) as info:
        ToolSet.build(ALL_TOOLS, hosted="refuse")
    assert info.value.param == "tools[4].type" and info.value.code == "unsupported_tool"
    tools = ToolSet.build(ALL_TOOLS)
    assert tools.dropped == ["web_search", "mcp:crm"]
    container = {"type": "shell", "environment": {"type": "container_auto"}}
    server_search = {"type": "tool_search", "execution": "server"}
    assert ToolSet.build([container, server_search]).dropped == ["shell", "tool_search"]


def test_names_stay_valid_unique_and_reversible() -> None:
    long_ns = "n" * 40
    tools = ToolSet.build([
        {"type": "function", "name": "crm__find"},  # the flat name a member would take
        {"type": "namespace", "name": "crm", "description": "",
         "tools": [{"type": "function", "name": "find"}]},
        {"type": "namespace", "name": long_ns, "description": "",
         "tools": [{"type": "function", "name": "f" * 40}, {"type": "function", "name": "g"}]},
        {"type": "function", "name": "shell"},
        {"type": "shell"},
    ])
    names = [t["function"]["name"] for t in tools.chat_tools()]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 64 and all(c.isalnum() or c in "_-" for c in n) for n in names)
    member = tools.find("function", "find", "crm")
    assert member is not None and member.upstream != "crm__find"
    assert tools.lookup(member.upstream) is member
    assert tools.lookup("crm__find") is tools.find("function", "crm__find")
    long_member = tools.find("function", "f" * 40, long_ns)
    assert long_member is not None and tools.lookup(long_member.upstream) is long_member
    builtin = tools.find("shell")
    assert builtin is not None and builtin.upstream != "shell"
    assert tools.upstream_name("function", "g", long_ns) == f"{long_ns}__g"
    assert tools.upstream_name("function", "x", "gone") == flat_name("gone", "x")


def test_tool_search_output_declares_what_it_found() -> None:
    found = {"type": "tool_search_output", "call_id": "ts1", "tools": [AGENTS]}
    tools = ToolSet.build([EXEC, SEARCH], [found])
    assert tools.lookup("multi_agent_v1__spawn_agent") is not None


def test_tool_choice_forms() -> None:
    tools = ToolSet.build(ALL_TOOLS)

    def forced(choice: dict[str, Any]) -> Any:
        return tools.chat_tool_choice(choice)["function"]["name"]

    assert forced({"type": "custom", "name": "apply_patch"}) == "apply_patch"
    assert forced({"type": "function", "name": "spawn_agent"}) == "multi_agent_v1__spawn_agent"
    assert forced({"type": "shell"}) == "shell"
    # The custom tool named apply_patch keeps the plain name; the built-in gets another.
    assert forced({"type": "apply_patch"}) == tools.upstream_name("apply_patch") != "apply_patch"
    allowed = {"type": "allowed_tools", "mode": "auto",
               "tools": [{"type": "custom", "name": "apply_patch"}, {"type": "local_shell"}]}
    assert tools.allowed(allowed) == {"apply_patch", "local_shell"}
    assert tools.chat_tool_choice(allowed) == "auto"


# -- input items → chat messages ---------------------------------------------------------------


def chat_messages(items: list[dict[str, Any]], tools: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    return to_chat_messages(normalize_input(items), instructions=None, developer_role="system",
                            tools=ToolSet.build(tools))


def test_call_and_output_items_become_tool_calls_and_tool_messages() -> None:
    items = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "spawn_agent",
         "namespace": "multi_agent_v1", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch",
         "input": "*** Begin Patch\n*** End Patch\n", "status": "completed"},
        {"type": "shell_call", "call_id": "c3",
         "action": {"commands": ["ls"], "timeout_ms": None, "max_output_length": 100}},
        {"type": "local_shell_call", "id": "lsh_1", "call_id": "c4", "status": "completed",
         "action": {"type": "exec", "command": ["ls", "-l"], "env": {}}},
        {"type": "apply_patch_call", "call_id": "c5", "status": "completed",
         "operation": {"type": "delete_file", "path": "a.txt"}},
        {"type": "tool_search_call", "call_id": None, "id": "tsc_1",
         "arguments": {"query": "agents"}, "execution": "client", "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "spawned"},
        {"type": "custom_tool_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "Success."}]},
        {"type": "shell_call_output", "call_id": "c3", "output": [
            {"stdout": "a\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
            {"stdout": "", "stderr": "", "outcome": {"type": "timeout"}}]},
        {"type": "local_shell_call_output", "id": "lsh_1", "output": "total 0"},
        {"type": "apply_patch_call_output", "call_id": "c5", "status": "failed",
         "output": None},
        {"type": "tool_search_output", "call_id": None, "tools": [AGENTS]},
    ]
    validate_create_body({"model": "m", "input": items, "tools": ALL_TOOLS})
    messages = chat_messages(items, ALL_TOOLS)
    assert messages[0] == {"role": "user", "content": "go"}
    calls = messages[1]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [
        ("c1", "multi_agent_v1__spawn_agent"), ("c2", "apply_patch"), ("c3", "shell"),
        ("c4", "local_shell"), ("c5", ToolSet.build(ALL_TOOLS).upstream_name("apply_patch")),
        ("tsc_1", "tool_search")]
    args = [json.loads(c["function"]["arguments"]) for c in calls]
    assert args == [{}, {"input": "*** Begin Patch\n*** End Patch\n"},
                    {"commands": ["ls"], "max_output_length": 100},
                    {"command": ["ls", "-l"], "env": {}},
                    {"type": "delete_file", "path": "a.txt"}, {"query": "agents"}]
    tool_messages = messages[2:]
    assert [m["tool_call_id"] for m in tool_messages] == ["c1", "c2", "c3", "c4", "c5", "tsc_1"]
    contents = [m["content"] for m in tool_messages]
    assert contents[:2] == ["spawned", "Success."]
    assert "[exit code 0]\nstdout:\na\n" in contents[2] and "[timed out]" in contents[2]
    assert contents[3] == "total 0"
    assert contents[4] == "The patch failed."
    assert contents[5] == ("Tools now available: multi_agent_v1.spawn_agent, "
                           "multi_agent_v1.note")


# -- upstream calls → items and events -----------------------------------------------------------


def transcode(chunks: list[dict[str, Any]], tools: list[dict[str, Any]] = ALL_TOOLS,
              **kwargs: Any) -> tuple[Transcoder, list[dict[str, Any]]]:
    counter = itertools.count()
    body = {"model": "m", "input": "x", "tools": tools}
    tc = Transcoder(build_response(body, model="m"), tools=ToolSet.build(tools),
                    id_factory=lambda p: f"{p}_{next(counter)}", **kwargs)
    tc.start()
    for chunk in chunks:
        tc.feed(chunk)
    tc.finish()
    events = tc.take()
    for event in events:
        EVENTS.validate_python(event)
    return tc, events


def output_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    output: list[dict[str, Any]] = events[-1]["response"]["output"]
    return output


def test_custom_call_streams_its_input() -> None:
    value = '*** Begin Patch\n*** Add File: "a b".txt\n+héllo\n*** End Patch\n'
    args = json.dumps({"input": value})
    _, events = transcode(tool_call_chunks([("call_p", "apply_patch", args)], split_args=1))
    (item,) = output_of(events)
    assert item == {"id": "ctc_2", "type": "custom_tool_call", "status": "completed",
                    "call_id": "call_p", "name": "apply_patch", "input": value}
    assert isinstance(ITEMS.validate_python(item), ResponseCustomToolCall)
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 10 and "".join(deltas) == value
    (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert done["input"] == value and done["item_id"] == "ctc_2"
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["input"] == "" and added["item"]["type"] == "custom_tool_call"
    assert not any(e["type"].startswith("response.function_call") for e in events)


def test_custom_call_with_raw_arguments_still_adds_up() -> None:
    _, events = transcode(tool_call_chunks([("c", "apply_patch", "*** Begin Patch")]))
    assert output_of(events)[0]["input"] == "*** Begin Patch"
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert "".join(deltas) == "*** Begin Patch"


def test_custom_call_input_is_the_input_member_not_the_first_string() -> None:
    """A model that writes another member first: the client gets `input`, streamed and final
    (it is what the client runs)."""
    args = json.dumps({"reason": "thinking", "input": "ls -la"})
    _, events = transcode(tool_call_chunks([("c", "apply_patch", args)], split_args=1))
    assert output_of(events)[0]["input"] == "ls -la"
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert "".join(deltas) == "ls -la"
    (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert done["input"] == "ls -la"


def test_custom_call_cut_short_keeps_the_text_streamed() -> None:
    chunks = tool_call_chunks([("c", "apply_patch", '{"input": "*** Begin Pa')],
                              finish_reason="length")
    _, events = transcode(chunks)
    assert events[-1]["type"] == "response.incomplete"
    (item,) = output_of(events)
    assert (item["input"], item["status"]) == ("*** Begin Pa", "incomplete")
    (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert done["input"] == "*** Begin Pa"


def test_namespaced_call_comes_back_with_its_namespace() -> None:
    _, events = transcode(tool_call_chunks([("c", "multi_agent_v1__spawn_agent", "{}")]))
    (item,) = output_of(events)
    assert (item["type"], item["name"], item["namespace"]) == (
        "function_call", "spawn_agent", "multi_agent_v1")
    parsed = ITEMS.validate_python(item)
    assert isinstance(parsed, ResponseFunctionToolCall) and parsed.namespace == "multi_agent_v1"
    assert [e["type"] for e in events].count("response.function_call_arguments.done") == 1
    _, events = transcode(tool_call_chunks([("c", "multi_agent_v1__note", '{"input": "hi"}')]))
    assert output_of(events)[0] == {"id": "ctc_2", "type": "custom_tool_call",
                                    "status": "completed", "call_id": "c", "name": "note",
                                    "namespace": "multi_agent_v1", "input": "hi"}


def test_builtin_calls_become_their_items() -> None:
    tools = ToolSet.build(ALL_TOOLS)
    patch_name = tools.upstream_name("apply_patch")
    calls = [
        ("c1", "shell", '{"commands": ["ls -a"], "timeout_ms": 5000}'),
        ("c2", "local_shell", '{"command": ["ls"], "env": {"A": "1"}, "user": "me"}'),
        ("c3", patch_name, '{"type": "create_file", "path": "a.txt", "diff": "+hi\\n"}'),
        ("c4", "tool_search", '{"query": "agents", "limit": 3}'),
    ]
    _, events = transcode(tool_call_chunks(calls, split_args=4))
    shell, local, patch, search = output_of(events)
    assert shell["action"] == {"commands": ["ls -a"], "timeout_ms": 5000,
                               "max_output_length": None}
    assert shell["environment"] == {"type": "local"}
    assert isinstance(ITEMS.validate_python(shell), ResponseFunctionShellToolCall)
    assert local["action"] == {"type": "exec", "command": ["ls"], "env": {"A": "1"},
                               "timeout_ms": None, "user": "me", "working_directory": None}
    assert isinstance(ITEMS.validate_python(local), LocalShellCall)
    assert patch["operation"] == {"type": "create_file", "path": "a.txt", "diff": "+hi\n"}
    assert isinstance(ITEMS.validate_python(patch), ResponseApplyPatchToolCall)
    assert search["arguments"] == {"query": "agents", "limit": 3}
    assert search["execution"] == "client"
    assert isinstance(ITEMS.validate_python(search), ResponseToolSearchCall)
    assert [i["type"] for i in output_of(events)] == [
        "shell_call", "local_shell_call", "apply_patch_call", "tool_search_call"]
    assert all(i["status"] == "completed" for i in output_of(events))
    # No argument events for built-ins: the item is whole at output_item.done; a shell call's
    # commands come as their own events just before.
    assert not any("arguments" in e["type"] or "input" in e["type"] for e in events)
    shell_events = [(e["type"].rsplit(".", 1)[1], e["command_index"], e.get("command"),
                     e.get("delta")) for e in events if "shell_call_command" in e["type"]]
    assert shell_events == [("added", 0, "", None), ("delta", 0, None, "ls -a"),
                            ("done", 0, "ls -a", None)]
    done = next(e for e in events if e["type"] == "response.output_item.done")
    assert events[events.index(done) - 1]["type"] == "response.shell_call_command.done"


def test_builtin_calls_with_arguments_that_are_not_json() -> None:
    calls = [("c1", "shell", "ls -la"), ("c2", "tool_search", "agents"),
             ("c3", "local_shell", '{"command": "pwd"}')]
    _, events = transcode(tool_call_chunks(calls))
    shell, search, local = output_of(events)
    assert shell["action"]["commands"] == ["ls -la"]
    assert search["arguments"] == {"query": "agents"}
    assert local["action"]["command"] == ["pwd"]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert added[0]["action"]["commands"] == [] and added[1]["arguments"] == {}
    assert added[2]["action"]["command"] == []


def test_output_items_round_trip_to_the_same_upstream_calls() -> None:
    calls = [("c1", "multi_agent_v1__spawn_agent", '{"a": 1}'),
             ("c2", "apply_patch", '{"input": "x\\ny"}'),
             ("c3", "shell", '{"commands": ["ls"]}'),
             ("c4", "tool_search", '{"query": "q"}')]
    _, events = transcode(tool_call_chunks(calls))
    messages = chat_messages(output_of(events), ALL_TOOLS)
    back = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in messages[0]["tool_calls"]]
    assert back == [(i, n, json.loads(a)) for i, n, a in calls]


def test_undeclared_call_passes_unless_told_to_fail() -> None:
    _, events = transcode(tool_call_chunks([("c", "made_up", '{"x": 1}')]))
    assert output_of(events) == [{"id": "fc_0", "type": "function_call", "status": "completed",
                                  "call_id": "c", "name": "made_up", "arguments": '{"x": 1}'}]
    with pytest.raises(ToolNotAllowed):
        transcode(tool_call_chunks([("c", "made_up", "{}")]), undeclared_tools="fail")
    with pytest.raises(ToolNotAllowed):  # allowed_tools is enforced whatever the setting
        transcode(tool_call_chunks([("c", "exec_command", "{}")]),
                  allowed_tools={"apply_patch"})


def test_calls_past_the_limit_never_reach_the_client() -> None:
    calls = [("c1", "exec_command", '{"cmd": "a"}'), ("c2", "apply_patch", '{"input": "b"}'),
             ("c3", "shell", '{"commands": []}')]
    tc, events = transcode(tool_call_chunks(calls, interleave=True, split_args=2),
                           max_tool_calls=2)
    assert [i["call_id"] for i in output_of(events)] == ["c1", "c2"]
    assert tc.dropped_calls == 1 and events[-1]["type"] == "response.completed"
    assert not any(e.get("item", {}).get("call_id") == "c3" for e in events)


def test_response_echoes_tools_as_declared() -> None:
    body = {"model": "m", "input": "x", "tools": ALL_TOOLS,
            "tool_choice": {"type": "custom", "name": "apply_patch"}}
    validate_create_body(body)
    response = build_response(body, model="m")
    # Every tool the model could use, as declared; not the hosted one ORP drops (mcp).
    assert [t["type"] for t in response["tools"]] == [
        t["type"] for t in ALL_TOOLS if t["type"] not in ("web_search", "mcp")]
    assert response["tools"][1] == APPLY_PATCH and response["tools"][2] == AGENTS
    assert response["tools"][0]["parameters"] == EXEC["parameters"]
    assert response["tool_choice"] == {"type": "custom", "name": "apply_patch"}


def test_chat_request_has_only_upstream_tools() -> None:
    body = {"model": "m", "input": "x", "tools": ALL_TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False}
    chat = build_chat_request(body, [], model="m", settings=Settings())
    assert len(chat["tools"]) == 8 and chat["tool_choice"] == "required"
    assert chat["parallel_tool_calls"] is False


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "custom", "name": "x", "format": {"type": "grammar", "syntax": "ebnf",
                                                 "definition": "a"}}], None,
     "tools[0].format.syntax"),
    ([{"type": "namespace", "name": "n", "description": "",
       "tools": [{"type": "function", "name": "a"}, {"type": "custom", "name": "a"}]}], None,
     "tools[0].tools[1].name"),
    ([{"type": "namespace", "name": "n", "description": "", "tools": [{"type": "shell"}]}],
     None, "tools[0].tools[0].type"),
    ([{"type": "function", "name": "a", "async": True}], None, "tools[0].async"),
    ([{"type": "function", "name": "a", "allowed_callers": ["programmatic"]}], None,
     "tools[0].allowed_callers"),
    ([{"type": "shell"}, {"type": "shell"}], None, "tools[1].type"),
    ([{"type": "web_search", "depth": [[[[1]]]] * 1}], None, None),
    ([], "required", "tool_choice"),
    (None, "required", "tool_choice"),
    ([EXEC], {"type": "custom", "name": "exec_command"}, "tool_choice.name"),
    ([EXEC], {"type": "apply_patch"}, "tool_choice.type"),
    ([EXEC], {"type": "web_search"}, "tool_choice.type"),
])
def test_tool_validation(tools: Any, choice: Any, param: str | None) -> None:
    body: dict[str, Any] = {"model": "m", "input": "x"}
    if tools is not None:
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    if param is None:
        validate_create_body(body)  # hosted tools' settings are not read, only bounded
        return
    with pytest.raises(ApiError) as info:
        validate_create_body(body)
    assert info.value.status == 400 and info.value.param == param


def test_codex_request_tools_validate() -> None:
    validate_create_body({"model": "m", "input": "x", "tools": ALL_TOOLS, "tool_choice": "auto",
                          "parallel_tool_calls": True})


# -- through a running ORP --------------------------------------------------------------------


async def test_dropped_hosted_tools_are_named_in_a_header(proxy: Proxy, mock: MockUpstream
                                                          ) -> None:
    mock.enqueue(Scenario(chunks=text_chunks(["ok"])), Scenario(chunks=text_chunks(["ok"])))
    body = {"model": "m", "input": "x", "tools": ALL_TOOLS}
    status, headers, data = await proxy.post(body)
    assert status == 200 and headers["X-ORP-Dropped-Tools"] == "web_search, mcp:crm"
    # The echo does not claim the dropped tools were there.
    assert {t["type"] for t in json.loads(data)["tools"]}.isdisjoint({"web_search", "mcp"})
    status, headers, _ = await proxy.post({**body, "stream": True})
    assert status == 200 and headers["X-ORP-Dropped-Tools"] == "web_search, mcp:crm"
    sent = [t["function"]["name"] for t in mock.requests[0].body["tools"]]
    assert "web_search" not in sent and len(sent) == 8
    status, headers, _ = await proxy.post({"model": "m", "input": "x", "tools": [EXEC]})
    assert "X-ORP-Dropped-Tools" not in headers


async def test_hosted_tools_refused_when_configured(start_proxy: Any, settings: Settings
                                                    ) -> None:
    import dataclasses

    proxy = await start_proxy(dataclasses.replace(settings, hosted_tools="refuse"))
    status, _, data = await proxy.post({"model": "m", "input": "x", "tools": ALL_TOOLS})
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == "tools[4].type"
    assert error["code"] == "unsupported_tool"


async def test_required_with_only_dropped_tools_is_refused(proxy: Proxy) -> None:
    status, headers, data = await proxy.post({"model": "m", "input": "x",
                                              "tools": [{"type": "web_search"}],
                                              "tool_choice": "required"})
    assert status == 400 and json.loads(data)["error"]["param"] == "tool_choice"
    assert headers["X-ORP-Dropped-Tools"] == "web_search"


async def test_openai_sdk_reads_a_custom_tool_call(proxy: Proxy, mock: MockUpstream) -> None:
    import openai

    value = "*** Begin Patch\n*** End Patch\n"
    mock.enqueue(Scenario(chunks=tool_call_chunks(
        [("call_1", "apply_patch", json.dumps({"input": value}))], split_args=3)))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    async with client.responses.stream(model="m", input="x",
                                       tools=[APPLY_PATCH]) as stream:  # type: ignore[list-item]
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.custom_tool_call_input.delta" in kinds
    (call,) = final.output
    assert isinstance(call, ResponseCustomToolCall)
    assert (call.name, call.input, call.call_id) == ("apply_patch", value, "call_1")


# -- the mock upstream calls what the request declares -----------------------------------------


async def test_mock_calls_the_declared_tool_the_prompt_names(proxy: Proxy, mock: MockUpstream
                                                            ) -> None:
    tools = [{"type": "function", "name": "get_weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
             EXEC, APPLY_PATCH, AGENTS]

    async def first_item(prompt: str) -> dict[str, Any]:
        status, _, data = await proxy.post({"model": "mock-tools", "input": prompt,
                                            "tools": tools})
        assert status == 200, data
        output: list[dict[str, Any]] = json.loads(data)["output"]
        return output[0]

    # Named in the text: arguments made up from the schema's required properties.
    item = await first_item("please use exec_command now")
    assert (item["name"], json.loads(item["arguments"])) == ("exec_command",
                                                             {"cmd": "echo hello"})
    # A directive with arguments; a namespace member by its own name; a custom tool.
    item = await first_item('CALL spawn_agent {"task": "x"}')
    assert (item["namespace"], item["name"], item["arguments"]) == (
        "multi_agent_v1", "spawn_agent", '{"task": "x"}')
    item = await first_item('CALL apply_patch {"input": "a\\nb"}')
    assert (item["type"], item["input"]) == ("custom_tool_call", "a\nb")
    # Nothing named: the first tool, with the mock's historical arguments.
    item = await first_item("hello")
    assert (item["name"], item["arguments"]) == ("get_weather", '{"city": "Paris"}')
    # After the tool's result, an answer quoting it.
    status, _, data = await proxy.post({"model": "mock-tools", "tools": tools, "input": [
        {"role": "user", "content": "go"}, item,
        {"type": "function_call_output", "call_id": item["call_id"], "output": "sunny"}]})
    assert status == 200, data
    assert json.loads(data)["output"][0]["content"][0]["text"] == "The tool returned: sunny"
