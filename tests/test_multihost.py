"""Several hosts on one PostgreSQL store: two gunicorn masters (two aiohttp workers each, on
ports of their own, as two VMs behind a load balancer) sharing one database.

Conversations alternate hosts turn by turn with `previous_response_id`; the stored-response
endpoints answer from the other host; branches and owners hold across hosts. Then the database
is restarted (`pg_ctl stop -m fast`, `start`) in the middle of a load of chained conversations
on both hosts: every response a client saw completed is readable afterwards and its chain
replays whole, what failed during the outage failed with 503 `store_unavailable`, and both
hosts serve again within seconds, without being restarted.

The mock upstream (a process of its own) reports `usage.input_tokens` = the number of words it
received, so a turn's usage proves the whole lineage was replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import procs
from tests import pg

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system")

KEYS = {"alice": "sk-orp-multihost-alice-0123456789", "bob": "sk-orp-multihost-bob-0123456789"}
WORKERS = 2


@dataclass
class Host:
    url: str
    log: Path
    master: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Hosts:
    hosts: list[Host]
    cluster: pg.Cluster
    database: str


@contextlib.contextmanager
def _host(home: Path, name: str, upstream: str, store_url: str) -> Iterator[Host]:
    directory = home / name
    directory.mkdir()
    log = directory / "gunicorn.log"
    env = procs.clean_env(directory, ORP_UPSTREAM_URL=upstream, ORP_STORE_URL=store_url,
                          ORP_STORE_TTL_SECONDS="0", ORP_AUTH_MODE="keys",
                          ORP_API_KEYS=",".join(KEYS.values()), ORP_UPSTREAM_PROBE_INTERVAL="0",
                          ORP_STORE_CONNECT_TIMEOUT="2")
    arguments = ["orp_proxy.app:create_app", "-k", "aiohttp.GunicornUVLoopWebWorker",
                 "-w", str(WORKERS), "-b", "127.0.0.1:0", "--graceful-timeout", "5",
                 "--timeout", "60", "--no-control-socket"]
    with procs.gunicorn(directory, env, *arguments, stdout=log, grace=10) as process:
        listening = procs.wait_for_line(log, procs.GUNICORN_LISTENING, process)
        procs.wait_for_lines(log, r"Booting worker with pid: (\d+)", process, count=WORKERS)
        yield Host(listening.group(1), log, process.pid)


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg.Cluster]:
    """A server of this module's own: the fault test stops and starts it."""
    with pg.running_cluster(pg.require_postgres()) as started:
        yield started


@pytest.fixture
def hosts(cluster: pg.Cluster, tmp_path: Path) -> Iterator[Hosts]:
    database = cluster.create_database()
    url = cluster.url(database)
    with procs.mock_upstream(tmp_path) as (upstream, _), \
            _host(tmp_path, "host-a", upstream, url) as one, \
            _host(tmp_path, "host-b", upstream, url) as two:
        yield Hosts([one, two], cluster, database)
        for host in (one, two):
            output = host.output()
            assert "Traceback" not in output, output[-3000:]
    cluster.drop_database(database)


async def _ready(session: aiohttp.ClientSession, host: Host) -> None:
    """Until the host answers (each worker listens only once its store is open)."""
    deadline = time.monotonic() + procs.START_TIMEOUT
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{host.url}/readyz") as resp:
                if resp.status == 200:
                    return
        assert time.monotonic() < deadline, host.output()[-3000:]
        await asyncio.sleep(0.05)


def _auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[owner]}"}


def _words(text: str) -> int:
    return len(text.split())


async def _create(session: aiohttp.ClientSession, host: Host, owner: str, text: str,
                  previous: str | None = None, *, stream: bool = False,
                  store: bool = True) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"model": "mock", "input": text, "stream": stream, "store": store}
    if previous is not None:
        body["previous_response_id"] = previous
    async with session.post(f"{host.url}/v1/responses", json=body, headers=_auth(owner)) as resp:
        raw = await resp.read()
        status = resp.status
    if status == 200 and stream:
        blocks = [b for b in raw.decode().split("\n\n") if b.startswith("event: ")]
        event = json.loads(blocks[-1].split("\ndata: ", 1)[1])
        return status, dict(event["response"])
    return status, dict(json.loads(raw))


def _turn_words(texts: list[str]) -> int:
    """Words the mock receives for a turn whose earlier inputs were `texts[:-1]`."""
    return sum(_words(t) + _words(f"You said: {t}") for t in texts[:-1]) + _words(texts[-1])


async def test_conversations_move_between_hosts(hosts: Hosts) -> None:
    one, two = hosts.hosts
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _ready(session, one)
        await _ready(session, two)

        async def conversation(name: str, owner: str, turns: int) -> list[str]:
            ids: list[str] = []
            texts: list[str] = []
            for turn in range(turns):
                host = hosts.hosts[turn % 2]
                texts.append(f"{name} turn {turn}")
                status, response = await _create(session, host, owner, texts[-1],
                                                 ids[-1] if ids else None, stream=turn % 3 == 1)
                assert status == 200, response
                assert response["status"] == "completed", response
                assert response["usage"]["input_tokens"] == _turn_words(texts), (name, turn)
                ids.append(response["id"])
            return ids

        chains = await asyncio.gather(conversation("red", "alice", 12),
                                      conversation("green", "alice", 12),
                                      conversation("blue", "bob", 12))
        red = chains[0]

        # GET and input_items from the host that did not answer the turn, DELETE too.
        for index, response_id in enumerate(red[:4]):
            other = hosts.hosts[(index + 1) % 2]
            async with session.get(f"{other.url}/v1/responses/{response_id}",
                                   headers=_auth("alice")) as resp:
                assert resp.status == 200
                got = await resp.json()
            assert got["id"] == response_id and got["status"] == "completed"
            assert got["output"][0]["content"][0]["text"] == f"You said: red turn {index}"
            async with session.get(f"{other.url}/v1/responses/{response_id}/input_items",
                                   headers=_auth("alice")) as resp:
                assert resp.status == 200
                items = (await resp.json())["data"]
            assert [i["content"][0]["text"] for i in items] == [f"red turn {index}"]
        async with session.delete(f"{two.url}/v1/responses/{red[0]}",
                                  headers=_auth("alice")) as resp:
            assert resp.status == 200
        for host in (one, two):
            async with session.get(f"{host.url}/v1/responses/{red[0]}",
                                   headers=_auth("alice")) as resp:
                assert resp.status == 404

        # Branches from the middle of "green", written on both hosts at once, each continued
        # on the other host: each sees its own lineage only.
        base = [f"green turn {k}" for k in range(6)]
        (s1, left), (s2, right) = await asyncio.gather(
            _create(session, one, "alice", "left", chains[1][5]),
            _create(session, two, "alice", "right", chains[1][5]))
        assert (s1, s2) == (200, 200)
        (s1, left2), (s2, right2) = await asyncio.gather(
            _create(session, two, "alice", "left again", left["id"]),
            _create(session, one, "alice", "right again", right["id"]))
        assert (s1, s2) == (200, 200)
        assert left2["usage"]["input_tokens"] == _turn_words([*base, "left", "left again"])
        assert right2["usage"]["input_tokens"] == _turn_words([*base, "right", "right again"])

        # Owners hold across hosts: bob sees nothing of alice's, on either host.
        for host in (one, two):
            async with session.get(f"{host.url}/v1/responses/{chains[1][-1]}",
                                   headers=_auth("bob")) as resp:
                assert resp.status == 404
            status, body = await _create(session, host, "bob", "x", chains[1][-1])
            assert status == 400 and body["error"]["code"] == "previous_response_not_found"
            async with session.delete(f"{host.url}/v1/responses/{chains[1][-1]}",
                                      headers=_auth("bob")) as resp:
                assert resp.status == 404
        # And the whole of blue replays on either host.
        for host in (one, two):
            status, last = await _create(session, host, "bob", "end", chains[2][-1],
                                         store=False)
            assert status == 200
            assert last["usage"]["input_tokens"] == _turn_words(
                [*(f"blue turn {k}" for k in range(12)), "end"])


@dataclass
class Chain:
    name: str
    texts: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


async def test_database_restart_under_load(hosts: Hosts) -> None:
    one, two = hosts.hosts
    cluster = hosts.cluster
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _ready(session, one)
        await _ready(session, two)
        phase = {"name": "before"}
        back_at: dict[str, float] = {}
        first_ok_after: dict[int, float] = {}
        unexpected: list[Any] = []

        async def drive(chain: Chain, start: int) -> None:
            turn = 0
            while phase["name"] != "done":
                host_index = (start + turn) % 2
                host = hosts.hosts[host_index]
                text = f"{chain.name} turn {len(chain.ids)}"
                try:
                    status, body = await _create(session, host, "alice", text,
                                                 chain.ids[-1] if chain.ids else None,
                                                 stream=turn % 2 == 1)
                except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                    unexpected.append((chain.name, repr(exc)))
                    return
                turn += 1
                if status == 200 and body["status"] == "completed":
                    chain.texts.append(text)
                    chain.ids.append(body["id"])
                    if "up" in back_at:
                        first_ok_after.setdefault(host_index, time.monotonic())
                    continue
                code = (body.get("error") or {}).get("code")
                if (status == 503 and code == "store_unavailable") or (
                        status == 200 and body["status"] == "failed" and code ==
                        "store_unavailable"):
                    chain.failures.append((status, phase["name"]))
                    await asyncio.sleep(0.05)
                    continue
                unexpected.append((chain.name, status, body))
                return

        chains = [Chain(f"c{i}") for i in range(6)]
        tasks = [asyncio.create_task(drive(chain, i)) for i, chain in enumerate(chains)]
        await asyncio.sleep(1.5)
        phase["name"] = "outage"
        await asyncio.to_thread(cluster.stop, "fast")
        await asyncio.sleep(2.0)
        readiness = []
        for host in (one, two):
            async with session.get(f"{host.url}/readyz") as resp:
                readiness.append(resp.status)
        await asyncio.to_thread(cluster.start)
        back_at["up"] = time.monotonic()
        phase["name"] = "after"
        deadline = time.monotonic() + 20
        while len(first_ok_after) < 2 or any(len(c.ids) < 3 for c in chains):
            assert time.monotonic() < deadline, (first_ok_after, [len(c.ids) for c in chains])
            assert not unexpected, unexpected
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a while longer on the recovered database
        phase["name"] = "done"
        await asyncio.gather(*tasks)

        assert not unexpected, unexpected
        assert readiness == [503, 503]
        outage_failures = sum(1 for c in chains for _, when in c.failures if when == "outage")
        assert outage_failures > 0, "the outage was never noticed"
        # Both hosts answered again within seconds of the database returning, unrestarted.
        recovery = {i: round(t - back_at["up"], 2) for i, t in first_ok_after.items()}
        assert max(recovery.values()) < 10, recovery
        for host in (one, two):
            async with session.get(f"{host.url}/readyz") as resp:
                assert resp.status == 200

        # Every response a client saw completed is there, from either host; each chain replays
        # whole.
        for chain in chains:
            for index, response_id in enumerate(chain.ids):
                host = hosts.hosts[index % 2]
                async with session.get(f"{host.url}/v1/responses/{response_id}",
                                       headers=_auth("alice")) as resp:
                    assert resp.status == 200, (chain.name, index)
                    assert (await resp.json())["status"] == "completed"
            status, last = await _create(session, one, "alice", "end", chain.ids[-1],
                                         store=False)
            assert status == 200
            assert last["usage"]["input_tokens"] == _turn_words([*chain.texts, "end"])
        total = sum(len(c.ids) for c in chains)
        failed = sum(len(c.failures) for c in chains)
        print(f"\n{total} turns completed, {failed} refused with store_unavailable; "
              f"hosts back {recovery} s after the database")
    for host in (one, two):
        assert not re.search(r"Worker \(pid:\d+\) (exited|was sent)", host.output())
