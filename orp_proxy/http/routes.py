"""Every route of the API, in one place."""

from __future__ import annotations

from aiohttp import web

from orp_proxy.http.background import cancel_response
from orp_proxy.http.compact import compact_response
from orp_proxy.http.input_tokens import count_input_tokens
from orp_proxy.http.models import setup_models
from orp_proxy.http.responses import (
    create_response,
    delete_response,
    get_response,
    list_input_items,
)
from orp_proxy.http.websocket import setup_websocket


def setup_routes(app: web.Application) -> None:
    setup_models(app)
    app.router.add_post("/v1/responses", create_response)
    setup_websocket(app)  # GET /v1/responses, upgraded
    app.router.add_post("/v1/responses/compact", compact_response)
    app.router.add_post("/v1/responses/input_tokens", count_input_tokens)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
