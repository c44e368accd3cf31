"""Bad input never crashes ORP: random and mutated request bodies over real HTTP.

Every answer must be a 4xx carrying exactly the error object, or (for a body that happens to
be valid) a well-formed 200; never a 5xx and never a connection left hanging. ORP and the mock
upstream run in a thread of their own so that hypothesis drives a plain blocking HTTP client
with a timeout. Run time is bounded: 200 examples per property, no per-example deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import math
import os
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orp_proxy.app import build_app
from orp_proxy.config import Settings
from orp_proxy.upstream.mock import MockUpstream, start_mock_upstream
from tests.conftest import Proxy
from tests.test_e2e_http import error_of

CLIENT_TIMEOUT = 20.0  # a hung connection fails the test instead of hanging it
MAX_BODY = 2 * 1024 * 1024
# ORP_FUZZ_EXAMPLES raises the count for a deeper local run.
FUZZ = settings(max_examples=int(os.environ.get("ORP_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@dataclasses.dataclass
class LiveOrp:
    port: int
    mock: MockUpstream

    def post(self, raw: bytes, content_type: str = "application/json"
             ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request("POST", "/v1/responses", body=raw,
                         headers={"Content-Type": content_type})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def live_orp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveOrp]:
    """ORP (with its store) and a mock upstream on loopback ports, served by another thread."""
    db = Path(tmp_path_factory.mktemp("fuzz")) / "orp.sqlite3"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-orp", daemon=True)
    thread.start()

    def run(coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)  # type: ignore[arg-type]

    async def start() -> tuple[LiveOrp, list[web.AppRunner]]:
        mock, mock_runner, mock_url = await start_mock_upstream()
        # No upstream probe: its first log line comes from this thread at a moment when
        # pytest may have closed the stream it captured for the test then running.
        app = build_app(Settings(upstream_url=mock_url, db_path=str(db), auth_mode="none",
                                 upstream_retries=0, max_body_bytes=MAX_BODY,
                                 upstream_probe_interval=0))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return LiveOrp(runner.addresses[0][1], mock), [runner, mock_runner]

    live, runners = run(start())
    try:
        yield live
    finally:
        for runner in runners:
            run(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def check_answer(status: int, headers: dict[str, str], data: bytes) -> None:
    assert status < 500, (status, data[:300])
    if status >= 400:
        assert 400 <= status < 500
        assert headers["content-type"].startswith("application/json")
        error = error_of(status, data)
        assert isinstance(error["type"], str) and error["type"]
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        return
    assert status == 200, (status, data[:300])
    if headers["content-type"].startswith("text/event-stream"):
        assert data.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(data)["object"] == "response"


def encode(value: Any) -> bytes:
    # Python's encoder writes NaN / Infinity and lone surrogates (as \\udXXX escapes).
    return json.dumps(value).encode()


# -- strategies -------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2 ** 70, -(2 ** 70), 2 ** 63, -(2 ** 63) - 1, 10 ** 300])
ODD_FLOATS = st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324])
STRINGS = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(["", "m", "user", "message", "function", "input_text", "auto", "none",
                     "required", "resp_x", "\x00", "\u202e", "a" * 5000]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(),
                    ODD_FLOATS, STRINGS)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(STRINGS, inner, max_size=4)),
    max_leaves=20,
)
FIELDS = ["model", "input", "previous_response_id", "include", "tools", "tool_choice",
          "metadata", "text", "temperature", "top_p", "presence_penalty", "frequency_penalty",
          "parallel_tool_calls", "stream", "stream_options", "background", "max_output_tokens",
          "max_tool_calls", "reasoning", "safety_identifier", "prompt_cache_key", "truncation",
          "instructions", "store", "service_tier", "top_logprobs", "user", "frobnicate"]

VALID_BODIES: list[dict[str, Any]] = [
    {"model": "m", "input": "hello"},
    {"model": "m", "stream": True, "input": [
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "hi"},
                     {"type": "input_image", "image_url": "https://x/y.png"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
     "tools": [{"type": "function", "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}],
     "tool_choice": {"type": "function", "name": "f"}, "metadata": {"k": "v"},
     "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 64, "store": True},
    {"model": "m", "instructions": "be brief", "input": [{"role": "developer", "content": "x"},
                                                        {"role": "user", "content": "y"}],
     "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
     "reasoning": {"effort": "low"}, "include": ["message.output_text.logprobs"],
     "truncation": "disabled", "store": False},
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Any:
    """A valid body with one value anywhere in it replaced (wrong type, huge number, ...)."""
    body = draw(st.sampled_from(VALID_BODIES))
    path = draw(st.sampled_from(list(_paths(body))))
    return _replace(body, path, draw(JSON_VALUES))


@st.composite
def random_bodies(draw: st.DrawFn) -> Any:
    """Objects with the real field names (and some unknown ones) holding arbitrary values."""
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    body = {name: draw(JSON_VALUES) for name in names}
    if draw(st.booleans()):
        body.setdefault("model", "m")
        body.setdefault("input", "x")
    return body


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """The bytes of a valid body, cut, flipped, or with bytes inserted or deleted."""
    raw = bytearray(encode(draw(st.sampled_from(VALID_BODIES))))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(raw) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            raw[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            raw[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del raw[position:position + draw(st.integers(1, 8))]
        else:
            del raw[position:]
        if not raw:
            break
    return bytes(raw)


# -- properties -------------------------------------------------------------------------------


@FUZZ
@given(body=random_bodies())
def test_random_bodies(live_orp: LiveOrp, body: Any) -> None:
    check_answer(*live_orp.post(encode(body)))


@FUZZ
@given(body=mutated_bodies())
def test_mutated_bodies(live_orp: LiveOrp, body: Any) -> None:
    check_answer(*live_orp.post(encode(body)))


@FUZZ
@given(raw=mutated_bytes())
@example(raw=b"")
@example(raw=b"\xff\xfe\x00")
@example(raw=b'{"model": "m", "input": "\xc3\x28"}')
def test_mutated_bytes(live_orp: LiveOrp, raw: bytes) -> None:
    check_answer(*live_orp.post(raw))


@FUZZ
@given(value=JSON_VALUES)
def test_any_json_document(live_orp: LiveOrp, value: Any) -> None:
    check_answer(*live_orp.post(encode(value)))


# -- a seeded fuzz: lone surrogates and huge numbers anywhere in valid bodies ---------------

SEEDED_BODIES = 300
HUGE_NUMBERS = [2 ** 64, -(2 ** 70), 10 ** 300, 1e308, -1e308, math.inf, 5e-324]


def _param(path: tuple[Any, ...]) -> str:
    """A path as the validator names it: `input[1].content[0].text`."""
    out = ""
    for step in path:
        out = f"{out}[{step}]" if isinstance(step, int) else (f"{out}.{step}" if out else step)
    return out


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _seeded_case(rng: random.Random) -> tuple[Any, str | None]:
    """A valid body with one lone surrogate (in a value or a key) or one huge number put
    somewhere; for a surrogate, the `param` the answer must name."""
    body = rng.choice(VALID_BODIES)
    paths = list(_paths(body))[1:]
    kind = rng.choice(["value", "string", "key", "number"])
    surrogate = chr(rng.randrange(0xD800, 0xE000))
    if kind == "key":
        path = rng.choice([p for p in [(), *paths] if isinstance(_at(body, p), dict)])
        key = rng.choice(["", "k", "type"]) + surrogate
        obj = dict(_at(body, path), **{key: "v"})
        shown = key.encode("utf-8", "backslashreplace").decode()
        return _replace(body, path, obj), f"{_param(path)}.{shown}" if path else shown
    path = rng.choice(paths)
    if kind == "number":
        return _replace(body, path, rng.choice(HUGE_NUMBERS)), None
    old = _at(body, path)
    if kind == "string" and isinstance(old, str):
        cut = rng.randrange(len(old) + 1)
        return _replace(body, path, old[:cut] + surrogate + old[cut:]), _param(path)
    return _replace(body, path, rng.choice(["", "x "]) + surrogate), _param(path)


def test_seeded_fuzz_of_surrogates_and_huge_numbers(live_orp: LiveOrp) -> None:
    rng = random.Random(20261202)
    server_errors: list[tuple[int, bytes]] = []
    for _ in range(SEEDED_BODIES):
        body, param = _seeded_case(rng)
        status, headers, data = live_orp.post(encode(body))
        if status >= 500:
            server_errors.append((status, data[:200]))
            continue
        check_answer(status, headers, data)
        if param is not None:  # a lone surrogate: refused at the edge, naming where it is
            error = error_of(status, data)
            assert (status, error["code"], error["param"]) == (400, "invalid_unicode", param)
    assert server_errors == []


def _deep(depth: int, leaf: str = "1") -> bytes:
    return ('{"model": "m", "input": ' + "[" * depth + leaf + "]" * depth + "}").encode()


PATHOLOGICAL = {
    "empty": (b"", 400),
    "whitespace": (b"  \n ", 400),
    "null": (b"null", 400),
    "array": (b'[{"model": "m", "input": "x"}]', 400),
    "string": (b'"model"', 400),
    "number": (b"42", 400),
    "nested-100k-arrays": (b"[" * 100_000 + b"]" * 100_000, 400),
    "nested-100k-objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400),
    "nested-100k-in-input": (_deep(100_000), 400),
    "nested-900-in-metadata": (b'{"model":"m","input":"x","metadata":{"k":' + b"[" * 900
                               + b"]" * 900 + b"}}", 400),
    "nested-900-in-schema": (b'{"model":"m","input":"x","tools":[{"type":"function",'
                             b'"name":"f","parameters":' + b'{"a":' * 900 + b"{}"
                             + b"}" * 900 + b"}]}", 400),
    "temperature-1e400": (b'{"model": "m", "input": "x", "temperature": 1e400}', 400),
    "temperature-minus-1e400": (b'{"model": "m", "input": "x", "temperature": -1e400}', 400),
    "temperature-nan": (b'{"model": "m", "input": "x", "temperature": NaN}', 400),
    "top-p-infinity": (b'{"model": "m", "input": "x", "top_p": Infinity}', 400),
    # Valid per the spec (no maximum): passed on unchanged, the upstream decides.
    "max-tokens-2**70": (b'{"model": "m", "input": "x", "max_output_tokens": %d}' % 2 ** 70,
                         200),
    "max-tokens-5000-digits": (b'{"model": "m", "input": "x", "max_output_tokens": '
                               + b"9" * 5000 + b"}", 400),
    "max-tokens-float": (b'{"model": "m", "input": "x", "max_output_tokens": 64.5}', 400),
    "schema-infinity": (b'{"model":"m","input":"x","tools":[{"type":"function","name":"f",'
                        b'"parameters":{"maximum":Infinity}}]}', 400),
    "invalid-utf8": (b'{"model": "m", "input": "\xff\xfe"}', 400),
    "overlong-utf8": (b'{"model": "m", "input": "\xc0\xaf"}', 400),
    "lone-surrogate": (b'{"model": "m", "input": "\\ud800 tail"}', 400),
    "lone-low-surrogate-in-model": (b'{"model": "m\\udc00", "input": "x"}', 400),
    "surrogate-pair": (b'{"model": "m", "input": "\\ud83d\\ude00"}', 200),
    "nul-in-string": (b'{"model": "m", "input": "a\\u0000b"}', 200),
    "duplicate-keys": (b'{"model": "m", "input": "x", "stream": true, "stream": false}', 200),
    "duplicate-keys-bad-last": (b'{"model": "m", "input": "x", "input": 5}', 400),
    "unknown-field": (b'{"model": "m", "input": "x", "frobnicate": {"a": [1]}}', 400),
    "huge-metadata-value": (b'{"model": "m", "input": "x", "metadata": {"k": "'
                            + b"v" * 100_000 + b'"}}', 400),
    "many-metadata-keys": (encode({"model": "m", "input": "x",
                                   "metadata": {f"k{i}": "v" for i in range(10_000)}}), 400),
    "trailing-garbage": (b'{"model": "m", "input": "x"} {}', 400),
    "bom": (b'\xef\xbb\xbf{"model": "m", "input": "x"}', 400),
}


@pytest.mark.parametrize(("raw", "expected"), list(PATHOLOGICAL.values()),
                         ids=list(PATHOLOGICAL))
def test_pathological_bodies(live_orp: LiveOrp, raw: bytes, expected: int) -> None:
    status, headers, data = live_orp.post(raw)
    check_answer(status, headers, data)
    assert status == expected, data[:300]


def test_nesting_and_digit_limits_are_explained(live_orp: LiveOrp) -> None:
    for raw, words in ((_deep(100_000), "nested too deeply"),
                       (b'{"model": "m", "input": "x", "max_output_tokens": ' + b"9" * 5000
                        + b"}", "too many digits")):
        status, _, data = live_orp.post(raw)
        error = error_of(status, data)
        assert (status, error["code"]) == (400, "invalid_json") and words in error["message"]
    # Deep but under the parser's limit: the validator's own limit names the place.
    status, _, data = live_orp.post(b'{"model":"m","input":"x","text":{"format":{"type":'
                                    b'"json_schema","name":"s","schema":' + b'{"a":' * 500
                                    + b"{}" + b"}" * 500 + b"}}}")
    error = error_of(status, data)
    assert (status, error["param"]) == (400, "text.format.schema") and "deeply" in error["message"]


def test_enormous_strings(live_orp: LiveOrp) -> None:
    # Over the body limit (413, refused before reading it all), and a string just under it.
    status, headers, data = live_orp.post(b'{"model": "m", "input": "' + b"x" * (MAX_BODY + 10)
                                          + b'"}')
    check_answer(status, headers, data)
    assert status == 413 and error_of(status, data)["code"] == "request_too_large"
    status, headers, data = live_orp.post(
        encode({"model": "m", "input": "x" * (MAX_BODY - 100)}))
    check_answer(status, headers, data)


def test_wrong_content_types(live_orp: LiveOrp) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", ""):
        status, headers, data = live_orp.post(b'{"model": "m", "input": "x"}', content_type)
        check_answer(status, headers, data)
        assert status == 415


# -- configured limits, with clear errors -------------------------------------------------------

StartProxy = Callable[[Settings], Awaitable[Proxy]]


async def test_limits_have_clear_errors(start_proxy: StartProxy, settings: Settings,
                                        mock: MockUpstream) -> None:
    proxy = await start_proxy(dataclasses.replace(settings, max_input_items=3, max_tools=2))
    tool = {"type": "function", "name": "f"}
    cases = [
        ({"input": [{"role": "user", "content": "x"}] * 4}, "input", "array_above_max_length"),
        ({"input": "x", "tools": [dict(tool, name=f"f{i}") for i in range(3)]}, "tools",
         "array_above_max_length"),
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata",
         "object_above_max_properties"),
        ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata.k",
         "string_above_max_length"),
        ({"input": "x", "tools": [dict(tool, parameters=json.loads(
            '{"a":' * 70 + "{}" + "}" * 70))]}, "tools[0].parameters", "invalid_value"),
    ]
    for extra, param, code in cases:
        status, _, data = await proxy.post({"model": "m", **extra})
        error = error_of(status, data)
        assert (status, error["param"], error["code"]) == (400, param, code), error
    # At the limits exactly, all is well.
    ok = {"model": "m", "input": [{"role": "user", "content": "x"}] * 3,
          "tools": [dict(tool, name=f"f{i}") for i in range(2)],
          "metadata": {f"k{i}": "v" * 512 for i in range(16)}}
    status, _, data = await proxy.post(ok)
    assert status == 200, data
    assert not [r for r in mock.requests if len(r.body["messages"]) > 3]
