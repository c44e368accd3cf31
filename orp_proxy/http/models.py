"""`GET /v1/models`: the model names clients may use.

With a configuration file of models: those models and the `ORP_MODEL_MAP` aliases that name
them, answered by ORP itself (the backends' own lists name upstream models, which clients do not
use). With one upstream: its list, plus the aliases.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import ujson
from aiohttp import web

from orp_proxy.errors import SERVER_ERROR, ApiError
from orp_proxy.http.request import json_response
from orp_proxy.ops.auth import TOKEN_CHECK, UPSTREAM_AUTHORIZATION, bearer_token, unauthorized
from orp_proxy.state import GATEWAY

_TIMEOUT = aiohttp.ClientTimeout(total=10)
_LIMIT = 4 * 1024 * 1024


def _model(name: str, owner: str = "orp") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


async def _upstream_models(request: web.Request) -> list[dict[str, Any]]:
    gateway = request.app[GATEWAY]
    upstream = gateway.upstream
    auth = request.get(UPSTREAM_AUTHORIZATION) or upstream.authorization
    headers = {"Authorization": auth} if auth else {}
    unavailable = ApiError(502, "The upstream model server's model list is unavailable.",
                           type=SERVER_ERROR, code="upstream_unavailable")
    try:
        async with upstream.session.get(upstream.endpoint("models"), headers=headers,
                                        timeout=_TIMEOUT) as resp:
            raw = await resp.content.read(_LIMIT)
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        raise unavailable from None
    if status in (401, 403) and request.get(UPSTREAM_AUTHORIZATION):
        raise unauthorized("The API key was rejected by the upstream model server.")
    if status != 200:
        raise unavailable
    try:
        data = ujson.loads(raw).get("data")
    except (ValueError, AttributeError):
        raise unavailable from None
    if not isinstance(data, list):
        raise unavailable
    return [_model(str(m["id"]), str(m.get("owned_by") or "upstream")) for m in data
            if isinstance(m, dict) and isinstance(m.get("id"), str)]


# The upstream's list per credential that fetched it (pass-through keys may see different
# lists): (monotonic time fetched, models). Clients probe /v1/models often; backends' lists
# change only when a model is loaded.
_CACHE = web.AppKey("orp_models_cache", dict[str | None, tuple[float, list[dict[str, Any]]]])


async def _cached_upstream_models(request: web.Request) -> list[dict[str, Any]]:
    ttl = request.app[GATEWAY].settings.models_cache_seconds
    cache = request.app[_CACHE]
    key = request.get(UPSTREAM_AUTHORIZATION)
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    data = await _upstream_models(request)
    if ttl > 0:
        if len(cache) >= _CACHE_ENTRIES:
            cache.clear()  # many pass-through keys: start over rather than grow
        cache[key] = (now, data)
    return data


_CACHE_ENTRIES = 256


async def list_models(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    router = gateway.router
    aliases = gateway.settings.model_map
    if gateway.settings.routed:
        # Answered by ORP itself: a pass-through token is checked upstream first, as for the
        # other routes that do not reach a backend.
        check = request.app.get(TOKEN_CHECK)
        token = bearer_token(request)
        if (check is not None and token is not None
                and not await check.accepted(request.app, token)):
            raise unauthorized("Invalid API key.")
        names = router.models()
        data = [_model(name) for name in names]
        data.extend(_model(alias) for alias, target in aliases.items()
                    if target in names and alias not in names)
    else:
        data = list(await _cached_upstream_models(request))
        listed = {m["id"] for m in data}
        data.extend(_model(alias) for alias in aliases if alias not in listed)
    return json_response({"object": "list", "data": data})


def setup_models(app: web.Application) -> None:
    """Route `GET /v1/models`, with the worker's cache of the upstream's list."""
    app[_CACHE] = {}
    app.router.add_get("/v1/models", list_models)
