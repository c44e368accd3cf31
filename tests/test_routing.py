"""Model routing over several mock upstreams on loopback (orp_proxy.routing, ORP_CONFIG).

Three mock upstreams: `a` and `b` serve two replicas of the model `chat`, `c` serves `other`.
Checked: routing by model, spreading by load, 404 for unknown models without any upstream
request, failover before the first byte (connect refused, 5xx, 503 "Loading model", 429 with
Retry-After) and never after it, ejection, probing and return, 503 with Retry-After when every
deployment is out, stickiness, per-upstream quirks, /v1/models, /readyz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from orp_proxy.config import load_settings
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks
from scripts import procs
from tests.conftest import Proxy

StartProxy = Callable[..., Awaitable[Proxy]]


class Replica:
    """A mock upstream on a loopback port that can be stopped and started again on the same
    port. The first start takes a port the kernel picks as it binds (a port chosen earlier and
    bound later can be taken meanwhile, e.g. as another test's outgoing connection); `port` may
    also be set by hand for a replica that never starts (its URL only)."""

    def __init__(self, interval_ms: float = 0.0) -> None:
        self.mock = MockUpstream(interval_ms=interval_ms)
        self.port = 0  # none yet: the first start binds one
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self.runner = web.AppRunner(self.mock.app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def replicas() -> AsyncIterator[dict[str, Replica]]:
    made = {name: Replica() for name in "abc"}
    for replica in made.values():
        await replica.start()
    yield made
    for replica in made.values():
        await replica.stop()


def config_text(replicas: dict[str, Replica], routing: str = "", extra: str = "",
                chat: str = '{ upstream = "a", model = "chat-a" },\n'
                            '    { upstream = "b", model = "chat-b" },') -> str:
    options = {"eject_after": "2", "eject_seconds": "0.2", "eject_max_seconds": "1",
               "probe_interval": "0.05"}
    for line in routing.splitlines():
        key, _, value = line.partition("=")
        options[key.strip()] = value.strip()
    lines = "\n".join(f"{k} = {v}" for k, v in options.items())
    return f"""
[routing]
{lines}

[upstreams.a]
url = "{replicas['a'].url}"
[upstreams.b]
url = "{replicas['b'].url}"
[upstreams.c]
url = "{replicas['c'].url}"
{extra}

[models.chat]
deployments = [
    {chat}
]
[models.other]
deployments = [{{ upstream = "c", model = "other-c" }}]
"""


@pytest.fixture
def make_proxy(tmp_path: Path, start_proxy: Callable[..., Awaitable[Proxy]]
               ) -> Callable[[str], Awaitable[Proxy]]:
    async def make(text: str, **env: str) -> Proxy:
        path = tmp_path / "orp.toml"
        path.write_text(text)
        settings = load_settings({"ORP_CONFIG": str(path), "ORP_AUTH_MODE": "none",
                                  "ORP_DB_PATH": str(tmp_path / "orp.sqlite3"), **env})
        return await start_proxy(settings)

    return make


def served(replica: Replica) -> list[str]:
    return [r.body["model"] for r in replica.mock.requests]


async def ask(proxy: Proxy, model: str = "chat", **body: Any) -> dict[str, Any]:
    status, _, data = await proxy.post({"model": model, "input": "hello", **body})
    assert status == 200, data
    answer: dict[str, Any] = json.loads(data)
    assert answer["status"] == "completed"
    return answer


async def readyz(proxy: Proxy) -> dict[str, Any]:
    async with proxy.session.get(proxy.server.make_url("/readyz")) as resp:
        body: dict[str, Any] = await resp.json()
        body["http_status"] = resp.status
        return body


def deployment(ready: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in ready["models"][model]["deployments"]
                                 if d["deployment"] == name)
    return found


async def eventually(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10
                     ) -> None:
    for _ in range(int(seconds / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds} s: {what}")


# -- routing ------------------------------------------------------------------------------


async def test_models_route_to_their_deployments_under_their_upstream_names(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas))
    answer = await ask(proxy, "other")
    assert answer["model"] == "other"  # the client's name, not the upstream's
    assert served(replicas["c"]) == ["other-c"]
    for _ in range(20):
        await ask(proxy, "chat")
    assert set(served(replicas["a"])) == {"chat-a"}
    assert set(served(replicas["b"])) == {"chat-b"}
    # Idle replicas tie, and ties are broken at random: both get some of 20 requests.
    assert served(replicas["a"]) and served(replicas["b"])
    assert len(served(replicas["c"])) == 1


async def test_an_unknown_model_is_404_without_any_upstream_request(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas))
    for path, body in (("/v1/responses", {"model": "nope", "input": "hi"}),
                       ("/v1/responses", {"model": "chat-a", "input": "hi", "stream": True}),
                       ("/v1/responses/compact", {"model": "nope", "input": "hi"})):
        status, _, data = await proxy.post(body, path=path)
        assert status == 404, data
        error = json.loads(data)["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(not r.mock.requests for r in replicas.values())


async def test_a_slow_replica_gets_fewer_requests(tmp_path: Path, make_proxy: StartProxy
                                                  ) -> None:
    slow, fast, other = Replica(interval_ms=40), Replica(), Replica()
    replicas = {"a": slow, "b": fast, "c": other}
    for r in replicas.values():
        await r.start()
    try:
        proxy = await make_proxy(config_text(replicas))
        words = "one two three four five six"

        async def client() -> None:
            for _ in range(10):
                await ask(proxy, "chat", input=words, store=False)

        await asyncio.gather(*(client() for _ in range(6)))
        assert len(slow.mock.requests) + len(fast.mock.requests) == 60
        # Each slow answer holds its replica ~300 ms while the fast one finishes at once:
        # least outstanding requests sends the slow replica a small share.
        assert len(fast.mock.requests) >= 3 * len(slow.mock.requests), (
            len(fast.mock.requests), len(slow.mock.requests))
    finally:
        for r in replicas.values():
            await r.stop()


async def test_weights_share_idle_traffic(replicas: dict[str, Replica],
                                          make_proxy: StartProxy) -> None:
    chat = ('{ upstream = "a", model = "chat-a", weight = 1000 },\n'
            '    { upstream = "b", model = "chat-b", weight = 0.001 },')
    proxy = await make_proxy(config_text(replicas, chat=chat))
    for _ in range(5):
        await ask(proxy)
    assert len(served(replicas["a"])) == 5 and not served(replicas["b"])


# -- failover and health ------------------------------------------------------------------


async def test_a_dead_replica_is_failed_over_ejected_probed_and_taken_back(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas))
    await replicas["a"].stop()
    for _ in range(20):
        await ask(proxy)  # every one succeeds on b (a is tried at random until it is out)
    ready = await readyz(proxy)
    assert ready["http_status"] == 200 and ready["status"] == "degraded"
    assert ready["models"]["chat"]["state"] == "degraded"
    assert ready["models"]["other"]["state"] == "ok"
    out = deployment(ready, "chat", "a/chat-a")
    # Refused connects, or a pooled connection the stopped server had closed.
    assert out["state"] == "out" and out["reason"] in ("connect", "connection_lost")
    await replicas["a"].start()

    async def back() -> bool:
        return deployment(await readyz(proxy), "chat", "a/chat-a")["state"] == "in"

    await eventually(back, "the restarted replica is taken back")
    for _ in range(20):
        await ask(proxy)
    assert served(replicas["a"])  # it gets traffic again
    metrics = await scrape(proxy)
    ejections = metrics["orp_deployment_ejections_total"]
    assert sum(v for k, v in ejections.items() if ("deployment", "a/chat-a") in k) >= 1
    errors = metrics["orp_deployment_errors_total"]
    assert sum(v for k, v in errors.items() if ("deployment", "a/chat-a") in k) >= 2


async def test_kill_a_replica_during_200_requests_no_failure_before_the_first_byte(
        tmp_path: Path, make_proxy: StartProxy) -> None:
    # Paced replicas, so that streams are in flight on both when one is killed.
    replicas = {name: Replica(interval_ms=5) for name in "abc"}
    for r in replicas.values():
        await r.start()
    try:
        proxy = await make_proxy(config_text(replicas))
        done = 0
        reached_60 = asyncio.Event()
        refused: list[str] = []  # failures before the first byte: must stay empty
        cut = 0  # streams that had started when their replica died (allowed to fail)

        async def client() -> None:
            nonlocal done, cut
            while done < 200:
                done += 1
                if done >= 60:
                    reached_60.set()
                async with proxy.session.post(proxy.url + "/responses", json={
                        "model": "chat", "input": "one two three four five six seven",
                        "stream": True, "store": False}) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        refused.append(f"{resp.status} {data[:200]!r}")
                    elif b"response.completed" not in data:
                        cut += 1

        async def killer() -> None:
            await reached_60.wait()
            await replicas["a"].stop()

        await asyncio.gather(killer(), *(client() for _ in range(8)))
        assert refused == []
        errors = (await scrape(proxy))["orp_deployment_errors_total"]
        assert sum(v for k, v in errors.items() if ("deployment", "a/chat-a") in k) >= 1
        ready = await readyz(proxy)
        assert deployment(ready, "chat", "a/chat-a")["state"] == "out"
        await replicas["a"].start()

        async def back() -> bool:
            return deployment(await readyz(proxy), "chat", "a/chat-a")["state"] == "in"

        await eventually(back, "the restarted replica is taken back")
        before = len(replicas["a"].mock.requests)
        for _ in range(10):
            await ask(proxy, store=False)
        assert len(replicas["a"].mock.requests) > before
        print(f"streams cut by the kill: {cut}")
    finally:
        for r in replicas.values():
            await r.stop()


@contextlib.contextmanager
def mock_process(home: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`scripts/mock_upstream.py` as its own process on `port`, pacing tokens 5 ms apart."""
    home.mkdir(exist_ok=True)
    log = home / f"mock-{time.monotonic_ns()}.log"
    process = procs.spawn([sys.executable, str(procs.MOCK_UPSTREAM), "--port", str(port),
                           "--interval-ms", "5"], cwd=home, env=procs.clean_env(home),
                          stdout=log)
    with procs.running(process):
        procs.wait_for_line(log, procs.MOCK_LISTENING, process)
        yield process


async def test_sigkill_a_replica_process_during_200_streams(
        tmp_path: Path, make_proxy: StartProxy) -> None:
    """The replica `a` is a process of its own, killed with SIGKILL (no goodbye: connections
    reset, nothing listening) while 8 clients stream, then started again on its port."""
    others = {name: Replica(interval_ms=5) for name in "bc"}
    for r in others.values():
        await r.start()
    port = procs.free_port()
    fake = Replica()
    fake.port = port
    try:
        with contextlib.ExitStack() as stack:
            killed = stack.enter_context(mock_process(tmp_path / "a", port))
            proxy = await make_proxy(config_text({"a": fake, **others}))
            done = 0
            reached = asyncio.Event()
            refused: list[str] = []  # failures before the first byte: must stay empty
            cut = 0  # streams that had started on `a` when it died: these may fail
            completed = 0

            async def client() -> None:
                nonlocal done, cut, completed
                while done < 200:
                    done += 1
                    if done >= 60:
                        reached.set()
                    async with proxy.session.post(proxy.url + "/responses", json={
                            "model": "chat", "input": "one two three four five six seven",
                            "stream": True, "store": False}) as resp:
                        data = await resp.read()
                        if resp.status != 200:
                            refused.append(f"{resp.status} {data[:200]!r}")
                        elif b"event: response.completed" in data:
                            completed += 1
                        else:
                            assert b"event: response.failed" in data  # never a silent cut
                            cut += 1

            async def killer() -> None:
                await reached.wait()
                killed.kill()

            await asyncio.gather(killer(), *(client() for _ in range(8)))
            assert refused == []
            assert completed + cut == 200
            ready = await readyz(proxy)
            assert deployment(ready, "chat", "a/chat-a")["state"] == "out"
            stack.enter_context(mock_process(tmp_path / "a", port))

            async def back() -> bool:
                return deployment(await readyz(proxy), "chat", "a/chat-a")["state"] == "in"

            await eventually(back, "the restarted replica is taken back")
            labels = (("deployment", "a/chat-a"), ("model", "chat"))
            before = (await scrape(proxy))["orp_deployment_requests_total"][labels]
            for _ in range(10):
                await ask(proxy, store=False)
            after = (await scrape(proxy))["orp_deployment_requests_total"][labels]
            assert after > before
            print(f"SIGKILL: {completed} completed, {cut} cut mid-stream, 0 refused")
    finally:
        for r in others.values():
            await r.stop()


async def test_loading_model_503_fails_over_and_is_avoided_while_out(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(
        replicas, routing="eject_seconds = 30\neject_max_seconds = 60",
        chat='{ upstream = "a", model = "chat-a", weight = 1000 },\n'
             '{ upstream = "b", model = "chat-b" },'))
    loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
    replicas["a"].mock.enqueue(Scenario(status=503, body=loading))
    await ask(proxy)  # a (preferred by weight) says loading: b answers
    assert served(replicas["a"]) == ["chat-a"] and served(replicas["b"]) == ["chat-b"]
    state = deployment(await readyz(proxy), "chat", "a/chat-a")
    assert state["state"] == "out" and state["reason"] == "http_503"
    assert state["retry_in_s"] > 20
    for _ in range(5):
        await ask(proxy)
    # Avoided while out (its weight would otherwise send every request to it).
    assert len(served(replicas["a"])) == 1 and len(served(replicas["b"])) == 6


async def test_429_with_retry_after_rests_the_replica_for_that_long(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(
        replicas, chat='{ upstream = "a", model = "chat-a", weight = 1000 },\n'
                       '{ upstream = "b", model = "chat-b" },'))
    replicas["a"].mock.enqueue(Scenario(status=429, headers={"Retry-After": "60"}))
    await ask(proxy)
    for _ in range(10):
        await ask(proxy)
    assert served(replicas["a"]) == ["chat-a"]  # only the refused one
    assert len(served(replicas["b"])) == 11
    state = deployment(await readyz(proxy), "chat", "a/chat-a")
    assert state["reason"] == "http_429" and state["retry_in_s"] > 50


async def test_5xx_fails_over_and_consecutive_ones_eject(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(
        replicas, routing="eject_seconds = 30\neject_max_seconds = 60",
        chat='{ upstream = "a", model = "chat-a", weight = 1000 },\n'
             '{ upstream = "b", model = "chat-b" },'))
    replicas["a"].mock.enqueue(Scenario(status=500), Scenario(status=502))
    await ask(proxy)
    assert deployment(await readyz(proxy), "chat", "a/chat-a")["state"] == "in"
    await ask(proxy)  # second consecutive 5xx: eject_after = 2
    state = deployment(await readyz(proxy), "chat", "a/chat-a")
    assert state["state"] == "out" and state["reason"] == "http_502"
    await ask(proxy)
    assert len(served(replicas["a"])) == 2 and len(served(replicas["b"])) == 3


async def test_a_hung_replica_is_not_retried_elsewhere_but_ejected(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(
        replicas, routing="eject_seconds = 30\neject_max_seconds = 60",
        chat='{ upstream = "a", model = "chat-a", weight = 1000 },\n'
             '{ upstream = "b", model = "chat-b" },'), ORP_UPSTREAM_READ_TIMEOUT="0.3")
    hang = Scenario(chunks=text_chunks(["late"]), first_byte_delay=5)
    replicas["a"].mock.enqueue(hang, hang)
    for _ in range(2):
        status, _, data = await proxy.post({"model": "chat", "input": "hi"})
        assert status == 504 and json.loads(data)["error"]["code"] == "upstream_timeout"
    assert not served(replicas["b"])  # a request that may be at work is not sent twice
    state = deployment(await readyz(proxy), "chat", "a/chat-a")
    assert state["state"] == "out" and state["reason"] == "timeout"
    await ask(proxy)
    assert served(replicas["b"]) == ["chat-b"]


async def test_no_failover_once_the_stream_started(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(
        replicas, chat='{ upstream = "a", model = "chat-a", weight = 1000 },\n'
                       '{ upstream = "b", model = "chat-b" },'))
    replicas["a"].mock.enqueue(Scenario(chunks=text_chunks(["Hel", "lo", " there"]),
                                        reset_after=2))
    events, done = await proxy.stream({"model": "chat", "input": "hi"})
    assert done and events[-1]["type"] == "response.failed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") \
        == "Hel"
    assert not served(replicas["b"])  # the request was not sent again


async def test_every_deployment_out_is_503_with_retry_after(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas))
    replicas["c"].mock.enqueue(Scenario(status=503, headers={"Retry-After": "7"}))
    status, headers, data = await proxy.post({"model": "other", "input": "hi"})
    assert status == 503, data
    assert json.loads(data)["error"]["code"] == "model_unavailable"
    assert headers["Retry-After"] == "7"
    # While it rests, ORP answers at once without asking the upstream.
    status, headers, _ = await proxy.post({"model": "other", "input": "hi"})
    assert status == 503 and 1 <= int(headers["Retry-After"]) <= 7
    assert len(replicas["c"].mock.requests) == 1
    ready = await readyz(proxy)
    assert ready["http_status"] == 200 and ready["models"]["other"]["state"] == "down"


async def test_readyz_503_when_nothing_is_servable_if_asked(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    text = config_text(replicas, routing="readyz_requires_model = true\neject_seconds = 30\n"
                       "eject_max_seconds = 60")
    proxy = await make_proxy(text)
    for name in "abc":
        replicas[name].mock.enqueue(Scenario(status=503, headers={"Retry-After": "30"}))
    await proxy.post({"model": "other", "input": "hi"})
    await proxy.post({"model": "chat", "input": "hi"})
    ready = await readyz(proxy)
    assert ready["http_status"] == 503 and ready["reason"] == "no_model_servable"


async def test_upstream_concurrency_limit(replicas: dict[str, Replica],
                                          make_proxy: StartProxy) -> None:
    slow = Scenario(chunks=text_chunks(["slow"]), first_byte_delay=0.5)
    replicas["c"].mock.enqueue(slow)
    text = config_text(replicas).replace(f'url = "{replicas["c"].url}"',
                                         f'url = "{replicas["c"].url}"\nmax_concurrency = 1')
    proxy = await make_proxy(text)
    first = asyncio.create_task(proxy.post({"model": "other", "input": "hi"}))
    await eventually(_has_requests(replicas["c"]), "the first request reached c")
    status, headers, data = await proxy.post({"model": "other", "input": "hi"})
    assert status == 503 and json.loads(data)["error"]["code"] == "model_overloaded"
    assert headers["Retry-After"] == "1"
    assert (await first)[0] == 200
    assert len(replicas["c"].mock.requests) == 1
    await ask(proxy, "other")  # the slot is free again


def _has_requests(replica: Replica) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(replica.mock.requests)

    return check


# -- stickiness -----------------------------------------------------------------------------


async def test_previous_response_id_sticks_to_its_deployment(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas, routing='sticky = "previous_response_id"'))
    for _ in range(4):
        answer = await ask(proxy)
        chain = [answer]
        for _ in range(4):
            chain.append(await ask(proxy, previous_response_id=chain[-1]["id"]))
    # Each conversation of five turns went to one replica: the counts are multiples of 5.
    a, b = len(served(replicas["a"])), len(served(replicas["b"]))
    assert a + b == 20 and a % 5 == 0 and b % 5 == 0


async def test_prompt_cache_key_sticks_to_one_deployment(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas, routing='sticky = "prompt_cache_key"'))
    for key in ("tenant-1", "tenant-2", "tenant-3"):
        for name in "ab":
            replicas[name].mock.reset()
        for _ in range(6):
            await ask(proxy, prompt_cache_key=key)
        counts = sorted([len(served(replicas["a"])), len(served(replicas["b"]))])
        assert counts == [0, 6], (key, counts)


# -- quirks, listing, metrics -----------------------------------------------------------------


async def test_quirks_are_per_upstream(replicas: dict[str, Replica],
                                       make_proxy: StartProxy) -> None:
    extra = """max_tokens_field = "max_completion_tokens"
developer_role = "developer"
tool_choice_object = false
thinking_kwarg = "enable_thinking"
extra_body = { top_k = 20, min_p = 0.05 }"""
    text = config_text(replicas).replace(f'url = "{replicas["c"].url}"',
                                         f'url = "{replicas["c"].url}"\n{extra}')
    # A quirk an upstream does not set follows the process-wide setting.
    proxy = await make_proxy(text, ORP_MAX_TOKENS_FIELD="max_tokens")
    body = {"reasoning": {"effort": "none"},
            "input": [{"role": "developer", "content": "Be terse."},
                      {"role": "user", "content": "hi"}],
            "max_output_tokens": 50, "top_p": 0.5,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"}}
    await proxy.post({"model": "other", **body})
    sent = replicas["c"].mock.requests[0].body
    assert sent["max_completion_tokens"] == 50 and "max_tokens" not in sent
    assert sent["messages"][0]["role"] == "developer"
    assert sent["tool_choice"] == "required"
    assert sent["top_k"] == 20 and sent["min_p"] == 0.05
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning_effort" not in sent
    await proxy.post({"model": "chat", **body})
    plain = next(r for r in (replicas["a"], replicas["b"]) if r.mock.requests)
    sent = plain.mock.requests[0].body
    assert sent["max_tokens"] == 50 and sent["messages"][0]["role"] == "system"
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert "top_k" not in sent and "chat_template_kwargs" not in sent
    assert sent["reasoning_effort"] == "none"


async def test_models_lists_the_configured_models_and_their_aliases(
        replicas: dict[str, Replica], make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas), ORP_MODEL_MAP="gpt-4o=chat,nowhere=x")
    async with proxy.session.get(proxy.url + "/models") as resp:
        assert resp.status == 200
        listed = [m["id"] for m in (await resp.json())["data"]]
    assert listed == ["chat", "other", "gpt-4o"]
    await ask(proxy, "gpt-4o")  # an alias routes like its model
    assert len(served(replicas["a"])) + len(served(replicas["b"])) == 1


async def test_models_of_a_single_upstream_are_its_own_list_plus_aliases(
        start_proxy: StartProxy, mock_url: str, tmp_path: Path) -> None:
    settings = load_settings({"ORP_UPSTREAM_URL": mock_url, "ORP_AUTH_MODE": "none",
                              "ORP_DB_PATH": str(tmp_path / "db"), "ORP_MODEL_MAP": "x=mock"})
    proxy = await start_proxy(settings)
    async with proxy.session.get(proxy.url + "/models") as resp:
        listed = [m["id"] for m in (await resp.json())["data"]]
    assert "mock-tools" in listed and listed[-1] == "x"


async def scrape(proxy: Proxy) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    async with proxy.session.get(proxy.server.make_url("/metrics")) as resp:
        text = await resp.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_per_deployment(replicas: dict[str, Replica], make_proxy: StartProxy,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    proxy = await make_proxy(config_text(replicas))
    for _ in range(3):
        await ask(proxy, "other")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "orp.access"]
    assert [line.get("deployment") for line in lines] == ["c/other-c"] * 3
    metrics = await scrape(proxy)
    labels = (("deployment", "c/other-c"), ("model", "other"))
    assert metrics["orp_deployment_requests_total"][labels] >= 3
    assert metrics["orp_deployment_latency_seconds_count"][labels] >= 3
    assert metrics["orp_deployment_in_flight"][labels] == 0


async def test_websocket_turns_are_routed(replicas: dict[str, Replica],
                                          make_proxy: StartProxy) -> None:
    proxy = await make_proxy(config_text(replicas))
    async with proxy.session.ws_connect(proxy.server.make_url("/v1/responses")) as ws:
        await ws.send_json({"type": "response.create", "model": "other", "input": "hi",
                            "store": False})
        async for frame in ws:
            event = json.loads(frame.data)
            if event["type"] in ("response.completed", "response.failed", "error"):
                break
        assert event["type"] == "response.completed"
        await ws.send_json({"type": "response.create", "model": "nope", "input": "hi"})
        frame = await ws.receive()
        envelope = json.loads(frame.data)
        assert envelope["status"] == 404 and envelope["error"]["code"] == "model_not_found"
    assert served(replicas["c"]) == ["other-c"]


async def test_models_in_pass_through_mode_checks_the_token_upstream(
        tmp_path: Path, make_proxy: StartProxy, start_proxy: StartProxy) -> None:
    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer good-token":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    checker = Replica()
    checker.port = runner.addresses[0][1]
    try:
        routed = await make_proxy(config_text({"a": checker, "b": checker, "c": checker}),
                                  ORP_AUTH_MODE="passthrough")
        single = await start_proxy(load_settings({
            "ORP_UPSTREAM_URL": checker.url, "ORP_AUTH_MODE": "passthrough",
            "ORP_DB_PATH": str(tmp_path / "single.sqlite3")}))
        for proxy, listed in ((routed, ["chat", "other"]), (single, ["m"])):
            for token, status in (("good-token", 200), ("bad-token", 401)):
                async with proxy.session.get(proxy.url + "/models", headers={
                        "Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == status, await resp.text()
                    body = await resp.json()
                if status == 200:
                    assert [m["id"] for m in body["data"]] == listed
                else:
                    assert body["error"]["code"] == "invalid_api_key"
    finally:
        await runner.cleanup()
