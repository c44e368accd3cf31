"""The Chat Completions backend: opening a streamed request and reading its chunks.

Errors before the response body starts become `ApiError`s with the HTTP status the client should
see; errors while reading the body become `UpstreamStreamError`s, which the handler turns into an
`error` event and `response.failed`.

Retries. Only a request the upstream provably did not act on is sent again, and only before any
byte reached the client: a connection that could not be opened (refused, DNS failure, connect
timeout: the request was never sent) and an explicit refusal (429, 503: the server says it did
no work). A 500, a dropped connection or a read timeout after the request went out may already
have cost tokens or started a side effect, so they are never retried. Waits are exponential with
jitter (half fixed, half random, so retrying clients spread out), a `Retry-After` is honoured, and
the total wait of one request is capped; a `Retry-After` beyond the cap is handed to the client.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import ujson

from orp_proxy.errors import (
    AUTHENTICATION,
    INVALID_REQUEST,
    NOT_FOUND,
    SERVER_ERROR,
    TOO_MANY_REQUESTS,
    ApiError,
)
from orp_proxy.protocol.chunks import PlainText
from orp_proxy.protocol.media import media_type
from orp_proxy.protocol.sse_lines import DONE, LineTooLong, SSELineBuffer

log = logging.getLogger("orp.upstream")

_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 500
# A message is cut to this before it is scrubbed (scrubbing megabytes would stall the event
# loop), and only cut to _MESSAGE_LIMIT after, so what scrubbing shortens is refilled.
_SCRUB_LIMIT = 4 * _MESSAGE_LIMIT
# After `[DONE]` some servers end the body a little later (the chunked terminator in a
# separate write). Reading on to the end in the background, this long and this much at most,
# lets the connection go back to the pool instead of being closed.
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 64 * 1024

Scrub = Callable[[str], str]


class UpstreamStreamError(Exception):
    """The upstream failed after its body had started."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _parsed(body: object) -> object:
    if isinstance(body, bytes):
        try:
            return ujson.loads(body)
        except ValueError:
            return None
    return body


def is_error_document(document: Any) -> bool:
    """An OpenAI-style `{"error": ...}` or vLLM's bare `{"object": "error", ...}`."""
    return isinstance(document, dict) and bool(
        document.get("error") or document.get("object") == "error")


# How servers say "the input does not fit the model's context": OpenAI's code, llama.cpp's type,
# LiteLLM's exception name, and the sentence OpenAI and vLLM both write.
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_WORDS = ("ContextWindowExceededError", "maximum context length",
                  "exceeds the available context size", "context_length_exceeded")


def _context_overflow(body: object) -> bool:
    body = _parsed(body)
    if not isinstance(body, dict):
        return False
    error = body.get("error")
    fields = error if isinstance(error, dict) else body
    if any(fields.get(key) in _CONTEXT_CODES for key in ("code", "type")):
        return True
    message = fields.get("message") if isinstance(error, dict) or error is None else error
    return isinstance(message, str) and any(w in message[:_SCRUB_LIMIT] for w in _CONTEXT_WORDS)


def _context_error(detail: str | None) -> ApiError:
    suffix = f": {detail}" if detail else ""
    return ApiError(400, f"The input does not fit the model's context window{suffix}",
                    type=INVALID_REQUEST, param="input", code="context_length_exceeded")


def _error_message(body: object, scrub: Scrub | None = None) -> str | None:
    """The `error.message` of an OpenAI-style error body (raw bytes, or already parsed), if it
    is one; never raw HTML. `scrub` (if given) removes what clients must not see."""
    body = _parsed(body)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
    elif isinstance(error, str):
        message = error
    else:
        message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        return None
    if scrub is not None:
        if len(message) > _SCRUB_LIMIT:
            # A key or host name the cut splits may be too short for any pattern; every
            # pattern's match ends at whitespace, so the last word of what is kept goes too.
            kept = message[:_SCRUB_LIMIT].rsplit(None, 1)
            message = kept[0] if len(kept) == 2 else ""
        message = scrub(message)
    return message[:_MESSAGE_LIMIT]


def status_error(status: int, raw: bytes, headers: Any, scrub: Scrub | None = None) -> ApiError:
    """The client-facing error for an upstream HTTP error status."""
    body = _parsed(raw)
    detail = _error_message(body, scrub)
    suffix = f": {detail}" if detail else ""
    if status in (400, 413, 422) and _context_overflow(body):
        return _context_error(detail)
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
    if status == 503:
        # 502 like every upstream 5xx (the mapping clients were promised), but with a code and
        # the upstream's Retry-After, so a client can tell "come back later" from a crash.
        retry = {"Retry-After": headers["Retry-After"]} if "Retry-After" in headers else None
        return ApiError(502, f"The upstream model server is unavailable or overloaded{suffix}",
                        type=SERVER_ERROR, code="upstream_overloaded", headers=retry)
    return ApiError(502, f"The upstream model server failed with HTTP {status}{suffix}",
                    type=SERVER_ERROR, code="upstream_error")


def _not_a_completion() -> UpstreamStreamError:
    return UpstreamStreamError("upstream_bad_response",
                               "The upstream answered with JSON that is not a completion")


def completion_as_chunk(completion: Any) -> dict[str, Any]:
    """A non-streamed `chat.completion` (servers that ignore `stream`) as one big chunk.

    Only the shape this conversion relies on is checked here; the transcoder checks the rest
    as it does for streamed chunks."""
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise _not_a_completion()
    choices = []
    for choice in completion["choices"][:1]:
        if not isinstance(choice, dict):
            raise _not_a_completion()
        message = choice.get("message")
        if message is None:
            message = {}
        elif not isinstance(message, dict):
            raise _not_a_completion()
        delta = dict(message)
        calls = delta.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise _not_a_completion()
            delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
        choices.append({"index": 0, "delta": delta,
                        "finish_reason": choice.get("finish_reason")})
    return {"choices": choices, "usage": completion.get("usage")}


class UpstreamStream:
    """An open upstream response whose body is read as batches of decoded chunks."""

    def __init__(self, response: aiohttp.ClientResponse, max_line_bytes: int,
                 scrub: Scrub | None = None,
                 draining: set[asyncio.Task[None]] | None = None) -> None:
        self.response = response
        # Where `release` keeps its background read of the body's end; None: no such read,
        # an unfinished body's connection is closed.
        self._draining = draining
        self._lines = SSELineBuffer(max_line_bytes)
        # A non-streamed answer is one JSON document: held to the bound of one stream line.
        self._max_json = max_line_bytes
        self._scrub = scrub
        self._json = not media_type(response.headers.get("Content-Type")).startswith(
            "text/event-stream")
        self.saw_done = False
        self._released = False
        # Called once when the stream is released or closed (the router's in-flight count).
        self.on_done: Callable[[], None] | None = None
        # Which configured deployment answers (`upstream/model`), for the access line.
        self.deployment: str | None = None

    def body_arrived(self) -> bool:
        """Whether some of the streamed body is already here, waiting to be read."""
        return not self._json and self.response.content.total_bytes > 0

    def _done(self) -> None:
        done, self.on_done = self.on_done, None
        if done is not None:
            done()

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Per network read, the chunks it completed (possibly none). Stops at `[DONE]`.

        A chunk is a decoded `chat.completion.chunk`, or a 1-tuple `(text,)` for a plain text
        chunk that `protocol.chunks.PlainText` decoded without building the whole object."""
        if self._json:
            document = await self._read_json()
            if is_error_document(document):  # an error, though the status said 200
                raise stream_failure(document, self._scrub)
            yield [completion_as_chunk(document)]
            self.saw_done = True
            return
        lines = self._lines
        loads = ujson.loads
        plain = PlainText()
        payload = b""
        # `readany` straight, not `iter_any()`: one coroutine less per read, and one less
        # frame held by every open stream while it waits.
        readany = self.response.content.readany
        try:
            while data := await readany():
                batch: list[Any] = []
                try:
                    for payload in lines.feed(data):
                        text = plain.text(payload)
                        if text is not None:
                            batch.append((text,))  # see `Transcoder.feed`
                            continue
                        if payload == DONE:
                            self.saw_done = True
                            break
                        chunk = loads(payload)
                        if isinstance(chunk, dict) and (chunk.get("error")
                                                        or chunk.get("object") == "error"):
                            raise stream_failure(chunk, self._scrub)
                        plain.learn(payload, chunk)
                        batch.append(chunk)
                except (ValueError, UpstreamStreamError):
                    if batch:
                        yield batch  # the chunks before the bad one in this read still count
                    raise
                yield batch
                if self.saw_done:
                    return
                # The next read may be a model's think away: meanwhile nothing of this one
                # (its bytes, its chunks) stays referenced (memory per open stream).
                del batch
                data = payload = b""
                chunk = None
            tail = []
            try:
                for payload in lines.flush():
                    if payload == DONE:  # `data: [DONE]` without its final newline
                        self.saw_done = True
                        break
                    tail.append(loads(payload))
            except ValueError:
                if tail:
                    yield tail
                raise
            if tail:
                yield tail
        except LineTooLong as exc:
            raise UpstreamStreamError("upstream_line_too_long", str(exc)) from None
        except ValueError:
            # Classified only here, on the failure path, to keep the per-chunk path lean.
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise UpstreamStreamError("upstream_invalid_utf8",
                                          "The upstream sent a chunk that is not valid UTF-8"
                                          ) from None
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
        limit = self._max_json
        too_large = UpstreamStreamError(
            "upstream_bad_response",
            f"The upstream's JSON answer is larger than the limit of {limit} bytes")
        length = self.response.content_length
        if length is not None and length > limit:
            raise too_large
        try:
            parts = []
            size = 0
            async for data in self.response.content.iter_any():
                size += len(data)
                if size > limit:
                    raise too_large
                parts.append(data)
            return ujson.loads(b"".join(parts))
        except ValueError:
            raise UpstreamStreamError("upstream_bad_response",
                                      "The upstream answered with invalid JSON") from None
        except (TimeoutError, aiohttp.ClientError):
            raise UpstreamStreamError("upstream_connection_lost",
                                      "The connection to the upstream was lost") from None

    def release(self) -> None:
        """Give the connection back to the pool once the body was read (up to `[DONE]`).

        Returns at once: a body whose end has not arrived yet is read to its end in the
        background (bounded), and the connection is closed if it does not end in time."""
        if self._released:
            return
        self._released = True
        self._done()
        response = self.response
        draining = self._draining
        if draining is None or response.connection is None or response.content.at_eof():
            response.release()  # aiohttp keeps the connection only if the body ended
            return
        task = asyncio.get_running_loop().create_task(_drain_then_release(response))
        draining.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(draining.discard)

    def close(self) -> None:
        """Drop the connection at once; a no-op after `release`."""
        if not self._released:
            self.response.close()
            self._done()


async def _read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """An error body, up to `_ERROR_BODY_LIMIT` (`read(n)` returns what one read brought: a
    body split over several reads would lose its end, and the message with it)."""
    parts: list[bytes] = []
    size = 0
    try:
        while size < _ERROR_BODY_LIMIT:
            data = await response.content.read(_ERROR_BODY_LIMIT - size)
            if not data:
                break
            parts.append(data)
            size += len(data)
    except (TimeoutError, aiohttp.ClientError):
        pass  # what arrived may still hold the message
    return b"".join(parts)


async def _drain_then_release(response: aiohttp.ClientResponse) -> None:
    """Read what is left of a body after `[DONE]`, then pool the connection; close it if the
    rest is too long, too slow or broken."""
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            left = _DRAIN_BYTES
            while left >= 0:
                data = await response.content.readany()
                if not data:
                    response.release()
                    return
                left -= len(data)
    except asyncio.CancelledError:
        response.close()
        raise
    except Exception as exc:  # the body is abandoned either way; nothing to report
        log.debug("closing an upstream connection whose body did not end: %r", exc)
    response.close()


def _stream_error(chunk: dict[str, Any], scrub: Scrub | None) -> str:
    message = _error_message(chunk, scrub)
    return f"The upstream reported an error: {message}" if message else (
        "The upstream reported an error")


def stream_failure(document: dict[str, Any], scrub: Scrub | None) -> UpstreamStreamError:
    """The failure for an error the upstream sent in its body (a chunk, or a JSON answer)."""
    if _context_overflow(document):
        error = _context_error(_error_message(document, scrub))
        return UpstreamStreamError(error.code or "", error.message)
    return UpstreamStreamError("upstream_error", _stream_error(document, scrub))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header (delay-seconds or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before sending a refused request again."""

    retries: int = 0
    backoff: float = 0.25
    max_wait: float = 8.0

    def delay(self, attempt: int, retry_after: float | None, waited: float) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up now."""
        if attempt >= self.retries:
            return None
        budget = self.max_wait - waited
        base = self.backoff * 2 ** attempt
        jittered = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            if retry_after > budget:
                return None
            # At least what the server asked for; the jitter keeps retrying clients apart.
            return min(retry_after + random.uniform(0, base / 2), budget)
        return jittered if jittered <= budget else None


class UpstreamFailure(Exception):
    """One attempt failed before the upstream's body started, in a way another deployment of
    the same model could answer instead: the connection failed (`status` None), or the
    upstream answered 429 or 5xx. Carries the error the client would get.

    `refused`: the upstream provably did no work (connect error, 429, 503), so even the same
    upstream may be asked again (see the module docstring)."""

    def __init__(self, error: ApiError, retry_after: float | None = None, *,
                 status: int | None = None, refused: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.status = status
        self.refused = refused


class UpstreamClient:
    """Sends Chat Completions requests over the worker's one `ClientSession`.

    `base_url` ends with the API version (`.../v1`); `authorization` is the header ORP's own
    key makes (None without a key); `scrub` cleans upstream error messages before clients see
    them (None: verbatim). `close()` before closing the session.
    """

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None,
                 *, max_line_bytes: int, retry: RetryPolicy | None = None,
                 scrub: Scrub | None = None, connect_timeout: float | None = None,
                 timeout: aiohttp.ClientTimeout | None = None) -> None:
        self.session = session
        self.base_url = base_url
        self.url = self.endpoint("chat/completions")
        self.authorization = f"Bearer {api_key}" if api_key else None
        self._max_line = max_line_bytes
        self.retry = retry or RetryPolicy()
        self._scrub = scrub
        self._connect_timeout = connect_timeout
        # Per-request timeouts (one upstream of several); None: the session's.
        self._timeout = timeout
        self._draining: set[asyncio.Task[None]] = set()

    @property
    def scrub(self) -> Scrub | None:
        """What cleans this upstream's error messages for clients (None: verbatim)."""
        return self._scrub

    def endpoint(self, name: str) -> str:
        """The URL of `name` (`models`, `chat/completions`) under the base URL; a query on
        the base URL (e.g. `?api-version=`) is kept."""
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))

    async def close(self) -> None:
        """Stop reading the ends of finished bodies (their connections are closed)."""
        tasks = list(self._draining)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def open(self, chat: dict[str, Any], *, request_id: str | None = None,
                   authorization: str | None = None) -> UpstreamStream:
        """POST the body; returns once the upstream answered 200 with its headers.

        `authorization` is the client's own `Authorization` header in pass-through mode: it
        replaces ORP's key, and an upstream 401/403 then means the client's key is bad.
        Refused attempts are retried per `self.retry` (see the module docstring).
        """
        data, headers = self._request(chat, request_id, authorization)
        waited = 0.0
        attempt = 0
        while True:
            try:
                return await self._attempt(data, headers, client_key=authorization is not None)
            except UpstreamFailure as refused:
                if not refused.refused:
                    raise refused.error from None
                delay = self.retry.delay(attempt, refused.retry_after, waited)
                if delay is None:
                    raise refused.error from None
                attempt += 1
                log.warning("upstream refused request %s (%s); retry %d of %d in %.2f s",
                            request_id or "-", refused.error.code, attempt, self.retry.retries,
                            delay)
                await asyncio.sleep(delay)
                waited += delay

    async def attempt(self, chat: dict[str, Any], *, request_id: str | None = None,
                      authorization: str | None = None) -> UpstreamStream:
        """One try, no retries: `UpstreamFailure` when another upstream could answer instead,
        `ApiError` when not (the request itself was refused, or may have been acted on)."""
        data, headers = self._request(chat, request_id, authorization)
        return await self._attempt(data, headers, client_key=authorization is not None)

    def _request(self, chat: dict[str, Any], request_id: str | None,
                 authorization: str | None) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        auth = authorization or self.authorization
        if auth:
            headers["Authorization"] = auth
        if request_id:
            headers["X-Request-Id"] = request_id
        text = ujson.dumps(chat, ensure_ascii=False, escape_forward_slashes=False)
        try:
            data = text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (a valid `\ud800` escape in the client's JSON) is not UTF-8;
            # as an escape it is still valid JSON.
            data = ujson.dumps(chat, ensure_ascii=True, escape_forward_slashes=False).encode()
        return data, headers

    async def _attempt(self, data: bytes, headers: dict[str, str], *, client_key: bool
                       ) -> UpstreamStream:
        try:
            if self._timeout is None:
                response = await self.session.post(self.url, data=data, headers=headers)
            else:
                response = await self.session.post(self.url, data=data, headers=headers,
                                                   timeout=self._timeout)
        except aiohttp.ConnectionTimeoutError:
            within = (f" within {self._connect_timeout:g} s" if self._connect_timeout else "")
            raise UpstreamFailure(ApiError(504, "The upstream model server did not accept a "
                                           f"connection{within}", type=SERVER_ERROR,
                                           code="upstream_connect_timeout")) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ApiError(504, "The upstream model server did not answer in time",
                           type=SERVER_ERROR, code="upstream_timeout") from None
        except aiohttp.ClientSSLError:
            # Not sent again to the same server, but another one may do better.
            raise UpstreamFailure(ApiError(502, "The upstream model server's TLS connection "
                                           "failed", type=SERVER_ERROR,
                                           code="upstream_unavailable"),
                                  refused=False) from None
        except aiohttp.ClientConnectorError:
            raise UpstreamFailure(ApiError(502, "The upstream model server cannot be reached",
                                           type=SERVER_ERROR, code="upstream_unavailable")
                                  ) from None
        except aiohttp.ClientError:
            # The request may have been received: not sent to this server again, but with no
            # answer at all another one may take it (like a 5xx).
            raise UpstreamFailure(ApiError(502, "The connection to the upstream model server "
                                           "failed", type=SERVER_ERROR,
                                           code="upstream_unavailable"),
                                  refused=False) from None
        if response.status != 200:
            try:
                raw = await _read_error_body(response)
            finally:
                response.close()
            if client_key and response.status in (401, 403):
                raise ApiError(401, "The API key was rejected by the upstream model server.",
                               type=AUTHENTICATION, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            error = status_error(response.status, raw, response.headers, self._scrub)
            status = response.status
            if status == 429 or status >= 500:
                raise UpstreamFailure(
                    error, retry_after_seconds(response.headers.get("Retry-After")),
                    status=status, refused=status in (429, 503))
            raise error
        content_type = media_type(response.headers.get("Content-Type"))
        if not (content_type.startswith("text/event-stream") or content_type.endswith("json")):
            response.close()
            raise ApiError(502, "The upstream model server answered with an unexpected "
                           f"content type ({content_type or 'none'})", type=SERVER_ERROR,
                           code="upstream_bad_response")
        return UpstreamStream(response, self._max_line, self._scrub, self._draining)
