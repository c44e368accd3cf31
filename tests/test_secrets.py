"""Secrets and content stay out of logs and errors; upstream error text is scrubbed."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable

import pytest

from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream, Scenario, encode_sse, text_chunks
from orp_proxy.upstream.scrub import Scrubber
from tests.conftest import Proxy
from tests.test_e2e_http import error_of

StartProxy = Callable[[Settings], Awaitable[Proxy]]

CLIENT_KEY = "orp-client-key-5e1d9a7c3b2f4e6d"
UPSTREAM_KEY = "sk-upstream-key-a1b2c3d4e5f6a7b8"
LEAKED_KEY = "sk-proj-LeakedKey0123456789abcdef"
INTERNAL_HOST = "vllm-3.gpu.corp.internal"
LEAKY = (f"Invalid API key {LEAKED_KEY} for http://{INTERNAL_HOST}:8000/v1/chat "
         f"(backend {INTERNAL_HOST} at 10.20.30.40:8000, Authorization: Bearer {UPSTREAM_KEY})")
CONTENT = "the-private-prompt-text-91827"
SECRETS = (LEAKED_KEY, INTERNAL_HOST, "10.20.30.40", UPSTREAM_KEY)


def leaky_body() -> dict[str, object]:
    return {"error": {"message": LEAKY, "type": "invalid_request_error", "param": None,
                      "code": None}}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth_mode="keys", api_keys=CLIENT_KEY,
                               upstream_api_key=UPSTREAM_KEY)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.mark.parametrize("upstream_status", [400, 404, 429, 500, 503])
async def test_upstream_error_messages_are_scrubbed(start_proxy: StartProxy, keyed: Settings,
                                                    mock: MockUpstream,
                                                    upstream_status: int) -> None:
    proxy = await start_proxy(keyed)
    mock.enqueue(Scenario(status=upstream_status, body=leaky_body()))
    status, _, data = await proxy.post({"model": "m", "input": "x"}, headers=auth())
    error = error_of(status, data)
    for secret in SECRETS:
        assert secret not in data.decode(), (secret, error["message"])
    assert "Invalid API key" in error["message"]  # the useful part survives
    assert "[redacted]" in error["message"] and "[url]" in error["message"]


async def test_error_chunk_mid_stream_is_scrubbed_in_the_event_and_the_store(
        start_proxy: StartProxy, keyed: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(keyed)
    raw = encode_sse(text_chunks(["a"], finish_reason=None), send_done=False) + \
        b"data: " + json.dumps(leaky_body()).encode() + b"\n\n"
    mock.enqueue(Scenario(raw=raw))
    status, _, data = await proxy.post({"model": "m", "input": "x", "stream": True},
                                       headers=auth())
    assert status == 200
    text = data.decode()
    assert "upstream_error" in text and "Invalid API key" in text
    for secret in SECRETS:
        assert secret not in text
    rid = json.loads(text.split("data: ", 1)[1].split("\n", 1)[0])["response"]["id"]
    async with proxy.session.get(proxy.server.make_url(f"/v1/responses/{rid}"),
                                 headers=auth()) as resp:
        stored = await resp.text()
    assert '"failed"' in stored
    for secret in SECRETS:
        assert secret not in stored


async def test_verbatim_when_configured(start_proxy: StartProxy, keyed: Settings,
                                        mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(keyed, expose_upstream_errors=True))
    mock.enqueue(Scenario(status=400, body=leaky_body()))
    status, _, data = await proxy.post({"model": "m", "input": "x"}, headers=auth())
    assert LEAKY in error_of(status, data)["message"]


async def test_upstream_host_is_scrubbed_even_without_dots(start_proxy: StartProxy,
                                                           keyed: Settings,
                                                           mock: MockUpstream) -> None:
    # The configured upstream is reached as "localhost" here: a bare name no pattern catches.
    url = keyed.upstream_url
    assert url is not None
    proxy = await start_proxy(dataclasses.replace(
        keyed, upstream_url=url.replace("127.0.0.1", "localhost")))
    mock.enqueue(Scenario(status=500, body={"error": {"message": "localhost is overloaded"}}))
    status, _, data = await proxy.post({"model": "m", "input": "x"}, headers=auth())
    message = error_of(status, data)["message"]
    assert "localhost" not in message and "overloaded" in message


def test_scrubber_keeps_ordinary_text() -> None:
    scrub = Scrubber(["gpu-box"])
    for kept in ("This model's maximum context length is 4096 tokens.",
                 "model llama-3.1-8b not found, e.g. try Qwen/Qwen2.5-7B-Instruct",
                 "CUDA out of memory. Tried to allocate 2.00 GiB"):
        assert scrub(kept) == kept
    assert scrub("gpu-box down; see https://status.example.com/x?key=1") == \
        "[redacted] down; see [url]"
    assert "abc" not in scrub("api_key=abc123 token: abc456")
    assert scrub("from [fd00::7]:8000 and 192.168.1.9") == "from [address] and [address]"


async def test_no_secret_or_content_reaches_the_logs(start_proxy: StartProxy, keyed: Settings,
                                                     mock: MockUpstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(dataclasses.replace(keyed, read_timeout=0.3))
    body = {"model": "m", "input": CONTENT}
    mock.enqueue(Scenario(status=500, body=leaky_body()),
                 Scenario(status=401, body=leaky_body()),
                 Scenario(chunks=text_chunks([CONTENT]), stall_after=2),
                 Scenario(raw=b"data: {" + CONTENT.encode() + b"\n\n"))
    for _ in range(4):
        await proxy.post(body, headers=auth())
    await proxy.post({**body, "stream": True}, headers=auth())
    await proxy.post(body, headers={"Authorization": f"Bearer {CLIENT_KEY}-wrong"})
    await proxy.post({"model": "m", "input": CONTENT, "temperature": "hot"}, headers=auth())
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # something was logged at all
    for secret in (CLIENT_KEY, UPSTREAM_KEY, LEAKED_KEY, CONTENT):
        assert secret not in logged, secret
