"""Client authentication: gateway keys, pass-through bearer tokens, or none (development).

`keys`: clients present one of the operator's gateway keys; ORP calls the upstream with its own
key. `passthrough`: the client's bearer token is forwarded upstream, which decides (its 401/403
becomes our 401); requests that only read or delete stored responses never reach the upstream,
so for them the token is first checked with `GET {upstream}/models` (`TokenCheck`, cached for
`ORP_PASSTHROUGH_CHECK_TTL`): a revoked key loses its stored data with its upstream access.
`none`: anyone may call; for local development only, and said so at start-up.

Keys are kept only as SHA-256 digests and a presented key is compared against every one of them
with `hmac.compare_digest`, so the time taken reveals neither which key matched nor how much of
one did. Stored responses belong to `store.owner_id(credential)`, a keyed hash of the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from orp_proxy.config import ConfigError, Settings, read_secret_file, secret_path
from orp_proxy.errors import AUTHENTICATION, SERVER_ERROR, ApiError
from orp_proxy.state import GATEWAY

log = logging.getLogger("orp.auth")

MODES = ("keys", "passthrough", "none")
# Probes must work without a key (orchestrators do not send one).
PUBLIC_PATHS = frozenset({"/livez", "/readyz"})
METRICS_PATH = "/metrics"
# Shorter keys are accepted but warned about: they can be guessed.
_SHORT_KEY = 16

UPSTREAM_AUTHORIZATION = web.RequestKey("orp_upstream_authorization", str)
"""In pass-through mode, the `Authorization` header to send upstream for this request."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        return token
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_api_keys(settings: Settings) -> list[str]:
    """Gateway keys from ORP_API_KEYS and ORP_API_KEYS_FILE (or the systemd credential
    `api_keys`), in that order, without duplicates."""
    keys = [k.strip() for k in (settings.api_keys or "").split(",")]
    path = secret_path(settings.api_keys_file, "api_keys")
    if path is not None:
        lines = read_secret_file(path, "the API keys file").splitlines()
        keys.extend(line.strip() for line in lines if not line.lstrip().startswith("#"))
    unique = list(dict.fromkeys(k for k in keys if k))
    for number, key in enumerate(unique, 1):
        # The key itself never appears in an error: only its position.
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError(f"API key number {number} contains spaces or control characters")
    return unique


@dataclass(frozen=True)
class Authenticator:
    """The resolved mode and the digests of the gateway keys."""

    mode: str
    digests: tuple[bytes, ...] = ()
    metrics_public: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Resolve the mode (see ORP_AUTH_MODE) and load the keys; ConfigError if unusable."""
        keys = load_api_keys(settings)
        mode = settings.auth_mode
        if mode is None:
            if keys:
                mode = "keys"
            elif settings.mock_upstream:
                mode = "none"  # the demo with the bundled mock upstream
            else:
                raise ConfigError(
                    "no client authentication is configured: set ORP_API_KEYS or "
                    "ORP_API_KEYS_FILE (gateway keys), or choose ORP_AUTH_MODE=passthrough, or "
                    "ORP_AUTH_MODE=none for local development")
        if mode not in MODES:
            raise ConfigError(f"ORP_AUTH_MODE must be one of {', '.join(MODES)}")
        if mode == "keys" and not keys:
            raise ConfigError("ORP_AUTH_MODE=keys needs at least one key in ORP_API_KEYS or "
                              "ORP_API_KEYS_FILE")
        short = sum(len(k) < _SHORT_KEY for k in keys)
        if short:
            log.warning("%d API key(s) shorter than %d characters: use long random keys",
                        short, _SHORT_KEY)
        return cls(mode, tuple(_digest(k) for k in keys), settings.metrics_public)

    def is_gateway_key(self, token: str | None) -> bool:
        """Whether `token` is one of the gateway keys, in time independent of which."""
        if token is None or not self.digests:
            return False
        presented = _digest(token)
        found = False
        for known in self.digests:
            # No early exit: every key is compared whatever the outcome.
            found |= hmac.compare_digest(presented, known)
        return found


AUTH = web.AppKey("orp_auth", Authenticator)

# Routes that serve the store without calling the upstream (GET, DELETE; input items).
STORE_ROUTES = frozenset({"/v1/responses/{response_id}",
                          "/v1/responses/{response_id}/input_items",
                          "/v1/responses/{response_id}/cancel"})
_CHECK_TIMEOUT = 10.0
_CHECK_CACHE_SIZE = 10_000


class TokenCheck:
    """Pass-through mode: does the upstream still accept a client's token? One `GET
    {upstream}/models` with it, the answer kept for `ttl` seconds (by the token's digest, at
    most 10,000 tokens); concurrent checks of one token share a request."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._known: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._running: dict[bytes, asyncio.Task[bool]] = {}

    async def accepted(self, app: web.Application, token: str) -> bool:
        """True if the upstream accepts `token`; ApiError 502 when it cannot tell."""
        key = _digest(token)
        known = self._known.get(key)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(app, token))
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        accepted = await asyncio.shield(task)
        self._known[key] = (accepted, time.monotonic() + self.ttl)
        self._known.move_to_end(key)
        while len(self._known) > _CHECK_CACHE_SIZE:
            self._known.popitem(last=False)
        return accepted

    def _finished(self, key: bytes, task: asyncio.Task[bool]) -> None:
        self._running.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone

    async def _ask(self, app: web.Application, token: str) -> bool:
        upstream = app[GATEWAY].upstream
        try:
            async with upstream.session.get(
                    upstream.endpoint("models"), headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=_CHECK_TIMEOUT)) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _cannot_check(f"the upstream could not be reached ({type(exc).__name__})") \
                from None
        if status in (401, 403):
            return False
        if 200 <= status < 300:
            return True
        raise _cannot_check(f"the upstream answered GET /models with HTTP {status}")


def _cannot_check(reason: str) -> ApiError:
    # Fail closed: without the upstream's word, stored data is not served to the token.
    return ApiError(502, f"The gateway could not check the API key with the upstream: {reason}.",
                    type=SERVER_ERROR, code="credential_check_failed")


TOKEN_CHECK = web.AppKey("orp_token_check", TokenCheck)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type=AUTHENTICATION, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


_MISSING = ("Missing API key: send it in the header 'Authorization: Bearer <key>'.")
_INVALID = "Invalid API key."


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse unauthenticated requests with 401 before any handler runs (so before anything
    is read from the body, the store or the upstream)."""
    auth = request.app[AUTH]
    path = request.path
    if auth.mode == "none" or path in PUBLIC_PATHS:
        return await handler(request)
    token = bearer_token(request)
    if path == METRICS_PATH:
        # Restricted metrics need a gateway key in every mode (a pass-through token cannot be
        # checked here).
        if not auth.metrics_public and not auth.is_gateway_key(token):
            raise unauthorized(_MISSING if token is None else _INVALID)
        return await handler(request)
    if token is None:
        raise unauthorized(_MISSING)
    if auth.mode == "keys":
        if not auth.is_gateway_key(token):
            raise unauthorized(_INVALID)
    else:
        request[UPSTREAM_AUTHORIZATION] = f"Bearer {token}"
        check = request.app.get(TOKEN_CHECK)
        resource = request.match_info.route.resource
        if (check is not None and resource is not None and resource.canonical in STORE_ROUTES
                and not await check.accepted(request.app, token)):
            raise unauthorized(_INVALID)
    return await handler(request)


def _warn_if_open(auth: Authenticator) -> Callable[[web.Application], Awaitable[None]]:
    async def warn(app: web.Application) -> None:
        if auth.mode == "none":
            log.warning("ORP_AUTH_MODE=none: anyone who can reach this port can use the "
                        "gateway; for local development only")
        else:
            log.info("client authentication: %s (%d gateway key(s))", auth.mode,
                     len(auth.digests))

    return warn


def setup_auth(app: web.Application, settings: Settings) -> None:
    """Install authentication on `app`, after the error middleware (call after creating the
    application, before routes run). Raises ConfigError when the settings cannot work."""
    auth = Authenticator.from_settings(settings)
    app[AUTH] = auth
    if auth.mode == "passthrough":
        app[TOKEN_CHECK] = TokenCheck(settings.passthrough_check_ttl)
    app.middlewares.append(auth_middleware)
    app.on_startup.append(_warn_if_open(auth))
