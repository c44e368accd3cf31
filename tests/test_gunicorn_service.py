"""The production setup for real: gunicorn with the shipped config and two aiohttp workers on a
free loopback port, in front of the mock upstream.

Checked here: `/livez` and `/readyz` on both workers; the drain file turning `/readyz` 503 on
every worker while streams still work; `/metrics` summing the requests of both workers; the
access log (JSON, no secrets, no content); SIGTERM during a long stream, which still ends with
`response.completed` and `[DONE]` before gunicorn exits 0; a client that disconnects mid-stream
closing the upstream request within 100 ms (handler cancellation under gunicorn's own runner).

(SIGTERM also makes `/readyz` answer 503, but gunicorn closes the listening socket within a
second of it, so that window is checked in test_health_metrics_logs.py, and here only that the
hook ran in the worker.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from orp_proxy.upstream.mock import MockUpstream, Scenario, start_mock_upstream, text_chunks
from scripts import procs
from tests.sse_check import parse_sse

SECRET_CLIENT_KEY = "sk-secret-xyz"
SECRET_UPSTREAM_KEY = "sk-upstream-key-998877"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system")


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path
    home: Path

    def access_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, each of which must be one JSON access record."""
        lines = [json.loads(line) for line in self.stdout.read_text().splitlines() if line]
        assert all(line["type"] == "access" for line in lines)
        return lines

    async def access_line(self, request_id: str) -> dict[str, Any]:
        """The one access record of `request_id`, waiting a moment for it to be written."""
        deadline = time.monotonic() + 5
        while not (found := [x for x in self.access_lines() if x["request_id"] == request_id]):
            assert time.monotonic() < deadline, self.logs()
            await asyncio.sleep(0.05)
        (line,) = found
        return line

    def logs(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    async def wait_ready(self, workers: int = 2) -> None:
        """Until /readyz has answered 200 from `workers` different worker processes."""
        seen: set[int] = set()
        deadline = time.monotonic() + procs.START_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while len(seen) < workers:
                assert self.process.poll() is None, self.logs()
                assert time.monotonic() < deadline, f"ready workers: {seen}\n{self.logs()}"
                with contextlib.suppress(aiohttp.ClientError):
                    status, body = await get(session, self.url + "/readyz")
                    if status == 200:
                        seen.add(body["pid"])
                        continue
                await asyncio.sleep(0.05)


@contextlib.contextmanager
def running_service(home: Path, upstream_url: str, **settings: str) -> Iterator[Service]:
    """gunicorn with the shipped config, 2 workers; stopped (SIGTERM, then SIGKILL) at the end."""
    home.mkdir(parents=True, exist_ok=True)
    metrics_dir = home / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    (metrics_dir / "counter_999999.db").write_bytes(b"stale samples of an earlier run")
    env = procs.clean_env(
        home, ORP_UPSTREAM_URL=upstream_url, ORP_HOST="127.0.0.1", ORP_PORT="0",
        ORP_WORKERS="2", ORP_DB_PATH=str(home / "orp.sqlite3"), ORP_AUTH_MODE="none",
        ORP_UPSTREAM_RETRIES="0", ORP_GRACEFUL_TIMEOUT="30", ORP_UPSTREAM_PROBE_INTERVAL="0.5",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **settings)
    stdout, stderr = home / "stdout.log", home / "stderr.log"
    with procs.gunicorn(home, env, *procs.GUNICORN_CONF, stdout=stdout,
                        stderr=stderr) as process:
        listening = procs.wait_for_line(stderr, procs.GUNICORN_LISTENING, process)
        assert not (metrics_dir / "counter_999999.db").exists(), "metrics dir not wiped at start"
        yield Service(process, listening.group(1), stdout, stderr, home)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    # A fresh connection each time, so that requests spread over both workers.
    async with session.get(url, headers={"Connection": "close"}) as resp:
        return resp.status, await resp.json()


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.post(url + "/v1/responses", json=body,
                            headers={"Connection": "close", **(headers or {})}) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with session.get(url + "/metrics", headers={"Connection": "close"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, json.dumps(s.labels, sort_keys=True)): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    return samples.get((name, json.dumps(labels, sort_keys=True)), 0.0)


@pytest.fixture(scope="module")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`scripts/mock_upstream.py` as its own process, pacing default streams at 20 ms (a
    `bench*` model answers 100 tokens: two seconds)."""
    home = tmp_path_factory.mktemp("mock")
    with procs.mock_upstream(home, "--interval-ms", "20", "--bench-tokens", "100") as (url, _):
        yield url


@pytest.fixture(scope="module")
def service(mock_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("gunicorn")
    with running_service(home, mock_upstream, ORP_UPSTREAM_API_KEY=SECRET_UPSTREAM_KEY,
                         ORP_DRAIN_FILE=str(home / "drain")) as started:
        yield started


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_livez_and_readyz_on_both_workers(service: Service,
                                                session: aiohttp.ClientSession) -> None:
    await service.wait_ready()
    status, body = await get(session, service.url + "/livez")
    assert status == 200 and body["status"] == "alive"
    status, body = await get(session, service.url + "/readyz")
    assert status == 200 and body["status"] == "ready" and body["store"]["writable"] is True
    assert body["upstream"]["state"] == "ok"


async def test_metrics_sum_the_requests_of_both_workers(service: Service,
                                                        session: aiohttp.ClientSession) -> None:
    await service.wait_ready()
    before = await scrape(session, service.url)
    served: dict[str, int] = {}
    input_tokens = output_tokens = 0
    for n in range(200):
        rid = f"metrics-{n}"
        status, _, raw = await post(session, service.url, {"model": "mock", "input": f"n {n}"},
                                    {"X-Request-Id": rid})
        assert status == 200, raw
        usage = json.loads(raw)["usage"]
        input_tokens += usage["input_tokens"]
        output_tokens += usage["output_tokens"]
        pids = {line["request_id"]: line["pid"] for line in service.access_lines()}
        served = {r: pids[r] for r in pids if r.startswith("metrics-")}
        if n >= 5 and len(set(served.values())) == 2:
            break
    assert len(set(served.values())) == 2, "every request went to the same worker"
    count = n + 1

    # Whichever worker answers, the totals are those of both.
    for _ in range(4):
        after = await scrape(session, service.url)
        labels = {"route": "/v1/responses", "status": "200", "stream": "false"}
        assert (value(after, "orp_requests_total", **labels)
                - value(before, "orp_requests_total", **labels)) == count
        assert (value(after, "orp_tokens_total", kind="input")
                - value(before, "orp_tokens_total", kind="input")) == input_tokens
        assert (value(after, "orp_tokens_total", kind="output")
                - value(before, "orp_tokens_total", kind="output")) == output_tokens
        assert value(after, "orp_streams_in_flight") == 0


async def test_access_log_is_json_without_secrets(service: Service,
                                                  session: aiohttp.ClientSession) -> None:
    await service.wait_ready()
    status, headers, raw = await post(
        session, service.url, {"model": "mock", "input": "purple elephant", "stream": True},
        {"Authorization": f"Bearer {SECRET_CLIENT_KEY}", "X-Request-Id": "rid-gunicorn-1"})
    assert status == 200 and headers["X-Request-Id"] == "rid-gunicorn-1"
    assert parse_sse(raw)[1]
    line = await service.access_line("rid-gunicorn-1")
    assert (line["status"], line["stream"], line["model"], line["outcome"]) == (
        200, True, "mock", "completed")
    assert line["input_tokens"] > 0 and line["output_tokens"] > 0 and line["ttft_ms"] >= 0
    logs = service.logs()
    assert "rid-gunicorn-1" in logs
    for secret in (SECRET_CLIENT_KEY, SECRET_UPSTREAM_KEY, "purple", "elephant"):
        assert secret not in logs


async def test_drain_file_turns_every_worker_unready(service: Service,
                                                     session: aiohttp.ClientSession) -> None:
    await service.wait_ready()
    drain = service.home / "drain"
    drain.touch()
    try:
        draining: set[int] = set()
        deadline = time.monotonic() + 15
        while len(draining) < 2:
            assert time.monotonic() < deadline, f"draining workers: {draining}"
            status, body = await get(session, service.url + "/readyz")
            if status == 503:
                assert body["status"] == "draining" and body["reason"] == "drain_file"
                draining.add(body["pid"])
            await asyncio.sleep(0.02)
        # Still serving: a stream started while draining runs to its end.
        status, _, raw = await post(session, service.url,
                                    {"model": "mock", "input": "while draining", "stream": True})
        events, done = parse_sse(raw)
        assert status == 200 and done and events[-1]["type"] == "response.completed"
    finally:
        drain.unlink()
    await service.wait_ready()


async def test_sigterm_lets_a_long_stream_finish(mock_upstream: str, tmp_path: Path,
                                                 session: aiohttp.ClientSession) -> None:
    with running_service(tmp_path / "sigterm", mock_upstream) as service:
        await service.wait_ready()
        body = {"model": "bench-sigterm", "input": "go", "stream": True}
        async with session.post(service.url + "/v1/responses", json=body) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"response.output_text.delta")
            signalled = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            rest = await resp.content.read()
        finished = time.monotonic()
        events, done = parse_sse(first + rest)
        assert done and events[-1]["type"] == "response.completed"
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert len(deltas) == 100
        assert finished - signalled > 1.0  # the stream really went on after SIGTERM
        assert service.process.wait(30) == 0
        logs = service.logs()
        assert "SIGTERM: draining" in logs and "Shutting down: Master" in logs
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(session, service.url + "/livez")


@pytest.fixture
async def local_mock() -> AsyncIterator[tuple[MockUpstream, str]]:
    """A mock in this process, so the test sees when its client connection closes."""
    mock, runner, url = await start_mock_upstream("127.0.0.1", 0)
    try:
        yield mock, url
    finally:
        await runner.cleanup()


async def test_client_disconnect_closes_the_upstream_within_100ms(
        local_mock: tuple[MockUpstream, str], tmp_path: Path,
        session: aiohttp.ClientSession) -> None:
    mock, url = local_mock
    # No keep-alive writes: only handler cancellation can notice the client leaving.
    with running_service(tmp_path / "disconnect", url, ORP_SSE_KEEPALIVE="0") as service:
        await service.wait_ready()
        # One token, then the upstream says nothing until its client goes away.
        mock.enqueue(Scenario(chunks=text_chunks(["one", " two"]), stall_after=2))
        resp = await session.post(service.url + "/v1/responses",
                                  json={"model": "mock", "input": "x", "stream": True},
                                  headers={"X-Request-Id": "rid-leaves"})
        assert resp.status == 200
        await resp.content.readuntil(b"response.output_text.delta")
        left = time.monotonic()
        resp.close()
        seen = await mock.wait_for_disconnect(timeout=5.0)
        assert seen - left < 0.1, f"upstream closed {seen - left:.3f}s after the client left"
        line = await service.access_line("rid-leaves")
        assert line["status"] == 499, line
        assert line["incomplete_reason"] == "client_disconnected", line


# -- configuration mistakes: refused in the master, before any worker -----------------------


def _gunicorn_refuses(home: Path, **settings: str) -> str:
    """gunicorn with the shipped config and `settings` must exit 78 (EX_CONFIG) before it
    listens or forks, with one `orp-proxy:` line and no traceback; returns that line.
    A setting given as "" is left unset."""
    home.mkdir(parents=True, exist_ok=True)
    given = {"ORP_HOST": "127.0.0.1", "ORP_PORT": "0", "ORP_WORKERS": "2",
             "ORP_AUTH_MODE": "none", **settings}
    env = procs.clean_env(home, **{k: v for k, v in given.items() if v})
    done = subprocess.run([sys.executable, "-m", "gunicorn", *procs.GUNICORN_CONF], cwd=home,
                          env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 78, output
    for absent in ("Traceback", "Listening at", "Booting worker", "Worker failed to boot"):
        assert absent not in output, output
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("orp-proxy: ")]
    return line


def test_gunicorn_refuses_bad_settings_before_forking(tmp_path: Path, mock_upstream: str) -> None:
    # No upstream (or a typo in its name): no demo mock in production.
    line = _gunicorn_refuses(tmp_path / "a", ORP_UPSTRAEM_URL=mock_upstream)
    assert "ORP_UPSTREAM_URL is not set" in line
    # The store's directory is missing.
    missing = tmp_path / "missing" / "orp.sqlite3"
    line = _gunicorn_refuses(tmp_path / "b", ORP_UPSTREAM_URL=mock_upstream,
                             ORP_DB_PATH=str(missing))
    assert line == f"orp-proxy: ORP_DB_PATH={missing}: the directory {missing.parent} does " \
        "not exist"
    # No client authentication for a real upstream.
    line = _gunicorn_refuses(tmp_path / "c", ORP_UPSTREAM_URL=mock_upstream, ORP_AUTH_MODE="",
                             ORP_DB_PATH=str(tmp_path / "c.sqlite3"))
    assert "no client authentication is configured" in line
    # A value that does not parse (found when the config module loads, before on_starting).
    line = _gunicorn_refuses(tmp_path / "d", ORP_UPSTREAM_URL=mock_upstream, ORP_PORT="70000")
    assert "ORP_PORT='70000'" in line


def test_gunicorn_text_log_format_and_unknown_variables(tmp_path: Path,
                                                        mock_upstream: str) -> None:
    """ORP_LOG_FORMAT=text: readable access lines on stdout and messages on stderr, the
    settings line as name=value pairs without secrets, a warning for a misspelt variable."""
    async def one_request(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post(session, url, {"model": "m", "input": "hi"},
                                      {"X-Request-Id": "rid-text-1"})
            assert status == 200

    with running_service(tmp_path, mock_upstream, ORP_LOG_FORMAT="text", ORP_LOG_LEVEL="INFO",
                         ORP_OWNER_SECRET="owner-sekrit-123", ORP_WORKER="3") as service:
        asyncio.run(one_request(service.url))
        deadline = time.monotonic() + 5
        while "rid-text-1" not in service.stdout.read_text():
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.05)
    stdout, stderr = service.stdout.read_text(), service.stderr.read_text()
    (access,) = [x for x in stdout.splitlines() if "rid-text-1" in x]
    assert " INFO orp.access: POST /v1/responses 200 request_id=rid-text-1 " in access
    assert not any(x.lstrip().startswith("{") for x in (stdout + stderr).splitlines())
    (settings_line,) = [x for x in stderr.splitlines() if "ORP settings: " in x]
    assert "workers=2" in settings_line and "owner_secret=<redacted>" in settings_line
    assert "owner-sekrit-123" not in stdout + stderr and "{'" not in settings_line
    assert "unknown setting ORP_WORKER is ignored; did you mean ORP_WORKERS?" in stderr
