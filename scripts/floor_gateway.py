#!/usr/bin/env python3
"""The stack floor: ORP's mandated stack (aiohttp server, one aiohttp ClientSession, uvloop,
ujson) doing the least a Responses-to-Chat gateway can, for `scripts/bench` to measure beside
ORP with the same load. What this process costs is what the stack costs before a gateway does
anything of its own; ORP's figures minus its figures are ORP's own work.

POST /v1/responses parses the JSON body, posts a streaming chat completion of its `input`
(`max_output_tokens` as `max_tokens`) to the upstream, and relays the answer one write per
upstream read, whole lines only, each token chunk marked with the text the bench's load
generator counts a Responses text delta by. No validation, no store, no Responses events: a
measuring stick, not a gateway.

    python scripts/floor_gateway.py --upstream http://127.0.0.1:9000/v1 --port 8081
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import ujson
import uvloop
from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web

HOST = "127.0.0.1"
SESSION = web.AppKey("floor_session", ClientSession)
CHAT_URL = web.AppKey("floor_chat_url", str)
JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {"Content-Type": "text/event-stream"}
# A token chunk's delta (the role chunk's delta starts with "role"), and the same with the
# `type` value the bench counts tokens by (`RESPONSES_DELTA` in scripts/bench.py).
TOKEN = b'"delta":{"content":'
MARKED = b'"type":"response.output_text.delta","delta":{"content":'


async def relay(request: web.Request) -> web.StreamResponse:
    """The request as a streaming chat completion, its answer relayed read by read."""
    body = ujson.loads(await request.read())
    chat: dict[str, Any] = {"model": body["model"], "stream": True,
                            "messages": [{"role": "user", "content": body["input"]}]}
    if "max_output_tokens" in body:
        chat["max_tokens"] = body["max_output_tokens"]
    app = request.app
    async with app[SESSION].post(app[CHAT_URL], data=ujson.dumps(chat),
                                 headers=JSON_HEADERS) as upstream:
        response = web.StreamResponse(status=upstream.status, headers=SSE_HEADERS)
        await response.prepare(request)
        rest = b""  # a line the last read cut, kept for the next
        async for data in upstream.content.iter_any():
            if rest:
                data = rest + data
            end = data.rfind(b"\n") + 1
            data, rest = data[:end], data[end:]
            if data:
                await response.write(data.replace(TOKEN, MARKED))
        await response.write_eof(rest)
    return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = ClientSession(connector=TCPConnector(limit=0), cookie_jar=DummyCookieJar())
    yield
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    """The relay to the Chat Completions API at `upstream` (a base URL ending in /v1)."""
    app = web.Application()
    app[CHAT_URL] = upstream.rstrip("/") + "/chat/completions"
    app.router.add_post("/v1/responses", relay)
    app.cleanup_ctx.append(_session)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="Chat Completions base URL (.../v1)")
    parser.add_argument("--port", type=int, required=True, help=f"port to listen on ({HOST})")
    args = parser.parse_args(argv)
    # The backlog ORP's serve has: a burst of connects must not wait for SYN retransmits.
    web.run_app(build_app(args.upstream), host=HOST, port=args.port, backlog=2048,
                access_log=None, print=None, shutdown_timeout=1.0,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
