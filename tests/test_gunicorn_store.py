"""The real app under gunicorn: several aiohttp workers, one SQLite file, conversations chained
as fast as a client can go, consecutive turns answered by different worker processes.

Which worker serves a request is read from the access log, which records the worker's PID next
to our `X-Request-Id`. The single chain alternates between keep-alive connections pinned to
different workers, so every turn reads a lineage the other process wrote; the concurrent chains
open a fresh connection per request (`Connection: close`) and let the kernel spread them. The
mock upstream (a separate process) reports `usage.prompt_tokens` = the number of words it
received, so every turn's usage proves the whole lineage was replayed.

Longer runs: ORP_TEST_CHAIN_TURNS (turns per chain, default 50), ORP_TEST_CHAINS (concurrent
chains, default 4), ORP_TEST_WORKERS (gunicorn workers, default 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import procs

TURNS = int(os.environ.get("ORP_TEST_CHAIN_TURNS", "50"))
CONCURRENT = int(os.environ.get("ORP_TEST_CHAINS", "4"))
WORKERS = int(os.environ.get("ORP_TEST_WORKERS", "2"))
# Both chain tests together take a few seconds; this bound only stops a hang.
CHAIN_TIMEOUT = 180.0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system")


CHAIN_NAMES = ["solo", *(f"c{i}" for i in range(CONCURRENT))]


def _key(name: str) -> str:
    """Each chain has its own gateway key, so each is its own owner in the store."""
    return f"sk-orp-test-{name}-0123456789abcdef"


@dataclass
class Gunicorn:
    url: str
    db_path: str
    log: Path
    worker_pids: set[int]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def served_by(self, method: str = "POST") -> dict[str, int]:
        """X-Request-Id → PID of the worker that answered it (from the access log)."""
        found = re.finditer(rf"^ACCESS pid=<?(\d+)>? rid=(\S+) \"{method} /v1/responses",
                            self.output(), re.MULTILINE)
        return {m.group(2): int(m.group(1)) for m in found}


def _control_socket_flag() -> list[str]:
    help_text = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    return ["--no-control-socket"] if "--no-control-socket" in help_text else []


@contextlib.contextmanager
def _gunicorn_process(home: Path, upstream_url: str) -> Iterator[Gunicorn]:
    db_path = str(home / "orp.sqlite3")
    log = home / "gunicorn.log"
    arguments = [
        "orp_proxy.app:create_app",
        "-k", "aiohttp.GunicornUVLoopWebWorker", "-w", str(WORKERS), "-b", "127.0.0.1:0",
        "--graceful-timeout", "5", "--timeout", "60", "--keep-alive", "30",
        "--access-logfile", "-",
        # aiohttp's access-log syntax (the worker's own logger, not gunicorn's).
        "--access-logformat", 'ACCESS pid=%P rid=%{X-Request-Id}i "%r" %s',
        *_control_socket_flag(),
    ]
    # Gateway keys, one per chain: each chain is its own owner in the store.
    env = procs.clean_env(home, ORP_UPSTREAM_URL=upstream_url, ORP_DB_PATH=db_path,
                          ORP_STORE_TTL_SECONDS="0", ORP_AUTH_MODE="keys",
                          ORP_API_KEYS=",".join(_key(name) for name in CHAIN_NAMES))
    with procs.gunicorn(home, env, *arguments, stdout=log, grace=10) as process:
        listening = procs.wait_for_line(log, procs.GUNICORN_LISTENING, process)
        booted = procs.wait_for_lines(log, r"Booting worker with pid: (\d+)", process,
                                      count=WORKERS)
        yield Gunicorn(url=listening.group(1), db_path=db_path, log=log,
                       worker_pids={int(m.group(1)) for m in booted})


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """gunicorn in front of an unpaced mock: the store is the bottleneck."""
    home = tmp_path_factory.mktemp("gunicorn")
    with procs.mock_upstream(home) as (upstream, _), \
            _gunicorn_process(home, upstream) as server:
        yield server


@pytest.fixture
def paced_gunicorn(tmp_path: Path) -> Iterator[Gunicorn]:
    """gunicorn in front of a mock that streams one word per 20 ms (time to hang up)."""
    with procs.mock_upstream(tmp_path, "--interval-ms", "20") as (upstream, _), \
            _gunicorn_process(tmp_path, upstream) as server:
        yield server


async def _probe(session: aiohttp.ClientSession, server: Gunicorn, request_id: str) -> None:
    """GET an unknown response: 404 from whichever worker answers, logged with `request_id`."""
    async with session.get(f"{server.url}/v1/responses/resp_probe", headers={
            "Authorization": f"Bearer {_key('solo')}", "X-Request-Id": request_id}) as resp:
        assert resp.status == 404, await resp.text()


async def _ready(server: Gunicorn) -> None:
    """Wait until every worker answers (a worker listens only once its store is open): probe
    on fresh connections until the access log shows each worker's PID."""
    deadline = time.monotonic() + procs.START_TIMEOUT
    probes = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                     ) as session:
        while True:
            probes += 1
            with contextlib.suppress(aiohttp.ClientConnectionError):
                await _probe(session, server, f"probe-{probes}")
            if set(server.served_by("GET").values()) == server.worker_pids:
                return
            assert time.monotonic() < deadline, server.output()
            await asyncio.sleep(0.02)


@dataclass
class Turn:
    request_id: str
    response_id: str
    status: int
    input_tokens: int


def _words(text: str) -> int:
    return len(text.split())


async def _chain(sessions: list[aiohttp.ClientSession], server: Gunicorn, name: str,
                 turns: int) -> list[Turn]:
    """`turns` requests, each continuing from the previous; odd turns stream. Turn n goes
    through `sessions[n % len(sessions)]`."""
    done: list[Turn] = []
    previous: str | None = None
    for turn in range(turns):
        session = sessions[turn % len(sessions)]
        text = f"{name} turn {turn}"
        body: dict[str, Any] = {"model": "mock", "input": text, "stream": turn % 2 == 1}
        if previous is not None:
            body["previous_response_id"] = previous
        request_id = f"{name}-{turn}"
        async with session.post(f"{server.url}/v1/responses", json=body,
                                headers={"X-Request-Id": request_id,
                                         "Authorization": f"Bearer {_key(name)}"}) as resp:
            raw = await resp.read()
            assert resp.status == 200, (request_id, resp.status, raw[:500])
        if body["stream"]:
            final = _terminal_event(raw)
            assert final["type"] == "response.completed", (request_id, final)
            response = final["response"]
        else:
            response = json.loads(raw)
        assert response["status"] == "completed", (request_id, response)
        assert response["output"][0]["content"][0]["text"] == f"You said: {text}"
        assert response["previous_response_id"] == previous
        done.append(Turn(request_id, response["id"], resp.status,
                         response["usage"]["input_tokens"]))
        # Each earlier turn replayed: its input and the mock's echo of it, then this input.
        expected = sum(_words(f"{name} turn {k}") + _words(f"You said: {name} turn {k}")
                       for k in range(turn)) + _words(text)
        assert done[-1].input_tokens == expected, (request_id, done[-1], expected)
        previous = response["id"]
    return done


def _terminal_event(raw: bytes) -> dict[str, Any]:
    blocks = raw.decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], blocks[-3:]
    event: dict[str, Any] = json.loads(blocks[-3].split("\ndata: ", 1)[1])
    return event


def _lineage_length(db_path: str, response_id: str) -> int:
    with closing(sqlite3.connect(db_path)) as db:
        ((length,),) = db.execute(
            "WITH RECURSIVE chain (id, parent) AS ("
            " SELECT id, previous_response_id FROM responses WHERE id = ?"
            " UNION ALL SELECT r.id, r.previous_response_id FROM chain c"
            " JOIN responses r ON r.id = c.parent) SELECT count(*) FROM chain",
            (response_id,)).fetchall()
    return int(length)


async def _run_chains(server: Gunicorn, names: list[str],
                      sessions: list[aiohttp.ClientSession]
                      ) -> tuple[list[list[Turn]], float]:
    started = time.monotonic()
    async with asyncio.timeout(CHAIN_TIMEOUT):
        chains = await asyncio.gather(*(_chain(sessions, server, n, TURNS) for n in names))
    return list(chains), time.monotonic() - started


@contextlib.asynccontextmanager
async def _pinned_sessions(server: Gunicorn) -> AsyncIterator[list[aiohttp.ClientSession]]:
    """One keep-alive connection to each worker, in a session of its own.

    Which worker accepts a connection is the kernel's choice, and for strictly sequential
    requests it may favour one worker for a long time. So: open connections (each session
    holds at most one), probe each, look up the answering PID in the access log, and keep one
    per worker. Alternating between them moves a chain to another worker on every turn.
    """
    opened: list[aiohttp.ClientSession] = []
    pinned: dict[int, aiohttp.ClientSession] = {}
    deadline = time.monotonic() + procs.START_TIMEOUT
    try:
        while set(pinned) != server.worker_pids:
            assert time.monotonic() < deadline, f"connections reached only {sorted(pinned)}"
            batch = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                     for _ in range(4)]
            opened.extend(batch)
            first = len(opened) - len(batch)
            await asyncio.gather(*(_probe(s, server, f"pin-{first + i}")
                                   for i, s in enumerate(batch)))
            wanted = {f"pin-{first + i}" for i in range(len(batch))}
            while not wanted <= server.served_by("GET").keys():
                assert time.monotonic() < deadline, "access log lacks the probes"
                await asyncio.sleep(0.02)
            served = server.served_by("GET")
            for i, session in enumerate(batch):
                pinned.setdefault(served[f"pin-{first + i}"], session)
        yield [pinned[pid] for pid in sorted(pinned)]
    finally:
        for session in opened:
            await session.close()


def _check_server_output(server: Gunicorn) -> None:
    output = server.output()
    assert "database is locked" not in output.lower()
    assert "ORP_UPSTREAM_URL is not set" not in output  # the mock process answered
    assert "Traceback" not in output and "previous_response_not_found" not in output
    posts = re.findall(r'^ACCESS .*"POST [^"]*" (\d{3})$', output, re.MULTILINE)
    assert posts and set(posts) == {"200"}, sorted(set(posts))
    assert not re.search(r'^ACCESS .*" 5\d\d$', output, re.MULTILINE)


async def _check_chains(server: Gunicorn, chains: list[list[Turn]], elapsed: float) -> None:
    # The access log is written right after each answer; give the last lines a moment.
    wanted = {turn.request_id for chain in chains for turn in chain}
    deadline = time.monotonic() + 10
    while not wanted <= server.served_by().keys():
        assert time.monotonic() < deadline, "access log lacks some requests"
        await asyncio.sleep(0.05)
    served = server.served_by()
    _check_server_output(server)
    switches = 0
    for chain in chains:
        assert _lineage_length(server.db_path, chain[-1].response_id) == TURNS
        pids = [served[turn.request_id] for turn in chain]
        assert set(pids) <= server.worker_pids
        switches += sum(a != b for a, b in itertools.pairwise(pids))
    used = {served[rid] for rid in wanted}
    total = len(wanted)
    print(f"\n{len(chains)} chain(s) x {TURNS} turns: {total} requests in {elapsed:.2f} s "
          f"({total / elapsed:.0f} req/s); workers used {sorted(used)}, "
          f"{switches} turn(s) continued on another worker")
    assert len(used) >= 2, f"one worker served everything: {used}"
    # A turn served by the other worker than its parent read a lineage another process wrote.
    assert switches >= 1


async def test_one_chain_across_workers(gunicorn: Gunicorn) -> None:
    """One conversation, each turn on another worker than the one before."""
    await _ready(gunicorn)
    async with _pinned_sessions(gunicorn) as sessions:
        chains, elapsed = await _run_chains(gunicorn, CHAIN_NAMES[:1], sessions)
    await _check_chains(gunicorn, chains, elapsed)
    served = gunicorn.served_by()
    pids = [served[turn.request_id] for turn in chains[0]]
    # Every turn on another worker than its parent (unless a connection was dropped and
    # reopened elsewhere, which the server's 30 s keep-alive makes unlikely).
    assert sum(a != b for a, b in itertools.pairwise(pids)) >= (TURNS - 1) * 3 // 4, pids
    # Whichever worker answers, another key's owner cannot see the chain.
    last = chains[0][-1].response_id
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                     ) as session:
        for _ in range(4):
            for name, status in (("solo", 200), ("c0", 404)):
                async with session.get(f"{gunicorn.url}/v1/responses/{last}", headers={
                        "Authorization": f"Bearer {_key(name)}"}) as resp:
                    assert resp.status == status, (name, await resp.text())


async def test_concurrent_chains(gunicorn: Gunicorn) -> None:
    """Several conversations at once, every request on a fresh connection (`Connection:
    close`), so the kernel spreads them over the workers."""
    await _ready(gunicorn)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        chains, elapsed = await _run_chains(gunicorn, CHAIN_NAMES[1:], [session])
    await _check_chains(gunicorn, chains, elapsed)


async def test_interrupted_stream_is_stored_and_continued_elsewhere(paced_gunicorn: Gunicorn
                                                                    ) -> None:
    """A client hanging up cancels the handler under gunicorn's worker too: the partial answer
    is stored as incomplete, and a follow-up on any worker continues from it."""
    server = paced_gunicorn
    await _ready(server)
    auth = {"Authorization": f"Bearer {_key('solo')}"}
    words = [f"w{i}" for i in range(200)]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{server.url}/v1/responses", headers=auth, json={
            "model": "mock", "input": " ".join(words), "stream": True})
        assert resp.status == 200
        response_id, deltas = None, 0
        while deltas < 3:
            line = (await resp.content.readline()).decode()
            assert line, "stream ended early"
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                response_id = response_id or event.get("response", {}).get("id")
                deltas += event["type"] == "response.output_text.delta"
        resp.close()
    assert response_id is not None

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + 10
        while True:
            async with session.get(f"{server.url}/v1/responses/{response_id}",
                                   headers=auth) as got:
                if got.status == 200:
                    stored = await got.json()
                    break
                assert got.status == 404, await got.text()
            assert time.monotonic() < deadline, "the interrupted response was never stored"
            await asyncio.sleep(0.05)
        assert stored["status"] == "incomplete", stored
        partial = stored["output"][0]["content"][0]["text"]
        full = "You said: " + " ".join(words)
        assert full.startswith(partial) and 0 < len(partial) < len(full) // 2, partial
        # Follow-ups until two workers have answered: at least one of them is not the worker
        # that stored the interrupted response.
        def followers() -> set[int]:
            served = server.served_by()
            return {pid for rid, pid in served.items() if rid.startswith("after-interrupt-")}

        for attempt in range(40):
            async with session.post(f"{server.url}/v1/responses", headers={
                    **auth, "X-Request-Id": f"after-interrupt-{attempt}"}, json={
                    "model": "mock", "input": "go on",
                    "previous_response_id": response_id}) as follow:
                assert follow.status == 200, await follow.text()
                usage = (await follow.json())["usage"]
            assert usage["input_tokens"] == len(words) + _words(partial) + 2
            await asyncio.sleep(0.02)  # the access line is written just after the answer
            if len(followers()) >= 2:
                break
        assert len(followers()) >= 2, followers()
    _check_server_output(server)


async def test_streams_in_flight_at_sigterm_finish_and_are_stored(paced_gunicorn: Gunicorn
                                                                  ) -> None:
    """gunicorn's graceful stop lets an open stream finish, and its save lands before the
    worker closes the database."""
    server = paced_gunicorn
    await _ready(server)
    listening = re.search(r"Listening at: \S+ \((\d+)\)", server.output())
    assert listening is not None
    master = int(listening.group(1))
    words = [f"w{i}" for i in range(60)]
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{server.url}/v1/responses", json={
            "model": "mock", "input": " ".join(words), "stream": True},
            headers={"Authorization": f"Bearer {_key('solo')}"})
        assert resp.status == 200
        await resp.content.readuntil(b"response.output_text.delta")
        os.kill(master, signal.SIGTERM)
        raw = await resp.read()
    final = _terminal_event(raw)
    assert final["type"] == "response.completed", final
    # The workers closed the database cleanly after the last save.
    deadline = time.monotonic() + 15
    while any(str(pid) in server.output() and not re.search(
            rf"Worker exiting \(pid: {pid}\)", server.output()) for pid in server.worker_pids):
        assert time.monotonic() < deadline, server.output()
        await asyncio.sleep(0.1)
    with closing(sqlite3.connect(server.db_path)) as db:
        assert db.execute("SELECT status FROM responses WHERE id = ?",
                          (final["response"]["id"],)).fetchall() == [("completed",)]
    _check_server_output(server)
