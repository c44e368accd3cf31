"""The spec's error object and the exception that carries it to the client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Error types from the spec's table (plus OpenAI's names the SDK maps to exceptions).
INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found"
SERVER_ERROR = "server_error"
MODEL_ERROR = "model_error"
TOO_MANY_REQUESTS = "too_many_requests"
AUTHENTICATION = "authentication_error"


# The `code` of an error aiohttp raised itself (unknown route, wrong method, body too large), for
# the error body and the access line alike.
HTTP_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
                    405: "method_not_allowed", 413: "request_too_large"}


class ApiError(Exception):
    """An error that becomes `{"error": {message, type, param, code}}` with an HTTP status.

    Raised on the request path before a response starts; the error middleware turns it into
    the HTTP error response, the WebSocket transport into its error envelope. (Failures once a
    response has started are the transcoder's `fail`: an `error` event, then `response.failed`.)
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        """The inner error object (as used by the `error` streaming event)."""
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}

    def body(self) -> dict[str, Any]:
        """The whole JSON body of an HTTP error response."""
        return {"error": self.payload()}

    def __repr__(self) -> str:
        return (f"ApiError({self.status}, {self.message!r}, param={self.param!r}, "
                f"code={self.code!r})")


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """Shorthand for a 400 `invalid_request_error` naming the offending parameter path."""
    return ApiError(400, message, param=param, code=code)
