"""Background responses under real gunicorn with 2 workers sharing one store: a stream resumed
on the other worker, a cancel answered by the other worker, SIGKILL of the worker running a
response, and SIGTERM with responses running.

The mock upstream is its own process, pacing its echo at 20 ms a word, and reports when each
upstream connection was closed (`GET /mock/requests`, on the machine's monotonic clock). Which
worker answers a request is read from the access log (PID next to our `X-Request-Id`); clients
are pinned to a worker by keeping one keep-alive connection each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import openai
import pytest

from scripts import procs
from tests.test_gunicorn_store import Gunicorn, _control_socket_flag

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system")

KEY = "sk-orp-test-background-0123456789abcdef"
LEASE = 2.0
WORDS = [f"w{i}" for i in range(150)]  # 3 s at 20 ms a word


@contextlib.contextmanager
def _server(home: Path, upstream: str, *, workers: int = 2, **env: str) -> Iterator[Gunicorn]:
    db_path = str(home / "orp.sqlite3")
    log = home / "gunicorn.log"
    arguments = [
        "orp_proxy.app:create_app",
        "-k", "aiohttp.GunicornUVLoopWebWorker", "-w", str(workers), "-b", "127.0.0.1:0",
        "--graceful-timeout", env.get("ORP_GRACEFUL_TIMEOUT", "10"), "--timeout", "60",
        "--keep-alive", "30", "--access-logfile", "-",
        "--access-logformat", 'ACCESS pid=%P rid=%{X-Request-Id}i "%r" %s',
        *_control_socket_flag(),
    ]
    settings = {"ORP_UPSTREAM_URL": upstream, "ORP_DB_PATH": db_path,
                "ORP_AUTH_MODE": "keys", "ORP_API_KEYS": KEY,
                "ORP_BACKGROUND_LEASE_SECONDS": str(LEASE), **env}
    with procs.gunicorn(home, procs.clean_env(home, **settings), *arguments, stdout=log,
                        grace=15) as process:
        listening = procs.wait_for_line(log, procs.GUNICORN_LISTENING, process)
        booted = procs.wait_for_lines(log, r"Booting worker with pid: (\d+)", process,
                                      count=workers)
        yield Gunicorn(url=listening.group(1), db_path=db_path, log=log,
                       worker_pids={int(m.group(1)) for m in booted})


@pytest.fixture
def mock_process(tmp_path: Path) -> Iterator[str]:
    with procs.mock_upstream(tmp_path, "--interval-ms", "20") as (upstream, _):
        yield upstream


@pytest.fixture
def server(tmp_path: Path, mock_process: str) -> Iterator[Gunicorn]:
    with _server(tmp_path, mock_process) as running:
        yield running


async def _pinned_clients(server: Gunicorn) -> dict[int, openai.AsyncOpenAI]:
    """An `openai` client per worker, each on one keep-alive connection to that worker."""
    clients: dict[int, openai.AsyncOpenAI] = {}
    deadline = time.monotonic() + procs.START_TIMEOUT
    attempt = 0
    while set(clients) != server.worker_pids:
        assert time.monotonic() < deadline, f"connections reached only {sorted(clients)}"
        attempt += 1
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1,
                                                     max_keepalive_connections=1))
        rid = f"pin-{attempt}"
        with contextlib.suppress(httpx.TransportError):
            got = await http.get(f"{server.url}/v1/responses/resp_probe",
                                 headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": rid})
            assert got.status_code == 404
        pid = None
        for _ in range(100):
            pid = server.served_by("GET").get(rid)
            if pid is not None:
                break
            await asyncio.sleep(0.02)
        if pid is None or pid in clients:
            await http.aclose()
            continue
        clients[pid] = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY,
                                          http_client=http, max_retries=0)
    return clients


@contextlib.asynccontextmanager
async def _clients(server: Gunicorn) -> AsyncIterator[dict[int, openai.AsyncOpenAI]]:
    clients = await _pinned_clients(server)
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.close()


async def _served_by(server: Gunicorn, request_id: str, method: str = "POST") -> int:
    for _ in range(250):
        pid = server.served_by(method).get(request_id)
        if pid is not None:
            return pid
        await asyncio.sleep(0.02)
    raise AssertionError(f"{request_id} not in the access log")


def _run_pid(server: Gunicorn, response_id: str) -> int:
    """The PID of the worker that runs (or ran) a background response, from its lease."""
    with closing(sqlite3.connect(server.db_path)) as db:
        ((worker,),) = db.execute("SELECT worker FROM runs WHERE response_id = ?",
                                  (response_id,)).fetchall()
    return int(worker.split(":")[1])


async def _pg_run_pid(pg_url: str, response_id: str) -> int:
    con = await asyncpg.connect(pg_url)
    try:
        worker = await con.fetchval("SELECT worker FROM runs WHERE response_id = $1",
                                    response_id)
    finally:
        await con.close()
    return int(str(worker).split(":")[1])


async def _mock_requests(upstream: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, \
            session.get(upstream.removesuffix("/v1") + "/mock/requests") as resp:
        found: list[dict[str, Any]] = await resp.json()
        return found


async def _until_in_progress(client: openai.AsyncOpenAI, response_id: str) -> None:
    for _ in range(500):
        if (await client.responses.retrieve(response_id)).status == "in_progress":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{response_id} never became in_progress")


async def _first_events(stream: Any, count: int) -> list[Any]:
    """The first `count` events of an SDK event stream, which is then closed (the client goes
    away; a background response runs on)."""
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if len(seen) == count:
            break
    await stream.close()
    return seen


async def _until_ended_after_kill(client: openai.AsyncOpenAI, response_id: str,
                                  killed: float) -> Any:
    """The response once it is no longer in progress; its worker was killed at `killed`
    (monotonic), so that takes the lease plus one look by a survivor, with slack for a
    loaded machine."""
    while True:
        got = await client.responses.retrieve(response_id)
        if got.status != "in_progress":
            return got
        assert time.monotonic() - killed < 4 * LEASE, got.status
        await asyncio.sleep(0.05)


def _check_output(server: Gunicorn) -> None:
    output = server.output()
    assert "Traceback" not in output and "database is locked" not in output.lower()


async def test_stream_resumed_on_the_other_worker(server: Gunicorn) -> None:
    """create(background, stream), 10 events, drop; retrieve(stream, starting_after) on the
    other worker continues without a gap or a duplicate."""
    async with _clients(server) as clients:
        (first_pid, first), (other_pid, other) = sorted(clients.items())
        stream = await first.responses.create(
            model="mock", input=" ".join(WORDS), background=True, stream=True,
            extra_headers={"X-Request-Id": "bg-create"})
        seen = await _first_events(stream, 10)
        assert _run_pid(server, seen[0].response.id) == first_pid
        cursor = seen[-1].sequence_number
        resumed = await other.responses.retrieve(
            seen[0].response.id, stream=True, starting_after=cursor,
            extra_headers={"X-Request-Id": "bg-resume"})
        rest = [event async for event in resumed]
        assert await _served_by(server, "bg-resume", "GET") == other_pid
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert text == "You said: " + " ".join(WORDS)
    assert rest[-1].response.output_text == text
    _check_output(server)


async def test_poll_until_completed(server: Gunicorn) -> None:
    async with _clients(server) as clients:
        client = next(iter(clients.values()))
        created = await client.responses.create(model="mock", input="poll me",
                                                background=True)
        assert created.status == "queued"
        pollers = list(clients.values())
        for turn in range(1000):
            got = await pollers[turn % 2].responses.retrieve(created.id)
            if got.status not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.02)
    assert got.status == "completed" and got.output_text == "You said: poll me"


async def test_cancel_on_the_other_worker(server: Gunicorn, mock_process: str) -> None:
    """cancel() answered by the worker that does not run the response: cancelled, partial
    output kept, and the upstream connection was closed before the answer."""
    async with _clients(server) as clients:
        (first_pid, first), (other_pid, other) = sorted(clients.items())
        created = await first.responses.create(
            model="mock", input=" ".join(WORDS), background=True,
            extra_headers={"X-Request-Id": "bg-to-cancel"})
        assert _run_pid(server, created.id) == first_pid
        await _until_in_progress(other, created.id)
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        cancelled = await other.responses.cancel(created.id,
                                                 extra_headers={"X-Request-Id": "bg-cancel"})
        answered = time.monotonic()
        assert await _served_by(server, "bg-cancel") == other_pid
        assert cancelled.status == "cancelled"
        partial = cancelled.output_text
        assert partial and ("You said: " + " ".join(WORDS)).startswith(partial)
        assert len(partial) < len("You said: " + " ".join(WORDS))
        upstream = [r for r in await _mock_requests(mock_process)
                    if r["finished_at"] is None]
        assert len(upstream) == 1 and upstream[0]["disconnected_at"] is not None, upstream
        closed = upstream[0]["disconnected_at"]
        assert asked <= closed <= answered
        print(f"\ncancel on the other worker: upstream closed {1000 * (closed - asked):.1f} ms "
              f"after the request; answered after {1000 * (answered - asked):.1f} ms")
        # The resumed stream ends with the terminal event; a second cancel changes nothing.
        events = [e async for e in await first.responses.retrieve(created.id, stream=True)]
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "cancelled"
        again = await first.responses.cancel(created.id)
        assert again.model_dump() == cancelled.model_dump()
    _check_output(server)


async def test_sigkill_of_the_running_worker_fails_the_response(server: Gunicorn) -> None:
    """The worker running a response is killed: the response ends `failed` (`worker_lost`)
    once its lease ran out, never stuck `in_progress`; the stream ends too."""
    async with _clients(server) as clients:
        (first_pid, first), (_, other) = sorted(clients.items())
        created = await first.responses.create(
            model="mock", input=" ".join(WORDS), background=True,
            extra_headers={"X-Request-Id": "bg-to-kill"})
        assert _run_pid(server, created.id) == first_pid
        await _until_in_progress(other, created.id)
        await asyncio.sleep(1.5)  # past the first progress save after in_progress
        events: list[Any] = []
        follower = asyncio.create_task(_read_all(other, created.id, events))
        os.kill(first_pid, signal.SIGKILL)
        killed = time.monotonic()
        got = await _until_ended_after_kill(other, created.id, killed)
        ended = time.monotonic() - killed
        assert got.status == "failed" and got.error is not None
        assert got.error.code == "worker_lost"  # type: ignore[comparison-overlap]
        assert got.output_text  # what was saved before the kill
        # The follower's stream (on the survivor) ended with the `error` event, which the SDK
        # raises, after every event before it, in order.
        with pytest.raises(openai.APIError, match="worker running this background response"):
            await asyncio.wait_for(follower, 10)
        numbers = [e.sequence_number for e in events]
        assert numbers == list(range(len(numbers))) and len(numbers) > 10
        print(f"\nkilled worker's response failed {ended:.2f} s after SIGKILL (lease {LEASE} s)")


async def _read_all(client: openai.AsyncOpenAI, response_id: str, into: list[Any]) -> None:
    async for event in await client.responses.retrieve(response_id, stream=True):
        into.append(event)


async def test_sigterm_lets_short_runs_finish_and_fails_the_rest(tmp_path: Path,
                                                                 mock_process: str) -> None:
    """SIGTERM: a background response that finishes within the graceful timeout completes;
    one that would not is ended `failed` (`server_shutdown`) before the workers exit."""
    with _server(tmp_path, mock_process, ORP_GRACEFUL_TIMEOUT="4") as server:
        async with _clients(server) as clients:
            client = next(iter(clients.values()))
            short = await client.responses.create(model="mock", input=" ".join(WORDS[:40]),
                                                  background=True)
            long = await client.responses.create(model="mock", input=" ".join(WORDS * 10),
                                                 background=True)
            await _until_in_progress(client, long.id)
        listening = re.search(r"Listening at: \S+ \((\d+)\)", server.output())
        assert listening is not None
        os.kill(int(listening.group(1)), signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not all(re.search(rf"Worker exiting \(pid: {pid}\)", server.output())
                      for pid in server.worker_pids):
            assert time.monotonic() < deadline, server.output()[-3000:]
            await asyncio.sleep(0.1)
        with closing(sqlite3.connect(server.db_path)) as db:
            rows = dict(db.execute("SELECT id, status FROM responses").fetchall())
            finished = dict(db.execute("SELECT response_id, finished FROM runs").fetchall())
        assert rows[short.id] == "completed"
        assert rows[long.id] == "failed"
        assert finished == {short.id: 1, long.id: 1}
        _check_output(server)


# -- PostgreSQL: two gunicorn masters (two hosts) sharing one database ------------------------


@pytest.fixture
def two_hosts(tmp_path: Path, mock_process: str, pg_url: str
              ) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    """Two gunicorn masters of one worker each, as two hosts would run them: nothing shared
    but the PostgreSQL database (and the upstream)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with _server(tmp_path / "a", mock_process, workers=1, ORP_STORE_URL=pg_url) as first, \
            _server(tmp_path / "b", mock_process, workers=1, ORP_STORE_URL=pg_url) as second:
        yield first, second


@contextlib.asynccontextmanager
async def _host_clients(hosts: tuple[Gunicorn, Gunicorn]
                        ) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    clients = [openai.AsyncOpenAI(base_url=f"{host.url}/v1", api_key=KEY, max_retries=0)
               for host in hosts]
    try:
        yield clients[0], clients[1]
    finally:
        for client in clients:
            await client.close()


async def test_postgres_resume_on_the_other_host(two_hosts: tuple[Gunicorn, Gunicorn],
                                                 pg_url: str) -> None:
    first_host, _ = two_hosts
    async with _host_clients(two_hosts) as (first, other):
        stream = await first.responses.create(model="mock", input=" ".join(WORDS),
                                              background=True, stream=True)
        seen = await _first_events(stream, 10)
        assert await _pg_run_pid(pg_url, seen[0].response.id) in first_host.worker_pids
        resumed = await other.responses.retrieve(seen[0].response.id, stream=True,
                                                 starting_after=seen[-1].sequence_number)
        rest = [event async for event in resumed]
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert text == "You said: " + " ".join(WORDS) == rest[-1].response.output_text
    for host in two_hosts:
        _check_output(host)


async def test_postgres_cancel_on_the_other_host(two_hosts: tuple[Gunicorn, Gunicorn],
                                                 mock_process: str, pg_url: str) -> None:
    first_host, _ = two_hosts
    async with _host_clients(two_hosts) as (first, other):
        created = await first.responses.create(model="mock", input=" ".join(WORDS),
                                               background=True)
        assert await _pg_run_pid(pg_url, created.id) in first_host.worker_pids
        await _until_in_progress(other, created.id)
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        cancelled = await other.responses.cancel(created.id)
        answered = time.monotonic()
        assert cancelled.status == "cancelled" and cancelled.output_text
        upstream = [r for r in await _mock_requests(mock_process) if r["finished_at"] is None]
        assert len(upstream) == 1 and upstream[0]["disconnected_at"] is not None, upstream
        closed = upstream[0]["disconnected_at"]
        assert asked <= closed <= answered
        print(f"\nPostgreSQL, cancel on the other host: upstream closed "
              f"{1000 * (closed - asked):.1f} ms after the request; answered after "
              f"{1000 * (answered - asked):.1f} ms")
        events = [e async for e in await first.responses.retrieve(created.id, stream=True)]
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "cancelled"
    for host in two_hosts:
        _check_output(host)


async def test_postgres_host_loss_fails_its_responses(two_hosts: tuple[Gunicorn, Gunicorn],
                                                      pg_url: str) -> None:
    """The worker of one host is SIGKILLed: the other host ends its response `failed`."""
    first_host, _ = two_hosts
    async with _host_clients(two_hosts) as (first, other):
        created = await first.responses.create(model="mock", input=" ".join(WORDS),
                                               background=True)
        pid = await _pg_run_pid(pg_url, created.id)
        assert pid in first_host.worker_pids
        await _until_in_progress(other, created.id)
        os.kill(pid, signal.SIGKILL)
        got = await _until_ended_after_kill(other, created.id, time.monotonic())
        assert got.status == "failed" and got.error is not None
        assert got.error.code == "worker_lost"  # type: ignore[comparison-overlap]
