"""Health endpoints, draining, SSE keep-alives, metrics and the access log, in one process.

The same behaviour under real gunicorn workers is in test_gunicorn_service.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orp_proxy.app import build_app
from orp_proxy.config import Settings
from orp_proxy.ops import health
from orp_proxy.upstream.mock import MockUpstream, Scenario, text_chunks, usage_dict
from scripts import procs
from tests.conftest import Proxy
from tests.sse_check import parse_sse

StartProxy = Callable[[Settings], Awaitable[Proxy]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SECRET_CLIENT_KEY = "sk-secret-xyz"
SECRET_UPSTREAM_KEY = "sk-upstream-key-999"


async def get_json(proxy: Proxy, path: str) -> tuple[int, dict[str, Any]]:
    async with proxy.session.get(proxy.server.make_url(path)) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, await resp.json()


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def scrape(proxy: Proxy) -> Samples:
    async with proxy.session.get(proxy.server.make_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- /livez and /readyz -------------------------------------------------------------------


async def test_livez_and_readyz_report_store_and_upstream(start_proxy: StartProxy,
                                                          settings: Settings) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, upstream_probe_interval=0.1))
    status, body = await get_json(proxy, "/livez")
    assert (status, body["status"], body["pid"]) == (200, "alive", os.getpid())

    async def upstream_known() -> bool:
        return (await get_json(proxy, "/readyz"))[1]["upstream"]["state"] != "unknown"

    await wait_for(upstream_known)
    status, body = await get_json(proxy, "/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["store"]["writable"] is True
    assert body["upstream"]["state"] == "ok" and body["upstream"]["status"] == 200


async def test_readyz_stays_200_when_the_upstream_is_down(start_proxy: StartProxy,
                                                          settings: Settings) -> None:
    port = procs.free_port()  # nobody listens on it
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=f"http://127.0.0.1:{port}/v1", upstream_probe_interval=0.1))

    async def probed() -> bool:
        return (await get_json(proxy, "/readyz"))[1]["upstream"]["state"] != "unknown"

    await wait_for(probed)
    status, body = await get_json(proxy, "/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["upstream"]["state"] == "unreachable"


async def test_readyz_is_503_while_the_store_cannot_commit(proxy: Proxy, settings: Settings
                                                          ) -> None:
    assert (await get_json(proxy, "/readyz"))[0] == 200
    # Another process holding the write lock: the heartbeat cannot commit within a second.
    blocker = sqlite3.connect(settings.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        status, body = await get_json(proxy, "/readyz")
        assert status == 503, body
        assert body["reason"] == "store_not_writable" and body["store"]["writable"] is False
        assert time.monotonic() - started < health.STORE_CHECK_TIMEOUT + 1.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    async def ready() -> bool:
        return (await get_json(proxy, "/readyz"))[0] == 200

    await wait_for(ready, within=10.0)


async def test_drain_file_turns_readyz_503_and_back(start_proxy: StartProxy, settings: Settings,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "DRAIN_FILE_POLL", 0.05)
    drain_file = tmp_path / "drain"
    proxy = await start_proxy(dataclasses.replace(settings, drain_file=str(drain_file)))
    assert (await get_json(proxy, "/readyz"))[0] == 200

    drain_file.touch()

    async def draining() -> bool:
        return (await get_json(proxy, "/readyz"))[0] == 503

    await wait_for(draining, within=2.0)
    _, body = await get_json(proxy, "/readyz")
    assert body["status"] == "draining" and body["reason"] == "drain_file"
    # Draining only changes readiness: new streams are still served in full.
    events, done = await proxy.stream({"model": "mock", "input": "still serving?"})
    assert done and events[-1]["type"] == "response.completed"

    drain_file.unlink()

    async def ready() -> bool:
        return (await get_json(proxy, "/readyz"))[0] == 200

    await wait_for(ready, within=2.0)


async def test_sigterm_hook_drains_then_hands_over_to_the_worker(proxy: Proxy) -> None:
    """`drain_on_sigterm` (gunicorn's post_worker_init) with a real signal on a real loop."""
    loop = asyncio.get_running_loop()
    exits: list[int] = []
    worker = SimpleNamespace(loop=loop, handle_exit=lambda sig, frame: exits.append(sig))
    health.drain_on_sigterm(worker)
    try:
        os.kill(os.getpid(), signal.SIGTERM)

        async def handed_over() -> bool:
            return bool(exits)

        await wait_for(handed_over, within=2.0)
        assert exits == [signal.SIGTERM]
        status, body = await get_json(proxy, "/readyz")
        assert status == 503 and body["reason"] == "terminating"
        # Requests in flight or arriving before the listener closes are still served.
        events, done = await proxy.stream({"model": "mock", "input": "after SIGTERM"})
        assert done and events[-1]["type"] == "response.completed"
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# -- SSE keep-alive -------------------------------------------------------------------------


async def test_idle_stream_gets_keepalive_comments(start_proxy: StartProxy, settings: Settings,
                                                   mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, sse_keepalive=0.2))
    # The upstream is silent for 0.8 s before each of its two last pieces.
    mock.enqueue(Scenario(chunks=text_chunks(["slow"], role_chunk=False), delay=0.8))
    status, _, raw = await proxy.post({"model": "mock", "input": "x", "stream": True})
    assert status == 200
    text = raw.decode()
    # parse_sse accepts comment blocks and insists that [DONE] comes last.
    events, done = parse_sse(raw)
    assert done and events[-1]["type"] == "response.completed"
    comments = text.count(": keep-alive\n\n")
    assert comments >= 4, text
    # Never inside an event block: each comment is a block of its own.
    assert all(block == ": keep-alive" for block in text.split("\n\n") if block.startswith(":"))


async def test_busy_stream_gets_no_keepalive(start_proxy: StartProxy, settings: Settings,
                                             mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, sse_keepalive=0.5))
    mock.enqueue(Scenario(chunks=text_chunks([f" w{i}" for i in range(12)]), delay=0.1))
    status, _, raw = await proxy.post({"model": "mock", "input": "x", "stream": True})
    assert status == 200 and parse_sse(raw)[1]
    assert b"keep-alive" not in raw


# -- access log -----------------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "orp.access"]
    assert all(line["type"] == "access" for line in lines)
    return lines


async def test_access_line_is_json_without_secrets_or_content(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream,
        caplog: pytest.LogCaptureFixture) -> None:
    # Everything at INFO, ORP's own loggers at DEBUG (aiosqlite's DEBUG shows SQL parameters:
    # the gunicorn config and `serve` keep it at INFO).
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="orp")
    proxy = await start_proxy(dataclasses.replace(settings, upstream_api_key=SECRET_UPSTREAM_KEY))
    mock.enqueue(Scenario(chunks=text_chunks(["Purple", " indeed"], usage=usage_dict(7, 2))))
    headers = {"Authorization": f"Bearer {SECRET_CLIENT_KEY}", "X-Request-Id": "rid-abc-1"}
    status, resp_headers, _ = await proxy.post(
        {"model": "mock", "input": "purple elephant", "stream": True}, headers=headers)
    assert status == 200 and resp_headers["X-Request-Id"] == "rid-abc-1"
    assert mock.requests[-1].headers["x-request-id"] == "rid-abc-1"
    assert mock.requests[-1].headers["authorization"] == f"Bearer {SECRET_UPSTREAM_KEY}"

    (line,) = [x for x in access_lines(caplog) if x["request_id"] == "rid-abc-1"]
    assert line["method"] == "POST" and line["path"] == "/v1/responses"
    assert line["status"] == 200 and line["stream"] is True and line["model"] == "mock"
    assert line["outcome"] == "completed" and line["response_id"].startswith("resp_")
    assert (line["input_tokens"], line["output_tokens"]) == (7, 2)
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]
    assert "input" not in line and "output" not in line
    everything = caplog.text
    for secret in (SECRET_CLIENT_KEY, SECRET_UPSTREAM_KEY, "purple", "Purple"):
        assert secret not in everything


async def test_log_content_setting_adds_the_messages(start_proxy: StartProxy,
                                                     settings: Settings, mock: MockUpstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    proxy = await start_proxy(dataclasses.replace(settings, log_content=True,
                                                  upstream_api_key=SECRET_UPSTREAM_KEY))
    status, _, _ = await proxy.post({"model": "mock", "input": "purple elephant",
                                     "instructions": "Be brief."},
                                    headers={"Authorization": f"Bearer {SECRET_CLIENT_KEY}"})
    assert status == 200
    (line,) = access_lines(caplog)
    assert line["stream"] is False and line["instructions"] == "Be brief."
    assert "purple elephant" in json.dumps(line["input"])
    assert "You said: purple elephant" in json.dumps(line["output"])
    assert SECRET_CLIENT_KEY not in caplog.text and SECRET_UPSTREAM_KEY not in caplog.text


async def test_probes_are_logged_at_debug_only(proxy: Proxy,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    assert (await get_json(proxy, "/livez"))[0] == 200
    assert access_lines(caplog) == []
    caplog.set_level(logging.DEBUG, logger="orp.access")
    assert (await get_json(proxy, "/livez"))[0] == 200
    assert [line["path"] for line in access_lines(caplog)] == ["/livez"]


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_count_requests_tokens_and_errors(proxy: Proxy, mock: MockUpstream,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    before = await scrape(proxy)
    mock.enqueue(Scenario(chunks=text_chunks(["a", "b"], usage=usage_dict(5, 2))),
                 Scenario(chunks=text_chunks(["c"], usage=usage_dict(3, 1))))
    events, done = await proxy.stream({"model": "mock", "input": "one"})
    assert done and events[-1]["type"] == "response.completed"
    status, _, _ = await proxy.post({"model": "mock", "input": "two"})
    assert status == 200
    status, headers, _ = await proxy.post({"model": "mock", "input": 5})
    assert status == 400 and headers["X-Request-Id"]
    after = await scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    route = "/v1/responses"
    assert delta("orp_requests_total", route=route, status="200", stream="true") == 1
    assert delta("orp_requests_total", route=route, status="200", stream="false") == 1
    assert delta("orp_requests_total", route=route, status="400", stream="false") == 1
    assert delta("orp_tokens_total", kind="input") == 8
    assert delta("orp_tokens_total", kind="output") == 3
    assert delta("orp_time_to_first_token_seconds_count") == 2
    assert delta("orp_response_duration_seconds_count") == 2
    (error_line,) = [x for x in access_lines(caplog) if x["status"] == 400]
    assert error_line["error_code"] and error_line["request_id"] == headers["X-Request-Id"]
    assert delta("orp_errors_total", code=error_line["error_code"]) == 1
    assert delta("orp_store_operation_seconds_count", operation="save_response") == 2
    assert sample(after, "orp_streams_in_flight") == 0


async def test_in_flight_gauge_and_client_disconnect(proxy: Proxy, mock: MockUpstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    # The upstream sends one chunk, then nothing until its client goes away.
    mock.enqueue(Scenario(chunks=text_chunks(["never", " ends"]), stall_after=2))
    resp = await proxy.session.post(proxy.server.make_url("/v1/responses"),
                                    json={"model": "mock", "input": "x", "stream": True},
                                    headers={"X-Request-Id": "rid-gone"})
    assert resp.status == 200
    await resp.content.readuntil(b"response.output_text.delta")
    assert sample(await scrape(proxy), "orp_streams_in_flight") == 1
    resp.close()
    await mock.wait_for_disconnect(timeout=2.0)

    async def settled() -> bool:
        return any(x["request_id"] == "rid-gone" for x in access_lines(caplog))

    await wait_for(settled)
    (line,) = [x for x in access_lines(caplog) if x["request_id"] == "rid-gone"]
    assert line["status"] == 499 and line["outcome"] == "incomplete"
    assert line["incomplete_reason"] == "client_disconnected"
    assert sample(await scrape(proxy), "orp_streams_in_flight") == 0


async def test_metrics_count_with_the_access_line_off(proxy: Proxy, mock: MockUpstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # At `warning` (the bench's level, and many operators') no line is built, yet every
    # request, token and error is still counted.
    caplog.set_level(logging.WARNING, logger="orp.access")
    before = await scrape(proxy)
    mock.enqueue(Scenario(chunks=text_chunks(["a", "b"], usage=usage_dict(5, 2))))
    events, done = await proxy.stream({"model": "mock", "input": "one"})
    assert done and events[-1]["type"] == "response.completed"
    status, _, _ = await proxy.post({"model": "mock", "input": 5})
    assert status == 400
    after = await scrape(proxy)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    route = "/v1/responses"
    assert access_lines(caplog) == []
    assert delta("orp_requests_total", route=route, status="200", stream="true") == 1
    assert delta("orp_requests_total", route=route, status="400", stream="false") == 1
    assert delta("orp_tokens_total", kind="output") == 2
    assert delta("orp_time_to_first_token_seconds_count") == 1
    assert delta("orp_errors_total", code="invalid_type") == 1


async def test_a_hang_up_seen_by_a_failed_write_is_logged_as_499(
        settings: Settings, mock: MockUpstream, aiohttp_server: Callable[..., Awaitable[Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    # Without handler cancellation (a runner that does not turn it on) the hang-up surfaces as
    # a failed write; the handler then returns its response normally.
    caplog.set_level(logging.INFO, logger="orp.access")
    app = build_app(settings)
    app._handler_args["handler_cancellation"] = False
    server = await aiohttp_server(app, host="127.0.0.1")
    proxy = Proxy(server, aiohttp.ClientSession())
    try:
        mock.enqueue(Scenario(chunks=text_chunks([f"t{i} " for i in range(60)]), delay=0.05))
        before = await scrape(proxy)
        resp = await proxy.session.post(server.make_url("/v1/responses"),
                                        json={"model": "mock", "input": "x", "stream": True},
                                        headers={"X-Request-Id": "rid-write-failed"})
        await resp.content.readuntil(b"response.output_text.delta")
        resp.close()

        async def logged() -> bool:
            return any(x["request_id"] == "rid-write-failed" for x in access_lines(caplog))

        await wait_for(logged)
        (line,) = [x for x in access_lines(caplog) if x["request_id"] == "rid-write-failed"]
        assert line["status"] == 499 and "error_code" not in line
        assert line["incomplete_reason"] == "client_disconnected"
        after = await scrape(proxy)
        labels = {"route": "/v1/responses", "stream": "true"}
        assert sample(after, "orp_requests_total", status="499", **labels) - \
            sample(before, "orp_requests_total", status="499", **labels) == 1
        assert sample(after, "orp_requests_total", status="200", **labels) == \
            sample(before, "orp_requests_total", status="200", **labels)
    finally:
        await proxy.session.close()


async def test_compaction_reports_its_tokens_and_model(proxy: Proxy, mock: MockUpstream,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp.access")
    before = await scrape(proxy)
    mock.enqueue(Scenario(chunks=text_chunks(["The summary."], usage=usage_dict(40, 6))))
    status, _, data = await proxy.post({"model": "mock", "input": "a long talk"},
                                       path="/v1/responses/compact",
                                       headers={"X-Request-Id": "rid-compact"})
    assert status == 200, data
    (line,) = [x for x in access_lines(caplog) if x["request_id"] == "rid-compact"]
    assert line["path"] == "/v1/responses/compact" and line["model"] == "mock"
    assert (line["input_tokens"], line["output_tokens"]) == (40, 6)
    assert line["outcome"] == "completed" and line["ttft_ms"] is not None
    after = await scrape(proxy)
    assert sample(after, "orp_tokens_total", kind="input") - \
        sample(before, "orp_tokens_total", kind="input") == 40
    assert sample(after, "orp_time_to_first_token_seconds_count") - \
        sample(before, "orp_time_to_first_token_seconds_count") == 1
