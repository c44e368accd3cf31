"""Model routing: which upstream answers a request, and what happens when one fails.

Without a configuration file there is one upstream and every model name goes to it
(`SingleUpstream`, today's behaviour: retries on the same upstream per `RetryPolicy`). With
`ORP_CONFIG` naming models, `Router` maps each model to its deployments (upstream + upstream
model name + weight):

- **Balancing**: among the deployments that are in and below their upstream's concurrency
  limit, the one with the fewest outstanding requests per unit of weight; ties are broken at
  random. A slow replica holds its requests longer, so it gets fewer new ones.
- **Stickiness** (optional): a request continuing `previous_response_id` goes where that
  response was made (a per-worker map of recent responses), and/or a `prompt_cache_key` picks
  a deployment by weighted rendezvous hashing (the same on every worker); either only while
  that deployment is available.
- **Passive health**: `eject_after` consecutive connect errors, 5xx or read timeouts before
  the answer's headers eject a deployment for a backoff that doubles with each ejection
  (`eject_seconds` … `eject_max_seconds`); a 503 without `Retry-After` (a server loading its
  model) ejects at once. While ejected it is probed with
  `GET {upstream}/models` every `probe_interval` and comes back when the backoff is over and a
  probe answered. A 429 or 503 with `Retry-After` only rests the deployment for that long.
- **Failover**: an attempt that fails before the upstream's body started (connect error, a
  connection closed before any answer, 429, 5xx) is tried on another deployment, up to
  `retries` more, never the same one twice and never once the stream started. With no
  deployment available: 503 with `Retry-After`.

Health is per worker: each learns from its own traffic and probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from orp_proxy.config_file import FileConfig, Quirks, RoutingOptions, UpstreamSpec
from orp_proxy.errors import NOT_FOUND, SERVER_ERROR, ApiError
from orp_proxy.ops import metrics
from orp_proxy.upstream.client import UpstreamClient, UpstreamFailure, UpstreamStream

log = logging.getLogger("orp.routing")

# Recent response id → the deployment that made it, for `previous_response_id` stickiness.
_AFFINITY_ENTRIES = 65536
_PROBE_TIMEOUT = 5.0

BuildChat = Callable[[Quirks, str], dict[str, Any]]
"""Makes the upstream body for a deployment: (its upstream's quirks, its model name)."""


@dataclass(frozen=True)
class RouteHints:
    """What a request offers for stickiness."""

    previous_response_id: str | None = None
    response_id: str | None = None  # the id the new response will have
    prompt_cache_key: str | None = None


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    type=NOT_FOUND, param="model", code="model_not_found")


class Routes(Protocol):
    """Opens the upstream stream for a request's model."""

    def known(self, model: str) -> bool:
        """Whether the model can be routed at all (unknown ones get 404)."""
        ...

    async def open(self, model: str, build: BuildChat, *, request_id: str,
                   authorization: str | None, hints: RouteHints | None = None
                   ) -> UpstreamStream:
        ...

    def models(self) -> list[str]:
        """The configured model names (empty: whatever the single upstream serves)."""
        ...

    def state(self) -> dict[str, Any]:
        """Per model and deployment health, for /readyz."""
        ...

    async def close(self) -> None:
        ...


class SingleUpstream:
    """No configuration file: one upstream for every model, aliases from ORP_MODEL_MAP."""

    def __init__(self, client: UpstreamClient, quirks: Quirks,
                 model_map: Callable[[str], str]) -> None:
        self.client = client
        self.quirks = quirks
        self._model_map = model_map

    def known(self, model: str) -> bool:
        return True

    async def open(self, model: str, build: BuildChat, *, request_id: str,
                   authorization: str | None, hints: RouteHints | None = None
                   ) -> UpstreamStream:
        chat = build(self.quirks, self._model_map(model))
        return await self.client.open(chat, request_id=request_id, authorization=authorization)

    def models(self) -> list[str]:
        return []

    def state(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        await self.client.close()


class Upstream:
    """One configured backend and its requests in flight (shared by its deployments)."""

    def __init__(self, spec: UpstreamSpec, client: UpstreamClient, defaults: Quirks) -> None:
        self.spec = spec
        self.name = spec.name
        self.client = client
        self.quirks = dataclasses.replace(defaults, **spec.quirks)
        self.limit = spec.max_concurrency
        self.in_flight = 0

    def full(self) -> bool:
        return 0 < self.limit <= self.in_flight


class Deployment:
    """A model on one upstream, with its load and health as this worker sees them."""

    def __init__(self, model: str, upstream: Upstream, upstream_model: str,
                 weight: float) -> None:
        self.model = model
        self.upstream = upstream
        self.upstream_model = upstream_model
        self.weight = weight
        self.name = f"{upstream.name}/{upstream_model}"
        self.in_flight = 0
        self.failures = 0  # consecutive connect errors / 5xx
        self.ejections = 0  # how often in a row: the backoff doubles with each
        self.out_until = 0.0  # monotonic time before which it is not used
        self.needs_probe = False  # out until a probe answers (not only until the time)
        self.reason: str | None = None
        self.back_at = 0.0
        self.probe: asyncio.Task[None] | None = None
        labels = (model, self.name)
        self._requests = metrics.DEPLOYMENT_REQUESTS.labels(*labels)
        self._in_flight = metrics.DEPLOYMENT_IN_FLIGHT.labels(*labels)
        self._latency = metrics.DEPLOYMENT_LATENCY.labels(*labels)
        self._errors: dict[str, Any] = {}
        # Stable per deployment, for rendezvous hashing of prompt_cache_key.
        self._seed = self.name.encode()

    def available(self, now: float) -> bool:
        return not self.needs_probe and now >= self.out_until

    def begin(self) -> None:
        self.in_flight += 1
        self.upstream.in_flight += 1
        self._in_flight.inc()
        self._requests.inc()

    def end(self) -> None:
        self.in_flight -= 1
        self.upstream.in_flight -= 1
        self._in_flight.dec()

    def error(self, kind: str) -> None:
        counter = self._errors.get(kind)
        if counter is None:
            counter = self._errors[kind] = metrics.DEPLOYMENT_ERRORS.labels(
                self.model, self.name, kind)
        counter.inc()

    def observe(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def score(self, key: bytes) -> float:
        """Weighted rendezvous score of `key` (highest wins)."""
        digest = hashlib.blake2b(key, key=self._seed[:64], digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2 ** 64 + 1)
        return -self.weight / math.log(unit)

    def describe(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"deployment": self.name, "in_flight": self.in_flight,
                               "state": "in" if self.available(now) else "out"}
        if not self.available(now):
            out["reason"] = self.reason
            out["retry_in_s"] = round(max(self.out_until - now, 0.0), 1)
        return out


class Router:
    """Routes each configured model to its deployments (see the module docstring)."""

    def __init__(self, options: RoutingOptions, models: dict[str, list[Deployment]],
                 session: aiohttp.ClientSession, aliases: dict[str, str] | None = None) -> None:
        self.options = options
        self.table = models
        self.aliases = aliases or {}
        self.session = session
        self.upstreams = {d.upstream.name: d.upstream for ds in models.values() for d in ds}
        self._affinity: OrderedDict[str, Deployment] = OrderedDict()
        self._sticky_previous = options.sticky in ("previous_response_id", "both")
        self._sticky_cache = options.sticky in ("prompt_cache_key", "both")
        self._closed = False

    @classmethod
    def from_config(cls, file: FileConfig, clients: dict[str, UpstreamClient],
                    session: aiohttp.ClientSession, *, defaults: Quirks,
                    aliases: dict[str, str] | None = None) -> Router:
        """`defaults`: the quirks of an upstream the file says nothing about."""
        upstreams = {name: Upstream(spec, clients[name], defaults)
                     for name, spec in file.upstreams.items()}
        models = {name: [Deployment(name, upstreams[d.upstream], d.model, d.weight)
                         for d in deployments]
                  for name, deployments in file.models.items()}
        return cls(file.routing, models, session, aliases)

    # -- routing

    def _deployments(self, model: str) -> list[Deployment] | None:
        found = self.table.get(model)
        if found is None and model in self.aliases:
            found = self.table.get(self.aliases[model])
        return found

    def known(self, model: str) -> bool:
        return self._deployments(model) is not None

    def models(self) -> list[str]:
        return list(self.table)

    def _pick(self, deployments: list[Deployment], tried: list[Deployment], now: float,
              hints: RouteHints | None) -> Deployment | None:
        candidates = [d for d in deployments
                      if d.available(now) and not d.upstream.full() and d not in tried]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if hints is not None:
            if self._sticky_previous and hints.previous_response_id:
                sticky = self._affinity.get(hints.previous_response_id)
                if sticky is not None and sticky in candidates:
                    return sticky
            if self._sticky_cache and hints.prompt_cache_key:
                key = hints.prompt_cache_key.encode("utf-8", "surrogatepass")
                return max(candidates, key=lambda d: d.score(key))
        best: Deployment | None = None
        best_load = math.inf
        ties = 0
        for d in candidates:
            load = (d.in_flight + 1) / d.weight
            if load < best_load:
                best, best_load, ties = d, load, 1
            elif load == best_load:
                ties += 1  # reservoir sampling: each tied one equally likely
                if random.random() * ties < 1:
                    best = d
        return best

    async def open(self, model: str, build: BuildChat, *, request_id: str,
                   authorization: str | None, hints: RouteHints | None = None
                   ) -> UpstreamStream:
        deployments = self._deployments(model)
        if deployments is None:
            raise model_not_found(model)
        tried: list[Deployment] = []
        last: UpstreamFailure | None = None
        for _ in range(self.options.retries + 1):
            now = time.monotonic()
            d = self._pick(deployments, tried, now, hints)
            if d is None:
                break
            tried.append(d)
            if last is not None:
                log.warning("request %s: failing over to %s after %s from %s", request_id,
                            d.name, last.error.code, tried[-2].name)
            chat = build(d.upstream.quirks, d.upstream_model)
            d.begin()
            started = time.perf_counter()
            try:
                stream = await d.upstream.client.attempt(chat, request_id=request_id,
                                                         authorization=authorization)
            except UpstreamFailure as failure:
                d.end()
                self._failed(d, failure)
                last = failure
                continue
            except ApiError as exc:
                d.end()
                d.error(exc.code or "error")
                if exc.code == "upstream_timeout":
                    # No answer within the read timeout: not sent elsewhere (it may be at
                    # work), but a replica that hangs must leave the rotation too.
                    self._count_failure(d, "timeout")
                raise
            except BaseException:
                d.end()
                raise
            d.observe(time.perf_counter() - started)
            self._succeeded(d)
            stream.on_done = d.end
            stream.deployment = d.name
            if self._sticky_previous and hints is not None and hints.response_id:
                affinity = self._affinity
                affinity[hints.response_id] = d
                if len(affinity) > _AFFINITY_ENTRIES:
                    affinity.popitem(last=False)
            return stream
        now = time.monotonic()
        if last is not None and any(d.available(now) for d in deployments):
            raise last.error  # what the last deployment said, as one upstream would
        raise self._unavailable(model, deployments, now, last)

    def _unavailable(self, model: str, deployments: list[Deployment], now: float,
                     last: UpstreamFailure | None) -> ApiError:
        if any(d.available(now) for d in deployments):
            # In, but every upstream is at its concurrency limit.
            return ApiError(503, f"Every deployment of the model '{model}' is at its "
                            "concurrency limit; retry shortly.", type=SERVER_ERROR,
                            code="model_overloaded", headers={"Retry-After": "1"})
        soonest = min(max(d.out_until - now, 0.0) if not d.needs_probe
                      else max(d.out_until - now, self.options.probe_interval)
                      for d in deployments)
        if last is not None and last.retry_after is not None:
            soonest = min(soonest, last.retry_after)
        return ApiError(503, f"No deployment of the model '{model}' is available now.",
                        type=SERVER_ERROR, code="model_unavailable",
                        headers={"Retry-After": str(max(1, math.ceil(soonest)))})

    # -- health

    def _succeeded(self, d: Deployment) -> None:
        d.failures = 0
        if d.ejections and time.monotonic() - d.back_at > self._backoff(d.ejections):
            d.ejections = 0  # stayed healthy as long as it was last out: forgiven

    def _failed(self, d: Deployment, failure: UpstreamFailure) -> None:
        status = failure.status
        if status is None:
            kind = "connect" if failure.refused else "connection_lost"
        else:
            kind = str(status)
        d.error(kind)
        now = time.monotonic()
        if not d.available(now):
            return  # already out (requests that were on their way when it went)
        if status in (429, 503) and failure.retry_after is not None:
            # The server says when to come back: rest it exactly that long, no probe needed.
            self._take_out(d, now, failure.retry_after, f"http_{status}", probe=False)
        elif status == 429:
            self._take_out(d, now, self.options.eject_seconds, "http_429", probe=False)
        elif status == 503:
            self._eject(d, now, "http_503")  # e.g. "Loading model": out until it answers
        else:
            self._count_failure(d, kind if status is None else f"http_{status}")

    def _count_failure(self, d: Deployment, reason: str) -> None:
        """One more consecutive failure; `eject_after` of them take the deployment out."""
        now = time.monotonic()
        if not d.available(now):
            return
        d.failures += 1
        if d.failures >= self.options.eject_after:
            self._eject(d, now, reason)

    def _backoff(self, ejections: int) -> float:
        o = self.options
        return float(min(o.eject_seconds * 2 ** max(ejections - 1, 0), o.eject_max_seconds))

    def _eject(self, d: Deployment, now: float, reason: str) -> None:
        d.ejections += 1
        self._take_out(d, now, self._backoff(d.ejections), reason, probe=True)

    def _take_out(self, d: Deployment, now: float, seconds: float, reason: str, *,
                  probe: bool) -> None:
        d.out_until = now + seconds
        d.needs_probe = probe
        d.reason = reason
        d.failures = 0
        metrics.DEPLOYMENT_EJECTIONS.labels(d.model, d.name, reason).inc()
        log.warning("deployment %s of model %s out for %.1f s (%s)%s", d.name, d.model,
                    seconds, reason, "; probing it" if probe else "")
        if probe and not self._closed and (d.probe is None or d.probe.done()):
            d.probe = asyncio.get_running_loop().create_task(
                self._probe_until_back(d), name=f"orp-probe-{d.name}")

    async def _probe_until_back(self, d: Deployment) -> None:
        """Probe an ejected deployment until it answers and its backoff is over."""
        url = d.upstream.client.endpoint("models")
        auth = d.upstream.client.authorization
        headers = {"Authorization": auth} if auth else {}
        while True:
            await asyncio.sleep(self.options.probe_interval)
            ok = await self._probe(url, headers)
            now = time.monotonic()
            if not ok:
                if now >= d.out_until:  # still down when its time was up: a longer backoff
                    d.ejections += 1
                    d.out_until = now + self._backoff(d.ejections)
                continue
            if now < d.out_until:
                continue
            d.needs_probe = False
            d.reason = None
            d.back_at = now
            log.info("deployment %s of model %s is back (probe answered)", d.name, d.model)
            return

    async def _probe(self, url: str, headers: dict[str, str]) -> bool:
        try:
            async with self.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(
                    total=_PROBE_TIMEOUT)) as resp:
                await resp.read()
                # Any answer but "unavailable" means the server is up (a 401 in pass-through
                # mode, where ORP has no key of its own, or a 404 from a server without it).
                return resp.status < 500 and resp.status != 429
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {}
        for model, deployments in self.table.items():
            shown = [d.describe(now) for d in deployments]
            up = sum(1 for s in shown if s["state"] == "in")
            out[model] = {"state": "ok" if up == len(shown) else "degraded" if up else "down",
                          "deployments": shown}
        return out

    def servable(self) -> bool:
        now = time.monotonic()
        return any(d.available(now) for ds in self.table.values() for d in ds)

    async def close(self) -> None:
        self._closed = True
        probes = [d.probe for ds in self.table.values() for d in ds if d.probe is not None]
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(u.client.close() for u in self.upstreams.values()))
