"""Reading a request's JSON body: limits, and nothing of it kept on the request afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from orp_proxy.errors import ApiError
from orp_proxy.http.request import error_response, read_json_body

LIMIT = 100


async def _echo(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json_body(request, LIMIT)
    except ApiError as exc:
        return error_response(exc)
    # A stream lasts as long as its request: the raw bytes must not stay with it.
    return web.json_response({"body": body, "kept": request._read_bytes is not None})


async def _client(aiohttp_client: AiohttpClient) -> Any:
    app = web.Application()
    app.router.add_post("/", _echo)
    return await aiohttp_client(app)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_body_is_parsed_and_not_kept(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    for data in (b'{"a": 1}', _chunks(b'{"a"', b": 1}")):  # with a length, then chunked
        resp = await client.post("/", data=data, headers={"Content-Type": "application/json"})
        assert await resp.json() == {"body": {"a": 1}, "kept": False}


async def test_chunked_body_over_the_limit_is_413(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    resp = await client.post("/", data=_chunks(b'{"a": "', b"x" * LIMIT, b'"}'),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_content_type_must_be_json(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    resp = await client.post("/", data=b"{}", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert "(got 'text/plain')" in (await resp.json())["error"]["message"]
    resp = await client.post("/", data=b"{}",
                             headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert resp.status == 200
