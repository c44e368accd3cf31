"""OpenAI Codex CLI (`codex exec`, the real binary) against ORP and the mock upstream.

Codex is pinned in tests/node/package.json and installed by `.ci/run` (`npm ci`). It runs fully
offline: a provider pointing at ORP, no analytics, no plugins, no retries. Each scenario runs over
HTTP (SSE) and over WebSocket (`supports_websockets`, with Codex's `generate: false` warm-up and
`previous_response_id` turns); the WebSocket runs are checked to have really used a socket
(Codex falls back to HTTP silently otherwise).

The mock upstream (`mock-tools`) calls the tool named by a `CALL name {arguments}` line in the
prompt, and answers "The tool returned: ..." once the last message is the tool's result.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from orp_proxy.app import build_app
from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream, Scenario, tool_call_chunks
from tests.conftest import ServerFactory

NODE_DIR = Path(__file__).parent / "node"
CODEX = NODE_DIR / "node_modules" / ".bin" / "codex"
# Client model names → the mock's behaviours. `orp-model` is in the catalog written below.
MODEL_MAP = {"test-model": "mock", "test-tools": "mock-tools", "orp-model": "mock-tools",
             "test-reasoning": "mock-reasoning"}
TIMEOUT_S = 120  # a hang guard only; a run takes well under a second


def codex_binary() -> Path:
    if CODEX.exists():
        return CODEX
    message = f"codex CLI not installed: run `npm ci --prefix {NODE_DIR}` (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model catalog with `orp-model`: Codex's bundled gpt-5.5 entry under another name, so
    Codex sends the tools it sends that model (custom apply_patch, tool_search, web_search)."""
    home = tmp_path_factory.mktemp("codex-catalog-home")
    out = subprocess.run([str(codex_binary()), "debug", "models", "--bundled"],
                         capture_output=True, text=True, check=True, timeout=TIMEOUT_S,
                         env={**os.environ, "CODEX_HOME": str(home)}, stdin=subprocess.DEVNULL)
    models = json.loads(out.stdout)["models"]
    entry = next(m for m in models if m["slug"] == "gpt-5.5")
    entry.update(slug="orp-model", display_name="orp-model")
    path = home / "orp-catalog.json"
    path.write_text(json.dumps({"models": [entry]}))
    return path


class Orp:
    """ORP on a loopback port, remembering which transports its requests used."""

    def __init__(self, url: str, seen: list[str]) -> None:
        self.url = url
        self.seen = seen  # "POST /v1/responses" or "WS /v1/responses" per request


@pytest.fixture
async def orp(aiohttp_server: ServerFactory, mock_url: str, tmp_path: Path) -> Orp:
    settings = Settings(upstream_url=mock_url, db_path=str(tmp_path / "orp.sqlite3"),
                        auth_mode="none", upstream_retries=0, model_map=MODEL_MAP)
    app = build_app(settings)
    seen: list[str] = []

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        seen.append(f"{'WS' if upgrade else request.method} {request.path} {response.status}")

    app.on_response_prepare.append(note)
    server = await aiohttp_server(app, host="127.0.0.1")
    return Orp(str(server.make_url("/v1")), seen)


RunCodex = Callable[..., Awaitable[tuple[int, list[dict[str, Any]], str]]]


@pytest.fixture
def run_codex(orp: Orp, tmp_path: Path) -> RunCodex:
    async def run(prompt: str, *, ws: bool, model: str = "test-model",
                  cwd: Path | None = None, extra: tuple[str, ...] = ()
                  ) -> tuple[int, list[dict[str, Any]], str]:
        home = tmp_path / "codex-home"
        home.mkdir(exist_ok=True)
        provider = (f'{{name="ORP",base_url="{orp.url}",wire_api="responses",'
                    f'env_key="ORP_TEST_KEY",supports_websockets={str(ws).lower()},'
                    'request_max_retries=0,stream_max_retries=0,stream_idle_timeout_ms=60000}')
        args = [str(codex_binary()), "exec", "--json", "--skip-git-repo-check", "--ephemeral",
                "--disable", "unbounded_connection_retries", "-s", "danger-full-access",
                "-c", "model_provider=orp", "-c", f"model={model}",
                "-c", f"model_providers.orp={provider}",
                "-c", "analytics.enabled=false", "-c", "features.plugins=false",
                *extra, prompt]
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(cwd or tmp_path),
            env={**os.environ, "CODEX_HOME": str(home), "ORP_TEST_KEY": "sk-codex"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        return proc.returncode or 0, events, err.decode(errors="replace")

    return run


def items(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["item"] for e in events
            if e["type"] == "item.completed" and e["item"]["type"] == kind]


def check_transport(orp: Orp, ws: bool) -> None:
    """Every turn went over the transport under test (Codex silently falls back to HTTP)."""
    posts = [s for s in orp.seen if s.startswith("POST /v1/responses")]
    sockets = [s for s in orp.seen if s.startswith("WS /v1/responses")]
    if ws:
        assert sockets and not posts, orp.seen
        assert all(s.endswith(" 101") for s in sockets), orp.seen
    else:
        assert posts and not sockets, orp.seen
        assert all(s.endswith(" 200") for s in posts), orp.seen


TRANSPORTS = [pytest.param(False, id="http"), pytest.param(True, id="websocket")]


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_plain_answer(run_codex: RunCodex, orp: Orp, mock: MockUpstream, ws: bool
                            ) -> None:
    rc, events, err = await run_codex("say hi", ws=ws)
    assert rc == 0, (events, err)
    assert [m["text"] for m in items(events, "agent_message")] == ["You said: say hi"]
    assert events[-1]["type"] == "turn.completed"
    assert events[-1]["usage"]["output_tokens"] > 0
    check_transport(orp, ws)
    # Codex's request as the upstream got it: its multi_agent_v1 namespace flattened, its
    # web_search (hosted) left out, its developer messages as system messages.
    (chat,) = [r.body for r in mock.requests]
    names = {t["function"]["name"] for t in chat["tools"]}
    assert {"exec_command", "multi_agent_v1__spawn_agent"} <= names
    assert not any("web_search" in n for n in names)
    assert chat["messages"][0]["role"] == "system"


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_shell_round_trip(run_codex: RunCodex, orp: Orp, mock: MockUpstream, ws: bool
                                ) -> None:
    """The model calls exec_command; Codex runs it, sends the output back, gets the answer."""
    prompt = 'Run it. CALL exec_command {"cmd": "echo hello-from-codex"}'
    rc, events, err = await run_codex(prompt, ws=ws, model="test-tools")
    assert rc == 0, (events, err)
    (command,) = items(events, "command_execution")
    assert command["exit_code"] == 0 and command["aggregated_output"] == "hello-from-codex\n"
    (answer,) = items(events, "agent_message")
    assert answer["text"].startswith("The tool returned:")
    assert "hello-from-codex" in answer["text"]
    check_transport(orp, ws)
    _first, second = (r.body for r in mock.requests)
    call = second["messages"][-2]["tool_calls"][0]
    assert call["function"] == {"name": "exec_command",
                                "arguments": '{"cmd": "echo hello-from-codex"}'}
    assert second["messages"][-1]["role"] == "tool"
    assert second["messages"][-1]["tool_call_id"] == call["id"]
    assert "hello-from-codex" in second["messages"][-1]["content"]


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_reasoning_shown_and_carried_back(run_codex: RunCodex, orp: Orp,
                                                mock: MockUpstream, ws: bool) -> None:
    """A thinking model with tools: Codex shows each turn's reasoning, and the first turn's
    reasoning reaches the upstream again on the tool turn (over HTTP Codex resends it sealed,
    `store: false` with `include: ["reasoning.encrypted_content"]`; over WebSocket the
    connection remembers it)."""
    prompt = 'Run it. CALL exec_command {"cmd": "echo thought-through"}'
    rc, events, err = await run_codex(prompt, ws=ws, model="test-reasoning")
    assert rc == 0, (events, err)
    first_thought = "I recall 0 earlier thoughts. I need the tool exec_command first."
    assert [r["text"] for r in items(events, "reasoning")] == [
        first_thought, "I recall 1 earlier thoughts. The tool answered; I can reply now."]
    (command,) = items(events, "command_execution")
    assert command["aggregated_output"] == "thought-through\n"
    assert events[-1]["usage"]["reasoning_output_tokens"] > 0
    check_transport(orp, ws)
    _first, second = (r.body for r in mock.requests)
    (assistant,) = [m for m in second["messages"] if m["role"] == "assistant"]
    assert assistant["reasoning_content"] == assistant["reasoning"] == first_thought
    assert assistant["tool_calls"][0]["function"]["name"] == "exec_command"


PATCH = ("*** Begin Patch\n*** Update File: notes.txt\n@@\n-old line\n+new line\n"
         "*** End Patch\n")


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_catalog_model_apply_patch(run_codex: RunCodex, orp: Orp, mock: MockUpstream,
                                         catalog: Path, tmp_path: Path, ws: bool) -> None:
    """A catalog model: Codex declares apply_patch as a custom tool (lark grammar) and
    tool_search; the model's apply_patch call reaches Codex as a custom_tool_call and Codex
    edits the file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("old line\n")
    prompt = "Edit notes.txt. CALL apply_patch " + json.dumps({"input": PATCH})
    rc, events, err = await run_codex(prompt, ws=ws, model="orp-model", cwd=work,
                                      extra=("-c", f'model_catalog_json="{catalog}"'))
    assert rc == 0, (events, err)
    assert (work / "notes.txt").read_text() == "new line\n"
    (change,) = items(events, "file_change")
    assert [c["kind"] for c in change["changes"]] == ["update"]
    (answer,) = items(events, "agent_message")
    assert answer["text"].startswith("The tool returned:")
    check_transport(orp, ws)
    first, second = (r.body for r in mock.requests)
    functions = {t["function"]["name"]: t["function"] for t in first["tools"]}
    apply_patch = functions["apply_patch"]
    assert apply_patch["parameters"]["required"] == ["input"]
    assert "begin_patch" in apply_patch["description"]  # the lark grammar, for the model
    assert functions["tool_search"]["parameters"]["required"] == ["query"]
    assert not any("web_search" in n for n in functions)
    # Codex sent the call back as a custom_tool_call with its output: a tool round trip again.
    call = second["messages"][-2]["tool_calls"][0]
    assert call["function"]["name"] == "apply_patch"
    assert json.loads(call["function"]["arguments"]) == {"input": PATCH}
    assert second["messages"][-1]["tool_call_id"] == call["id"]


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_catalog_model_tool_search_loads_a_namespace(
        run_codex: RunCodex, orp: Orp, mock: MockUpstream, catalog: Path, ws: bool) -> None:
    """The model calls tool_search (client-executed); Codex searches its deferred tools and
    answers with a tool_search_output holding its multi_agent_v1 namespace, whose members the
    next upstream request declares (flattened)."""
    prompt = 'Find tools. CALL tool_search {"query": "spawn agent"}'
    rc, events, err = await run_codex(prompt, ws=ws, model="orp-model",
                                      extra=("-c", f'model_catalog_json="{catalog}"'))
    assert rc == 0, (events, err)
    (answer,) = items(events, "agent_message")
    assert answer["text"].startswith("The tool returned: Tools now available:")
    check_transport(orp, ws)
    first, second = (r.body for r in mock.requests)
    before = {t["function"]["name"] for t in first["tools"]}
    after = {t["function"]["name"] for t in second["tools"]}
    assert "multi_agent_v1__spawn_agent" not in before  # deferred until searched
    assert "multi_agent_v1__spawn_agent" in after
    call = second["messages"][-2]["tool_calls"][0]
    assert call["function"]["name"] == "tool_search"
    assert json.loads(call["function"]["arguments"])["query"] == "spawn agent"
    assert "multi_agent_v1.spawn_agent" in second["messages"][-1]["content"]


@pytest.mark.parametrize("ws", TRANSPORTS)
async def test_call_to_an_undeclared_tool_reaches_codex(run_codex: RunCodex, orp: Orp,
                                                        mock: MockUpstream, ws: bool) -> None:
    """A hallucinated tool name passes through (ORP_UNDECLARED_TOOLS=pass): Codex answers it
    as an unsupported call and the conversation goes on, as against OpenAI."""
    mock.enqueue(Scenario(chunks=tool_call_chunks([("call_x", "made_up_tool", "{}")])))
    rc, events, err = await run_codex("go", ws=ws, model="test-tools")
    assert rc == 0, (events, err)
    (answer,) = items(events, "agent_message")
    assert answer["text"].startswith("The tool returned:")
    check_transport(orp, ws)
    _first, second = (r.body for r in mock.requests)
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "made_up_tool"
    reply = second["messages"][-1]
    assert reply["role"] == "tool" and reply["tool_call_id"] == "call_x"
    assert "made_up_tool" in reply["content"]
