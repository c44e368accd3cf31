"""The Chat Completions backend: opening a streamed request and reading its chunks.

Errors before the response body starts become `ApiError`s with the HTTP status the client should
see; errors while reading the body become `UpstreamStreamError`s, which the handler turns into an
`error` event and `response.failed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ujson

from .errors import INVALID_REQUEST, NOT_FOUND, SERVER_ERROR, TOO_MANY_REQUESTS, ApiError
from .sse_lines import DONE, LineTooLong, SSELineBuffer

_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 500


class UpstreamStreamError(Exception):
    """The upstream failed after its body had started."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error_message(raw: bytes) -> str | None:
    """The `error.message` of an OpenAI-style error body, if it is one; never raw HTML."""
    try:
        body = ujson.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
    elif isinstance(error, str):
        message = error
    else:
        message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        return None
    return message[:_MESSAGE_LIMIT]


def status_error(status: int, raw: bytes, headers: Any) -> ApiError:
    """The client-facing error for an upstream HTTP error status."""
    detail = _error_message(raw)
    suffix = f": {detail}" if detail else ""
    if status == 429:
        retry = {"Retry-After": headers["Retry-After"]} if "Retry-After" in headers else None
        return ApiError(429, f"The upstream model server is rate limiting requests{suffix}",
                        type=TOO_MANY_REQUESTS, code="rate_limit_exceeded", headers=retry)
    if status in (400, 422):
        return ApiError(400, f"The upstream model server rejected the request{suffix}",
                        type=INVALID_REQUEST, code="upstream_rejected_request")
    if status == 404:
        return ApiError(404, f"The upstream model server does not know this model{suffix}",
                        type=NOT_FOUND, param="model", code="model_not_found")
    if status == 413:
        return ApiError(413, "The request is too large for the upstream model server",
                        type=INVALID_REQUEST, code="request_too_large")
    if status in (401, 403):
        # Our own upstream credential was refused: not the client's fault, and never echoed.
        return ApiError(502, "The upstream model server refused the gateway's credentials",
                        type=SERVER_ERROR, code="upstream_auth_failed")
    if status in (408, 504):
        return ApiError(504, "The upstream model server timed out", type=SERVER_ERROR,
                        code="upstream_timeout")
    return ApiError(502, f"The upstream model server failed with HTTP {status}{suffix}",
                    type=SERVER_ERROR, code="upstream_error")


def completion_as_chunk(completion: Any) -> dict[str, Any]:
    """A non-streamed `chat.completion` (servers that ignore `stream`) as one big chunk."""
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise UpstreamStreamError("upstream_bad_response",
                                  "The upstream answered with JSON that is not a completion")
    choices = []
    for choice in completion["choices"][:1]:
        message = dict(choice.get("message") or {})
        calls = message.get("tool_calls")
        if calls:
            message["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
        choices.append({"index": 0, "delta": message,
                        "finish_reason": choice.get("finish_reason")})
    return {"choices": choices, "usage": completion.get("usage")}


class UpstreamStream:
    """An open upstream response whose body is read as batches of decoded chunks."""

    def __init__(self, response: aiohttp.ClientResponse, max_line_bytes: int) -> None:
        self.response = response
        self._lines = SSELineBuffer(max_line_bytes)
        self._json = not response.content_type.startswith("text/event-stream")
        self.saw_done = False

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Per network read, the chunks it completed (possibly none). Stops at `[DONE]`."""
        if self._json:
            yield [completion_as_chunk(await self._read_json())]
            self.saw_done = True
            return
        lines = self._lines
        loads = ujson.loads
        try:
            async for data in self.response.content.iter_any():
                batch = []
                for payload in lines.feed(data):
                    if payload == DONE:
                        self.saw_done = True
                        break
                    chunk = loads(payload)
                    if isinstance(chunk, dict) and chunk.get("error"):
                        raise UpstreamStreamError("upstream_error", _stream_error(chunk))
                    batch.append(chunk)
                yield batch
                if self.saw_done:
                    return
            tail = [loads(p) for p in lines.flush() if p != DONE]
            if tail:
                yield tail
        except LineTooLong as exc:
            raise UpstreamStreamError("upstream_line_too_long", str(exc)) from None
        except ValueError:
            raise UpstreamStreamError("upstream_invalid_json",
                                      "The upstream sent a chunk that is not valid JSON") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamStreamError("upstream_timeout",
                                      "The upstream stopped sending within the read timeout"
                                      ) from None
        except aiohttp.ClientError:
            raise UpstreamStreamError("upstream_connection_lost",
                                      "The connection to the upstream was lost mid-stream"
                                      ) from None

    async def _read_json(self) -> Any:
        try:
            raw = await self.response.read()
            return ujson.loads(raw)
        except ValueError:
            raise UpstreamStreamError("upstream_bad_response",
                                      "The upstream answered with invalid JSON") from None
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamStreamError("upstream_connection_lost",
                                      "The connection to the upstream was lost") from None

    def release(self) -> None:
        """Give the connection back to the pool (aiohttp closes it if the body is unfinished)."""
        self.response.release()

    def close(self) -> None:
        """Drop the connection at once; a no-op after `release`."""
        self.response.close()


def _stream_error(chunk: dict[str, Any]) -> str:
    message = _error_message(ujson.dumps(chunk).encode())
    return f"The upstream reported an error: {message}" if message else (
        "The upstream reported an error")


class UpstreamClient:
    """Sends Chat Completions requests over the worker's one `ClientSession`."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None,
                 *, max_line_bytes: int) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._auth = f"Bearer {api_key}" if api_key else None
        self._max_line = max_line_bytes

    async def open(self, chat: dict[str, Any], *, request_id: str | None = None,
                   authorization: str | None = None) -> UpstreamStream:
        """POST the body; returns once the upstream answered 200 with its headers."""
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        auth = authorization or self._auth
        if auth:
            headers["Authorization"] = auth
        if request_id:
            headers["X-Request-Id"] = request_id
        data = ujson.dumps(chat, ensure_ascii=False, escape_forward_slashes=False).encode()
        try:
            response = await self.session.post(self.url, data=data, headers=headers)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ApiError(504, "The upstream model server did not answer in time",
                           type=SERVER_ERROR, code="upstream_timeout") from None
        except aiohttp.ClientError:
            raise ApiError(502, "The upstream model server cannot be reached",
                           type=SERVER_ERROR, code="upstream_unavailable") from None
        if response.status != 200:
            try:
                raw = await response.content.read(_ERROR_BODY_LIMIT)
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                response.close()
            raise status_error(response.status, raw, response.headers)
        content_type = response.content_type
        if not (content_type.startswith("text/event-stream") or content_type.endswith("json")):
            response.close()
            raise ApiError(502, "The upstream model server answered with an unexpected "
                           f"content type ({content_type or 'none'})", type=SERVER_ERROR,
                           code="upstream_bad_response")
        return UpstreamStream(response, self._max_line)
