"""The error middleware: every failure leaves as the spec's error object, never a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from orp_proxy.errors import HTTP_ERROR_CODES, INVALID_REQUEST, NOT_FOUND, SERVER_ERROR, ApiError
from orp_proxy.http.request import error_response
from orp_proxy.http.sse import STREAM_STARTED

log = logging.getLogger("orp.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the spec's error object; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = NOT_FOUND if exc.status == 404 else INVALID_REQUEST
        if exc.status >= 500:
            kind = SERVER_ERROR
        message = f"{exc.reason}: {request.method} {request.path}" if exc.status in (404, 405) \
            else exc.reason
        return error_response(ApiError(exc.status, message, type=kind,
                                       code=HTTP_ERROR_CODES.get(exc.status),
                                       headers={k: v for k, v in exc.headers.items()
                                                if k == "Allow"}))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if request.get(STREAM_STARTED):
            raise  # headers and events are out: aiohttp closes the connection instead
        return error_response(ApiError(500, "The gateway failed unexpectedly.",
                                       type=SERVER_ERROR, code="internal_error"))
