"""Prometheus metrics and `GET /metrics`.

Under gunicorn every worker writes its samples to files in `PROMETHEUS_MULTIPROC_DIR` (our
gunicorn config sets and wipes it) and any worker answers a scrape with the sum of all of them;
without that variable the process's own registry is served. Each request is recorded once, when
it ends — never per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from orp_proxy.store import InputItemsPage, ResponseStore, StoredResponse
from orp_proxy.store.base import BackgroundStore

REQUESTS = Counter("orp_requests", "HTTP requests by route, status and stream flag.",
                   ["route", "status", "stream"])
STREAMS_IN_FLIGHT = Gauge("orp_streams_in_flight", "Server-sent event streams now open.",
                          multiprocess_mode="livesum")
TIME_TO_FIRST_TOKEN = Histogram(
    "orp_time_to_first_token_seconds",
    "From a response request's arrival to its first output event (upstream queueing and "
    "prefill included).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
RESPONSE_DURATION = Histogram(
    "orp_response_duration_seconds",
    "From a response request's arrival to its end, for requests that reached the upstream.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)
TOKENS = Counter("orp_tokens", "Tokens reported by the upstream, by kind (input, output).",
                 ["kind"])
ERRORS = Counter("orp_errors", "Errors sent to clients (HTTP errors and failed responses), by "
                 "code.", ["code"])
STORE_SECONDS = Histogram(
    "orp_store_operation_seconds", "Response store operation latency.", ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Per deployment (a model on one upstream) when ORP_CONFIG routes models; labels: the client's
# model name and the deployment (`upstream/upstream_model`).
DEPLOYMENT_REQUESTS = Counter("orp_deployment_requests", "Requests sent to a deployment "
                              "(each failover attempt counts).", ["model", "deployment"])
DEPLOYMENT_ERRORS = Counter("orp_deployment_errors", "Failed attempts on a deployment before "
                            "its stream started, by kind (connect, HTTP status, or error code).",
                            ["model", "deployment", "kind"])
DEPLOYMENT_EJECTIONS = Counter("orp_deployment_ejections", "Times a deployment was taken out "
                               "of rotation, by reason.", ["model", "deployment", "reason"])
DEPLOYMENT_IN_FLIGHT = Gauge("orp_deployment_in_flight", "Requests now open on a deployment.",
                             ["model", "deployment"], multiprocess_mode="livesum")
DEPLOYMENT_LATENCY = Histogram(
    "orp_deployment_latency_seconds",
    "From sending a request to a deployment to its answer's headers (queueing, prefill).",
    ["model", "deployment"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)

BACKGROUND_RUNS = Gauge("orp_background_responses", "Background responses this worker runs now, "
                        "by state (queued: waiting for the upstream; running).", ["state"],
                        multiprocess_mode="livesum")
BACKGROUND_FINISHED = Counter("orp_background_finished", "Background responses finished, by "
                              "final status (worker_lost ones count as failed).", ["status"])

_INPUT_TOKENS = TOKENS.labels("input")
_OUTPUT_TOKENS = TOKENS.labels("output")


def record_request(route: str, status: int, stream: bool) -> None:
    REQUESTS.labels(route, str(status), "true" if stream else "false").inc()


def record_response(*, ttft: float | None, duration: float, usage: dict[str, Any] | None
                    ) -> None:
    """What one response through the upstream cost; called once, when it ended."""
    if ttft is not None:
        TIME_TO_FIRST_TOKEN.observe(ttft)
    RESPONSE_DURATION.observe(duration)
    if usage:
        _INPUT_TOKENS.inc(usage.get("input_tokens") or 0)
        _OUTPUT_TOKENS.inc(usage.get("output_tokens") or 0)


def record_error(code: str) -> None:
    ERRORS.labels(code).inc()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _scrape_registry() -> CollectorRegistry:
    if multiprocess_dir() is None:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


METRICS_REGISTRY = web.AppKey("orp_metrics_registry", CollectorRegistry)


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format, summed over all workers under gunicorn."""
    # Reading every worker's files takes a few milliseconds: not on the event loop.
    body = await asyncio.to_thread(generate_latest, request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_metrics(app: web.Application) -> None:
    app[METRICS_REGISTRY] = _scrape_registry()
    app.router.add_get("/metrics", metrics_handler)


class TimedStore:
    """A `ResponseStore` that records each operation's latency in `orp_store_operation_seconds`.
    """

    def __init__(self, inner: ResponseStore) -> None:
        self.inner = inner
        self._timers = {name: STORE_SECONDS.labels(name) for name in (
            "save_response", "load_lineage", "get_response", "delete_response",
            "list_input_items", "get_items", "purge_expired", "check_writable")}

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._timers[name].observe(time.perf_counter() - started)

    async def save_response(self, record: StoredResponse) -> None:
        with self._timed("save_response"):
            await self.inner.save_response(record)

    async def load_lineage(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        with self._timed("load_lineage"):
            return await self.inner.load_lineage(owner, response_id)

    async def get_response(self, owner: str, response_id: str) -> dict[str, Any] | None:
        with self._timed("get_response"):
            return await self.inner.get_response(owner, response_id)

    async def delete_response(self, owner: str, response_id: str) -> bool:
        with self._timed("delete_response"):
            return await self.inner.delete_response(owner, response_id)

    async def list_input_items(self, owner: str, response_id: str, *, limit: int = 20,
                               order: str = "desc", after: str | None = None,
                               before: str | None = None) -> InputItemsPage | None:
        with self._timed("list_input_items"):
            return await self.inner.list_input_items(owner, response_id, limit=limit,
                                                     order=order, after=after, before=before)

    async def get_items(self, owner: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._timed("get_items"):
            return await self.inner.get_items(owner, item_ids)

    async def purge_expired(self, now: float | None = None) -> int:
        with self._timed("purge_expired"):
            return await self.inner.purge_expired(now)

    async def check_writable(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
        with self._timed("check_writable"):
            return await self.inner.check_writable(timeout)

    async def stats(self) -> dict[str, Any]:
        return await self.inner.stats()

    async def vacuum(self) -> None:
        await self.inner.vacuum()

    def owner_id(self, credential: str | None) -> str:
        return self.inner.owner_id(credential)

    def known_unavailable(self) -> bool:
        return self.inner.known_unavailable()

    # -- background runs (untimed: the event log is written per batch, not per request) -----

    @property
    def background(self) -> BackgroundStore | None:
        """The inner store as a `BackgroundStore`, or None if it cannot keep background runs."""
        inner = self.inner
        return inner if isinstance(inner, BackgroundStore) else None

    async def close(self) -> None:
        await self.inner.close()
