"""ORP_CONFIG under real gunicorn (two workers) in front of three mock upstream processes: a
SIGHUP with a changed file (a replica removed, another added) while streams run, and a SIGHUP
with an invalid file, which changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import procs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system")


def config(urls: dict[str, str], replicas: list[str], routing: str = "") -> str:
    upstreams = "\n".join(f'[upstreams.{name}]\nurl = "{urls[name]}"' for name in replicas)
    deployments = ", ".join(f'{{ upstream = "{name}", model = "bench" }}' for name in replicas)
    return f"""
[settings]
workers = 2
graceful_timeout = 30

[routing]
probe_interval = 0.2
{routing}

{upstreams}

[models.chat]
deployments = [{deployments}]
"""


@contextlib.contextmanager
def mocks(home: Path) -> Iterator[dict[str, str]]:
    """Three mock upstreams whose `bench` answers 60 tokens 10 ms apart (0.6 s streams)."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for name in "abc":
            (home / name).mkdir()
            url, _ = stack.enter_context(procs.mock_upstream(
                home / name, "--interval-ms", "10", "--bench-tokens", "60"))
            urls[name] = url
        yield urls


async def readyz(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/readyz", headers={"Connection": "close"}) as resp:
        body: dict[str, Any] = await resp.json()
        return body


def deployments_seen(body: dict[str, Any]) -> set[str]:
    return {d["deployment"] for d in body["models"]["chat"]["deployments"]}


async def wait_for_deployments(session: aiohttp.ClientSession, url: str, want: set[str],
                               process: Any) -> None:
    """Until several /readyz answers in a row (any worker) show exactly `want`."""
    deadline = time.monotonic() + 30
    streak = 0
    while streak < 6:
        assert process.poll() is None
        assert time.monotonic() < deadline, f"deployments never became {want}"
        with contextlib.suppress(aiohttp.ClientError):
            streak = streak + 1 if deployments_seen(await readyz(session, url)) == want else 0
        await asyncio.sleep(0.05)


async def test_sighup_reloads_the_file_without_failing_a_stream(tmp_path: Path) -> None:
    with mocks(tmp_path) as urls:
        path = tmp_path / "orp.toml"
        path.write_text(config(urls, ["a", "b"]))
        metrics_dir = tmp_path / "metrics"
        metrics_dir.mkdir()
        env = procs.clean_env(tmp_path, ORP_CONFIG=str(path), ORP_HOST="127.0.0.1",
                              ORP_PORT="0", ORP_DB_PATH=str(tmp_path / "orp.sqlite3"),
                              ORP_AUTH_MODE="none", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
        with procs.gunicorn(tmp_path, env, *procs.GUNICORN_CONF, stdout=stdout,
                            stderr=stderr) as master:
            url = procs.wait_for_line(stderr, procs.GUNICORN_LISTENING, master).group(1)
            # A new connection per request: a request on a kept-alive connection to a worker
            # that is stopping can race its close, which is no matter of the configuration.
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                await wait_for_deployments(session, url, {"a/bench", "b/bench"}, master)
                outcomes: list[str] = []
                stop = asyncio.Event()

                async def client() -> None:
                    while not stop.is_set():
                        async with session.post(url + "/v1/responses", json={
                                "model": "chat", "input": "go", "stream": True,
                                "store": False}) as resp:
                            data = await resp.read()
                        if resp.status != 200:
                            outcomes.append(f"HTTP {resp.status}: {data[:200]!r}")
                        elif b"event: response.completed" in data and data.endswith(
                                b"data: [DONE]\n\n"):
                            outcomes.append("ok")
                        else:
                            outcomes.append(f"cut: {data[-200:]!r}")

                clients = [asyncio.create_task(client()) for _ in range(12)]
                await asyncio.sleep(1.5)
                # A replica removed, another added; the streams in flight keep going.
                workers_before = procs.children(master.pid)
                path.write_text(config(urls, ["a", "c"]))
                master.send_signal(signal.SIGHUP)
                await wait_for_deployments(session, url, {"a/bench", "c/bench"}, master)
                await asyncio.sleep(1.5)
                # An invalid file: logged, nothing else changes.
                workers_after = procs.children(master.pid)
                path.write_text(config(urls, ["a", "c"], "retires = 1"))
                master.send_signal(signal.SIGHUP)
                procs.wait_for_line(stderr, r"SIGHUP: .*routing.retires: unknown key.*keeping "
                                    "the running configuration", master)
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*clients)
                assert procs.children(master.pid) == workers_after
                assert set(workers_after).isdisjoint(workers_before)
                failed = [o for o in outcomes if o != "ok"]
                assert not failed, failed[:5]
                assert len(outcomes) > 50, len(outcomes)
                assert deployments_seen(await readyz(session, url)) == {"a/bench", "c/bench"}
                async with session.get(url + "/metrics") as resp:
                    text = await resp.text()
                served = {line.split('deployment="')[1].split('"')[0]: float(line.split()[-1])
                          for line in text.splitlines()
                          if line.startswith("orp_deployment_requests_total{")}
                assert served.get("c/bench", 0) > 0 and served.get("b/bench", 0) > 0, served
                print(f"streams: {len(outcomes)}, all completed; per deployment: "
                      f"{json.dumps(served)}")
