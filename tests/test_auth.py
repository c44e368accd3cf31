"""Authentication (gateway keys, pass-through, none) and tenant isolation under real keys."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orp_proxy.config import ConfigError, Settings, load_settings
from orp_proxy.ops import auth as auth_module
from orp_proxy.ops.auth import Authenticator, load_api_keys
from orp_proxy.upstream.mock import MockUpstream, Scenario
from scripts import procs
from tests.conftest import Proxy
from tests.test_e2e_http import error_of

StartProxy = Callable[[Settings], Awaitable[Proxy]]

ALICE = "orp-key-alice-7f3a9c1e5b2d4f60"
BOB = "orp-key-bob-0c8e2a4b6d1f3e57"
UPSTREAM_KEY = "sk-upstream-9d8c7b6a5f4e3d2c"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth_mode="keys", api_keys=f"{ALICE}, {BOB}",
                               upstream_api_key=UPSTREAM_KEY)


async def call(proxy: Proxy, method: str, path: str, *, key: str | None = None,
               body: Any = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    sent = dict(headers or {})
    if key is not None:
        sent.update(bearer(key))
    async with proxy.session.request(method, proxy.server.make_url(path), json=body,
                                     headers=sent) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def assert_401(status: int, headers: dict[str, str], data: bytes) -> dict[str, Any]:
    error = error_of(status, data)
    assert status == 401, (status, data)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert headers["WWW-Authenticate"] == "Bearer"
    return error


# -- gateway keys -----------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/v1/responses", {"model": "m", "input": "x"}),
    ("POST", "/v1/responses", {"model": "m", "input": "x", "stream": True}),
    ("GET", "/v1/responses/resp_123", None),
    ("DELETE", "/v1/responses/resp_123", None),
    ("GET", "/v1/responses/resp_123/input_items", None),
    ("GET", "/v1/responses", None),  # the WebSocket transport's upgrade
    ("POST", "/v1/responses/compact", {"model": "m", "input": "x"}),
    ("GET", "/v1/nothing", None),  # unknown routes do not reveal themselves either
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize("presented", [None, "wrong-key", "", ALICE + "x", ALICE[:-1]],
                         ids=["missing", "wrong", "empty", "longer", "prefix"])
async def test_requests_without_a_valid_key_get_401(
        start_proxy: StartProxy, keyed: Settings, mock: MockUpstream, method: str, path: str,
        body: Any, presented: str | None) -> None:
    proxy = await start_proxy(keyed)
    status, headers, data = await call(proxy, method, path, key=presented, body=body)
    error = assert_401(status, headers, data)
    assert ("Missing" in error["message"]) == (not presented)
    assert not mock.requests  # nothing reached the upstream


@pytest.mark.parametrize("header", [f"Basic {ALICE}", ALICE, f"Token {ALICE}", "Bearer"])
async def test_other_schemes_are_refused(start_proxy: StartProxy, keyed: Settings,
                                         header: str) -> None:
    proxy = await start_proxy(keyed)
    status, headers, data = await call(proxy, "POST", "/v1/responses",
                                       body={"model": "m", "input": "x"},
                                       headers={"Authorization": header})
    assert_401(status, headers, data)


@pytest.mark.parametrize("key", [ALICE, BOB])
async def test_every_configured_key_works_and_orp_uses_its_own_upstream_key(
        start_proxy: StartProxy, keyed: Settings, mock: MockUpstream, key: str) -> None:
    proxy = await start_proxy(keyed)
    status, _, data = await call(proxy, "POST", "/v1/responses", key=key,
                                 body={"model": "m", "input": "hi"})
    assert status == 200, data
    assert mock.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    # In keys mode an upstream 401 is ORP's own credential failing: 502, not the client's fault.
    mock.enqueue(Scenario(status=401))
    status, _, data = await call(proxy, "POST", "/v1/responses", key=key,
                                 body={"model": "m", "input": "hi"})
    assert (status, error_of(status, data)["code"]) == (502, "upstream_auth_failed")


async def test_probes_need_no_key_and_metrics_can_be_restricted(
        start_proxy: StartProxy, keyed: Settings) -> None:
    proxy = await start_proxy(keyed)
    for path in ("/livez", "/readyz", "/metrics"):
        status, _, _ = await call(proxy, "GET", path)
        assert status in (200, 503), path  # answered, not refused
    closed = await start_proxy(dataclasses.replace(keyed, metrics_public=False))
    assert_401(*await call(closed, "GET", "/metrics"))
    assert_401(*await call(closed, "GET", "/metrics", key="nope"))
    status, _, data = await call(closed, "GET", "/metrics", key=BOB)
    assert status == 200, data
    status, _, _ = await call(closed, "GET", "/livez")
    assert status == 200


# -- tenant isolation -------------------------------------------------------------------------


async def create(proxy: Proxy, key: str, body: dict[str, Any]) -> dict[str, Any]:
    status, _, data = await call(proxy, "POST", "/v1/responses", key=key, body=body)
    assert status == 200, data
    return dict(json.loads(data))


@pytest.mark.parametrize("owner_streams", [False, True])
async def test_another_key_cannot_see_use_or_delete_a_response(
        start_proxy: StartProxy, keyed: Settings, owner_streams: bool) -> None:
    proxy = await start_proxy(keyed)
    if owner_streams:
        events, _ = await proxy.stream({"model": "m", "input": "Alice's secret"},
                                       headers=bearer(ALICE))
        mine = events[-1]["response"]
    else:
        mine = await create(proxy, ALICE, {"model": "m", "input": "Alice's secret"})
    rid = mine["id"]
    output_item = mine["output"][0]["id"]
    _, _, data = await call(proxy, "GET", f"/v1/responses/{rid}/input_items", key=ALICE)
    input_item = json.loads(data)["data"][0]["id"]

    # Bob: every endpoint answers as if the response did not exist.
    for method, path in (("GET", f"/v1/responses/{rid}"),
                         ("GET", f"/v1/responses/{rid}/input_items"),
                         ("DELETE", f"/v1/responses/{rid}")):
        status, _, data = await call(proxy, method, path, key=BOB)
        error = error_of(status, data)
        assert (status, error["code"]) == (404, "not_found"), (method, path)
        assert "secret" not in data.decode()
    status, _, data = await call(proxy, "POST", "/v1/responses", key=BOB,
                                 body={"model": "m", "input": "go on",
                                       "previous_response_id": rid})
    error = error_of(status, data)
    assert (status, error["code"], error["param"]) == (
        400, "previous_response_not_found", "previous_response_id")
    for item_id in (output_item, input_item):
        status, _, data = await call(proxy, "POST", "/v1/responses", key=BOB, body={
            "model": "m", "input": [{"type": "item_reference", "id": item_id}]})
        error = error_of(status, data)
        assert (status, error["code"]) == (400, "item_not_found"), item_id

    # Alice still has everything (Bob's DELETE did nothing), and can continue and reference.
    status, _, data = await call(proxy, "GET", f"/v1/responses/{rid}", key=ALICE)
    assert status == 200 and json.loads(data)["output"] == mine["output"]
    follow = await create(proxy, ALICE, {"model": "m", "input": "go on",
                                         "previous_response_id": rid})
    assert follow["previous_response_id"] == rid
    ref = await create(proxy, ALICE, {"model": "m", "input": [
        {"type": "item_reference", "id": input_item},
        {"type": "item_reference", "id": output_item}]})
    assert ref["status"] == "completed"
    status, _, _ = await call(proxy, "DELETE", f"/v1/responses/{rid}", key=ALICE)
    assert status == 200


async def test_keys_are_never_stored(start_proxy: StartProxy, keyed: Settings) -> None:
    proxy = await start_proxy(keyed)
    for key in (ALICE, BOB):
        await create(proxy, key, {"model": "m", "input": "hello"})
    await proxy.server.close()  # let the store close its files
    stored = b"".join(p.read_bytes() for p in Path(keyed.db_path).parent.iterdir()
                      if p.name.startswith(Path(keyed.db_path).name))
    assert stored  # the database was written
    for secret in (ALICE, BOB, UPSTREAM_KEY):
        assert secret.encode() not in stored


# -- pass-through -----------------------------------------------------------------------------


@pytest.fixture
def passthrough(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth_mode="passthrough", upstream_api_key=UPSTREAM_KEY)


@pytest.mark.parametrize("stream", [False, True])
async def test_passthrough_forwards_the_clients_token(start_proxy: StartProxy,
                                                      passthrough: Settings,
                                                      mock: MockUpstream, stream: bool) -> None:
    proxy = await start_proxy(passthrough)
    status, _, data = await call(proxy, "POST", "/v1/responses", key="sk-client-token-1",
                                 body={"model": "m", "input": "hi", "stream": stream})
    assert status == 200, data
    assert mock.requests[-1].headers["Authorization"] == "Bearer sk-client-token-1"
    assert UPSTREAM_KEY not in json.dumps(dict(mock.requests[-1].headers))


@pytest.mark.parametrize("upstream_status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_passthrough_upstream_refusal_is_the_clients_401(
        start_proxy: StartProxy, passthrough: Settings, mock: MockUpstream,
        upstream_status: int, stream: bool) -> None:
    proxy = await start_proxy(passthrough)
    mock.enqueue(Scenario(status=upstream_status))
    assert_401(*await call(proxy, "POST", "/v1/responses", key="sk-bad-client-key",
                           body={"model": "m", "input": "hi", "stream": stream}))


async def test_passthrough_without_a_token_never_calls_upstream(
        start_proxy: StartProxy, passthrough: Settings, mock: MockUpstream) -> None:
    proxy = await start_proxy(passthrough)
    assert_401(*await call(proxy, "POST", "/v1/responses", body={"model": "m", "input": "x"}))
    assert not mock.requests


async def test_passthrough_tenants_are_the_tokens(start_proxy: StartProxy,
                                                  passthrough: Settings) -> None:
    proxy = await start_proxy(passthrough)
    mine = await create(proxy, "token-one", {"model": "m", "input": "x"})
    status, _, _ = await call(proxy, "GET", f"/v1/responses/{mine['id']}", key="token-two")
    assert status == 404
    status, _, _ = await call(proxy, "GET", f"/v1/responses/{mine['id']}", key="token-one")
    assert status == 200


async def test_passthrough_store_reads_check_the_token_upstream(
        start_proxy: StartProxy, settings: Settings, mock: MockUpstream,
        aiohttp_server: Any) -> None:
    """A key the upstream has revoked can no longer read or delete what it stored: GET, DELETE
    and input_items ask `GET /models` with it first (cached for ORP_PASSTHROUGH_CHECK_TTL)."""
    from aiohttp import web

    accepted = {"Bearer sk-alive", "Bearer sk-revoked-soon"}
    models_calls: list[str] = []

    @web.middleware
    async def upstream_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if request.path.endswith("/models") and given:  # not the readiness probe's
            models_calls.append(given)
        if given not in accepted:
            return web.json_response({"error": {"message": "revoked", "type": "auth"}},
                                     status=401)
        return await handler(request)

    app = mock.app()
    app.middlewares.append(upstream_auth)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    proxy = await start_proxy(dataclasses.replace(
        settings, upstream_url=str(upstream.make_url("/v1")), auth_mode="passthrough",
        passthrough_check_ttl=3600))
    created = await create(proxy, "sk-revoked-soon", {"model": "m", "input": "secret"})
    path = f"/v1/responses/{created['id']}"
    status, _, _ = await call(proxy, "GET", path, key="sk-revoked-soon")
    assert status == 200 and models_calls == ["Bearer sk-revoked-soon"]
    status, _, _ = await call(proxy, "GET", path + "/input_items", key="sk-revoked-soon")
    assert status == 200 and len(models_calls) == 1  # the answer is cached
    accepted.discard("Bearer sk-revoked-soon")
    proxy.server.app[auth_module.TOKEN_CHECK]._known.clear()  # as when the TTL has passed
    for method, where in (("GET", path), ("GET", path + "/input_items"), ("DELETE", path)):
        assert_401(*await call(proxy, method, where, key="sk-revoked-soon"))
    # Another key is checked on its own, and an upstream that cannot answer fails closed.
    status, _, _ = await call(proxy, "GET", path, key="sk-alive")
    assert status == 404
    await upstream.close()
    status, _, data = await call(proxy, "GET", path, key="sk-unknown")
    assert status == 502 and error_of(status, data)["code"] == "credential_check_failed"


# -- none -------------------------------------------------------------------------------------


async def test_none_mode_is_open_and_warns(start_proxy: StartProxy, settings: Settings,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orp")
    proxy = await start_proxy(dataclasses.replace(settings, auth_mode="none"))
    status, _, _ = await call(proxy, "POST", "/v1/responses", body={"model": "m", "input": "x"})
    assert status == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "ORP_AUTH_MODE=none" in r.getMessage()]
    assert warnings


# -- resolving the mode and loading keys ------------------------------------------------------


def test_mode_resolution(tmp_path: Path) -> None:
    upstream = "http://gpu-box:8000/v1"
    # The demo (bundled mock, chosen explicitly) is open; no upstream at all is not the demo.
    assert Authenticator.from_settings(Settings(mock_upstream=True)).mode == "none"
    with pytest.raises(ConfigError, match="no client authentication"):
        Authenticator.from_settings(Settings())
    assert Authenticator.from_settings(Settings(api_keys="k" * 20)).mode == "keys"
    assert Authenticator.from_settings(Settings(upstream_url=upstream,
                                                api_keys="k" * 20)).mode == "keys"
    with pytest.raises(ConfigError, match="no client authentication"):
        Authenticator.from_settings(Settings(upstream_url=upstream))
    assert Authenticator.from_settings(Settings(upstream_url=upstream,
                                                auth_mode="none")).mode == "none"
    assert Authenticator.from_settings(Settings(upstream_url=upstream,
                                                auth_mode="passthrough")).mode == "passthrough"
    with pytest.raises(ConfigError, match="at least one key"):
        Authenticator.from_settings(Settings(auth_mode="keys"))
    with pytest.raises(ConfigError, match="ORP_AUTH_MODE"):
        load_settings({"ORP_AUTH_MODE": "open"})


def test_keys_from_the_setting_a_file_and_a_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team A\nkey-from-file-1\n\n  key-from-file-2  \nkey-one\n")
    settings = load_settings({"ORP_API_KEYS": "key-one,,key-two ",
                              "ORP_API_KEYS_FILE": str(keys_file)})
    assert load_api_keys(settings) == ["key-one", "key-two", "key-from-file-1",
                                       "key-from-file-2"]
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "api_keys").write_text("key-from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert load_api_keys(Settings()) == ["key-from-credential"]
    assert Authenticator.from_settings(Settings(upstream_url="http://x/v1")).mode == "keys"
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        load_api_keys(Settings(api_keys_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="number 2") as caught:
        load_api_keys(Settings(api_keys="good-key,bad key-secret-part"))
    assert "secret-part" not in str(caught.value)
    assert load_settings({"ORP_API_KEYS": "k1,k2"}).redacted()["api_keys"] == "<redacted>"


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"key-number-{i:02d}-abcdefgh" for i in range(8)]
    auth = Authenticator.from_settings(Settings(auth_mode="keys", api_keys=",".join(keys)))
    calls: list[int] = []
    real = auth_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    for presented, expected in ((keys[0], True), (keys[-1], True), ("nope", False)):
        calls.clear()
        assert auth.is_gateway_key(presented) is expected
        assert len(calls) == len(keys)  # no early exit on a match or a mismatch
    assert auth.is_gateway_key(None) is False
    # Only digests are kept in memory.
    assert all(len(d) == 32 for d in auth.digests)
    assert not any(k.encode() in b"".join(auth.digests) for k in keys)


def test_serve_refuses_to_start_open_with_a_real_upstream(tmp_path: Path) -> None:
    env = procs.clean_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "orp_proxy.cli", "serve", "--port", "1",
         "--upstream-url", "http://127.0.0.1:9/v1", "--db-path", str(tmp_path / "x.db")],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert "no client authentication is configured" in done.stderr
    assert "Traceback" not in done.stderr
