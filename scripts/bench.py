"""ORP benchmark harness: mock upstream, proxy and load generators as separate processes.

Figures that stay stable on a shared, noisy machine: CPU time of the proxy process per streamed
token and per request (from /proc/PID/stat), the same for the mock upstream as the floor, and
ratios measured within one run (through ORP vs direct to the upstream). Wall-clock figures
(requests/s, time to first event) are reported too, for the same workload.

    scripts/bench                       # the full suite, results in bench-results.json
    scripts/bench --quick               # a smaller run
    scripts/bench --only cpu            # one section: cpu, burst, sweep, memory, store, json,
                                        # routing (repeatable)
    scripts/bench --target URL --target-pid PID   # the same load against another gateway
    scripts/bench --peer 'COMMAND' [--peer-config FILE] [--peer-model NAME]
                                        # a peer gateway started per section, measured beside ORP
    scripts/bench --no-floor            # without the stack floor (scripts/floor_gateway.py)
    scripts/bench --only store --postgres
                                        # store costs on SQLite and on PostgreSQL (a server
                                        # of its own, pinned off the gateway's CPU)
    scripts/bench --only store --store-url postgresql://orp@127.0.0.1:5432/bench
                                        # the same on an external server
    scripts/bench --table bench-results.json    # the README's table from a results file

On a machine with 2 or more CPUs the gateway process (ORP or the peer, with its children) runs
on the first CPU, the mock upstream, the load generators, `--postgres`'s server and this harness
on the others (`--no-pin`: no pinning). `targets` in the results lists issue 16's targets with
the figure each is judged by, its threshold and whether it passed.

The stack floor, `scripts/floor_gateway.py` (an aiohttp relay on ORP's mandated stack doing the
least a gateway can), is measured beside ORP like a peer in the cpu, burst and memory sections:
the part of each figure the stack costs before ORP does anything.

Everything listens on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # run as a script: its folder is on sys.path
    import pgcluster
    import procs
except ImportError:  # imported as scripts.bench
    from scripts import pgcluster, procs

TOKENS = 256
PEER_START_TIMEOUT = 120.0  # a big gateway (LiteLLM) imports for a while before it listens


# -- pinning --------------------------------------------------------------------------------


@dataclass
class Pinning:
    """Where the processes run: the gateway under test alone on `gateway`, everything else
    (mock upstream, load generators, this harness) on `others`; None: wherever the kernel
    likes."""

    gateway: list[int] | None = None
    others: list[int] | None = None
    observed: dict[str, list[int]] = field(default_factory=dict)

    def note(self, name: str, pid: int) -> None:
        """Record the CPUs `pid` is allowed on (the first time `name` is seen)."""
        if name not in self.observed:
            with contextlib.suppress(OSError):
                self.observed[name] = sorted(os.sched_getaffinity(pid))

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": self.gateway is not None}
        if self.gateway is not None:
            out.update(gateway_cpus=self.gateway, others_cpus=self.others)
        out["observed_cpus"] = self.observed
        return out


PIN = Pinning()


def configure_pinning(enabled: bool) -> dict[str, Any]:
    """Pin this harness (and so the mock upstreams and load generators it starts, which
    inherit its CPU mask) to all CPUs but the first; gateways get the first (`PIN`)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        PIN.gateway = PIN.others = None
        return {"reason": "--no-pin" if not enabled else f"{len(cpus)} CPU available",
                "cpus": cpus}
    PIN.gateway, PIN.others = cpus[:1], cpus[1:]
    os.sched_setaffinity(0, PIN.others)
    return {"cpus": cpus}


# -- processes ----------------------------------------------------------------------------


@contextlib.contextmanager
def mock_upstream(interval_ms: float) -> Iterator[tuple[str, int]]:
    """The mock upstream pacing `interval_ms`, a bench model answering `TOKENS` tokens."""
    with tempfile.TemporaryDirectory(prefix="orp-bench-mock-") as home, \
            procs.mock_upstream(Path(home), "--interval-ms", str(interval_ms),
                                "--bench-tokens", str(TOKENS)) as (url, proc):
        PIN.note("mock_upstream", proc.pid)
        yield url, proc.pid


@contextlib.contextmanager
def orp(upstream: str | None, db: str, store_url: str | None = None, **settings: str
        ) -> Iterator[tuple[str, int]]:
    """`orp-proxy serve` (one process, no gateway keys), output discarded; `upstream` None:
    the upstreams come from `settings` (ORP_CONFIG). The store: SQLite at `db`, or
    `store_url`."""
    port = procs.free_port()
    store = ["--store-url", store_url] if store_url else ["--db-path", db]
    args = [sys.executable, "-m", "orp_proxy.cli", "serve", "--port", str(port),
            *store, "--log-level", "warning"]
    if upstream is not None:
        args += ["--upstream-url", upstream]
    with procs.affinity(PIN.gateway):
        proc = subprocess.Popen(args, env=procs.clean_env(ORP_AUTH_MODE="none", **settings),
                                cwd=procs.ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    with procs.running(proc, sig=signal.SIGINT):
        procs.wait_port(port, proc)
        PIN.note("orp", proc.pid)
        yield f"http://{procs.HOST}:{port}/v1", proc.pid


@dataclass
class Peer:
    """Another gateway, started per section by a shell `command` in which `{upstream}` (the
    mock's base URL with /v1), `{port}`, `{tmp}` (a directory of its own) and `{config}` (the
    `config` template written there, same substitutions) are replaced; `name` keys its
    figures in the results (`through_NAME`, ...)."""

    command: str
    model: str = "bench"
    config: str | None = None
    config_name: str = "peer-config.yaml"
    name: str = "peer"

    def body(self, **extra: Any) -> dict[str, Any]:
        """The Responses body the peer gets: ORP's without `store` (a peer may not keep
        responses, or need a database to)."""
        return {"model": self.model, "input": "benchmark", **extra}


FLOOR_GATEWAY = procs.ROOT / "scripts" / "floor_gateway.py"
# The stack floor, started as a peer is: this interpreter has its packages.
FLOOR = Peer(f"exec {shlex.quote(sys.executable)} {shlex.quote(str(FLOOR_GATEWAY))} "
             "--upstream {upstream} --port {port}", name="floor")


def substitute(template: str, values: dict[str, str]) -> str:
    """`template` with each `{name}` of `values` replaced (no format(): JSON and YAML braces
    stay as they are)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


@contextlib.contextmanager
def peer_gateway(upstream: str, peer: Peer) -> Iterator[tuple[str, int]]:
    """The peer gateway against `upstream`, on the gateway CPU, its output in a log shown when
    it fails to start; stopped (its whole process group) when the block ends."""
    with tempfile.TemporaryDirectory(prefix="orp-bench-peer-") as tmp:
        port = procs.free_port()
        values = {"upstream": upstream, "port": str(port), "tmp": tmp}
        if peer.config is not None:
            config = Path(tmp, peer.config_name)
            config.write_text(substitute(peer.config, values))
            values["config"] = str(config)
        env = procs.clean_env()
        env.pop("PYTHONPATH")  # the checkout's packages are none of the peer's business
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        log = Path(tmp, "peer.log")
        with procs.affinity(PIN.gateway):
            proc = procs.spawn(["/bin/sh", "-c", substitute(peer.command, values)],
                               cwd=Path(tmp), env=env, stdout=log)
        with procs.running(proc, grace=10.0):
            try:
                procs.wait_port(port, proc, timeout=PEER_START_TIMEOUT)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{peer.name} did not start: {exc}\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from None
            url = f"http://{procs.HOST}:{port}/v1"
            # One short stream must work before anything is measured.
            check = run_load(url, "responses", 1, 2, peer.body(max_output_tokens=16))
            if check.errors or not check.tokens:
                raise RuntimeError(f"{peer.name} answers no stream: {check.error_samples}\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            PIN.note(peer.name, max(procs.tree(proc.pid)))
            yield url, proc.pid


@contextlib.contextmanager
def own_postgres() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL server of this run's own (scripts/pgcluster.py, the test-suite's:
    127.0.0.1 only, `fsync = off`) with its processes on the CPUs of the mock upstream and the
    load, off the gateway's; yields the URL of an empty database on it and what the results
    say of it. Stopped and removed when the block ends."""
    bindir = pgcluster.find_bindir()
    if bindir is None:
        raise SystemExit("--postgres: PostgreSQL server binaries (initdb, pg_ctl) not found; "
                         "apt-get install postgresql, or give an external one with --store-url")
    with contextlib.ExitStack() as stack:
        # Its processes inherit the CPU mask of the one starting them, backends the
        # postmaster's; pinned again once up, in case something in between changed it.
        with procs.affinity(PIN.others):
            cluster = stack.enter_context(pgcluster.running_cluster(bindir))
        postmaster = cluster.postmaster_pid()
        if PIN.others is not None:
            procs.pin_tree(postmaster, PIN.others)
        PIN.note("postgres", postmaster)
        cluster.psql("CREATE DATABASE bench")
        version = cluster.psql("SHOW server_version").split()[0]  # "15.18 (Debian ...)"
        where = (f"pinned to CPU {','.join(map(str, sorted(os.sched_getaffinity(postmaster))))}"
                 if PIN.others is not None else "not pinned")
        yield cluster.url("bench"), f"own (PostgreSQL {version}, fsync off), {where}"


# -- load generation (runs in separate processes) -----------------------------------------


@dataclass
class LoadSpec:
    url: str  # .../v1
    kind: str  # "responses" | "chat" | "responses-json"
    concurrency: int
    requests: int  # total for this process
    body: dict[str, Any]
    timeout: float = 120.0
    deadline: float = 120.0  # no new request starts after this many seconds


@dataclass
class LoadResult:
    ok: int = 0
    errors: int = 0
    tokens: int = 0
    ttfe: list[float] = field(default_factory=list)
    wall: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def merge(self, other: LoadResult) -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.tokens += other.tokens
        self.ttfe.extend(other.ttfe)
        self.wall = max(self.wall, other.wall)
        self.error_samples.extend(other.error_samples[:3])


# A text delta in a Responses stream: the `type` value in its data line (ORP's `event:` line
# has no quote after the name; a peer may send no `event:` lines at all).
RESPONSES_DELTA = b'response.output_text.delta"'


def _request(url: str, kind: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The endpoint and body for one request of `kind` with the Responses `body`."""
    if kind == "chat":
        chat = {"model": body["model"], "stream": True, "messages": [
            {"role": "user", "content": "benchmark"}], "stream_options": {"include_usage": True}}
        if "max_output_tokens" in body:
            chat["max_tokens"] = body["max_output_tokens"]
        return url.rstrip("/") + "/chat/completions", chat
    body = dict(body)
    if kind == "responses":
        body["stream"] = True
    return url.rstrip("/") + "/responses", body


async def _one(session: Any, url: str, kind: str, body: dict[str, Any], result: LoadResult,
               started: float) -> None:
    """One request, its time to first byte from `started`, tokens and errors in `result`."""
    try:
        async with session.post(url, json=body) as resp:
            first = await resp.content.readany()
            result.ttfe.append(time.perf_counter() - started)
            data = first + await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[-200:]!r}")
            if kind == "responses-json":
                answer = json.loads(data)
                if answer["status"] not in ("completed", "incomplete"):
                    raise RuntimeError(f"response {answer['status']}")
                result.tokens += answer["usage"]["output_tokens"]
            elif kind == "chat":
                if b"[DONE]" not in data[-300:]:
                    raise RuntimeError(f"stream did not end: {data[-200:]!r}")
                result.tokens += data.count(b'"content":') - 1  # the role chunk has one too
            else:
                if b"[DONE]" not in data[-300:] and b'response.completed"' not in data \
                        and b'response.incomplete"' not in data:
                    raise RuntimeError(f"stream did not end: {data[-200:]!r}")
                result.tokens += data.count(RESPONSES_DELTA)
            result.ok += 1
    except Exception as exc:  # counted and sampled, never fatal
        result.errors += 1
        if len(result.error_samples) < 3:
            result.error_samples.append(repr(exc)[:300])


async def _load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    result = LoadResult()
    url, body = _request(spec.url, spec.kind, spec.body)
    remaining = spec.requests
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    stop_at = time.perf_counter() + spec.deadline

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            await _one(session, url, spec.kind, body, result, time.perf_counter())

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(spec.concurrency)))
    result.wall = time.perf_counter() - started
    return result


def _run(coroutine: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def _load_entry(spec: LoadSpec) -> LoadResult:
    return _run(_load(spec))  # type: ignore[no-any-return]


def run_load(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
             processes: int = 1, deadline: float = 120.0) -> LoadResult:
    """Drive the load from `processes` separate processes and merge their results."""
    per = [requests // processes + (1 if i < requests % processes else 0)
           for i in range(processes)]
    conc = [max(1, concurrency // processes + (1 if i < concurrency % processes else 0))
            for i in range(processes)]
    specs = [LoadSpec(url, kind, c, n, body, deadline=deadline)
             for c, n in zip(conc, per, strict=True) if n]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(specs)) as pool:
        results = pool.map(_load_entry, specs)
    merged = LoadResult()
    for r in results:
        merged.merge(r)
    return merged


@dataclass
class Burst:
    """`requests` streams started together, each on a new connection of its own."""

    url: str  # .../v1
    kind: str  # "responses" | "chat"
    requests: int
    body: dict[str, Any]
    timeout: float = 60.0


async def _burst(burst: Burst) -> LoadResult:
    """Every request of `burst` connects and sends when one event is set; time to first byte
    counts from that moment."""
    import aiohttp

    result = LoadResult()
    url, body = _request(burst.url, burst.kind, burst.body)
    release = asyncio.Event()
    released = 0.0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a new connection each
    timeout = aiohttp.ClientTimeout(total=burst.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one() -> None:
            await release.wait()
            await _one(session, url, burst.kind, body, result, released)

        tasks = [asyncio.ensure_future(one()) for _ in range(burst.requests)]
        await asyncio.sleep(0.05)  # every task is waiting on the event
        released = time.perf_counter()
        release.set()
        await asyncio.gather(*tasks)
        result.wall = time.perf_counter() - released
    return result


async def _bursts(plan: list[Burst], pause: float) -> list[LoadResult]:
    """Each burst of `plan` in turn, `pause` seconds apart."""
    out = []
    for burst in plan:
        out.append(await _burst(burst))
        await asyncio.sleep(pause)
    return out


def _bursts_entry(args: tuple[list[Burst], float]) -> list[LoadResult]:
    return _run(_bursts(*args))  # type: ignore[no-any-return]


def run_bursts(plan: list[Burst], pause: float = 0.5) -> list[LoadResult]:
    """`plan` from one load-generator process of its own (see `_bursts`)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_bursts_entry, ((plan, pause),))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measured(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
             pids: dict[str, int], processes: int = 1, deadline: float = 120.0
             ) -> dict[str, Any]:
    """One workload: load result plus CPU seconds of each named process (with its
    descendants) during it; no new request starts after `deadline` seconds."""
    trees = {name: procs.tree(pid) for name, pid in pids.items()}
    before = {name: procs.tree_cpu_seconds(tree) for name, tree in trees.items()}
    result = run_load(url, kind, concurrency, requests, body, processes, deadline)
    cpu = {name: procs.tree_cpu_seconds(tree) - before[name] for name, tree in trees.items()}
    tokens = max(result.tokens, 1)
    out: dict[str, Any] = {
        "kind": kind, "concurrency": concurrency, "requests": requests, "ok": result.ok,
        "errors": result.errors, "tokens": result.tokens, "wall_s": round(result.wall, 3),
        "requests_per_s": round(result.ok / result.wall, 1) if result.wall else None,
        "tokens_per_s": round(result.tokens / result.wall, 1) if result.wall else None,
        "ttfe_p50_ms": _ms(pct(result.ttfe, 0.5)), "ttfe_p99_ms": _ms(pct(result.ttfe, 0.99)),
    }
    for name, seconds in cpu.items():
        out[f"{name}_cpu_s"] = round(seconds, 3)
        out[f"{name}_cpu_us_per_token"] = round(seconds / tokens * 1e6, 2)
        out[f"{name}_cpu_us_per_request"] = round(seconds / max(result.ok, 1) * 1e6, 1)
    if result.error_samples:
        out["error_samples"] = result.error_samples
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


# -- sections -----------------------------------------------------------------------------


BENCH_BODY: dict[str, Any] = {"model": "bench", "input": "benchmark", "store": False}
# Issue 16's setup, and the Responses API's default: the response is kept.
STORED_BODY: dict[str, Any] = dict(BENCH_BODY, store=True)


def fixed_and_marginal(big: dict[str, Any], small: dict[str, Any]) -> tuple[float, float] | None:
    """CPU per request split into a fixed part and a part per token, from two runs of the same
    gateway with long and short answers (`measured` rows); None when they cannot tell."""
    if not (big["ok"] and small["ok"]):
        return None
    big_tokens, small_tokens = big["tokens"] / big["ok"], small["tokens"] / small["ok"]
    if big_tokens - small_tokens < 1:
        return None  # the short answer was not shorter (max_output_tokens ignored)
    big_req, small_req = big["proxy_cpu_us_per_request"], small["proxy_cpu_us_per_request"]
    per_token = (big_req - small_req) / (big_tokens - small_tokens)
    return round(small_req - small_tokens * per_token, 1), round(per_token, 2)


def _through(name: str, url: str, pids: dict[str, int], body: dict[str, Any], conc: int,
             requests: int, short: bool) -> dict[str, Any]:
    """The cpu section's workloads through one gateway: a warm-up, the 256-token run and, if
    `short`, the same with 16-token answers and the fixed CPU per request they give."""
    run_load(url, "responses", conc, min(requests, 4 * conc), dict(body, max_output_tokens=16))
    row: dict[str, Any] = {f"through_{name}": measured(url, "responses", conc, requests, body,
                                                       pids, deadline=90.0)}
    if short:
        small = measured(url, "responses", conc, requests, dict(body, max_output_tokens=16),
                         pids, deadline=60.0)
        row[f"through_{name}_16_tokens"] = small
        split = fixed_and_marginal(row[f"through_{name}"], small)
        prefix = "proxy" if name == "orp" else name
        row[f"{prefix}_fixed_cpu_us_per_request"] = split[0] if split else None
        row[f"{prefix}_marginal_cpu_us_per_token"] = split[1] if split else None
    return row


def _ratio(top: float | None, bottom: float | None, digits: int = 3) -> float | None:
    return round(top / bottom, digits) if top and bottom else None


def section_cpu(scale: float, target: str | None, target_pid: int | None,
                peers: Sequence[Peer] = ()) -> dict[str, Any]:
    """CPU per token and per request, zero-delay 10 streams and paced 20 ms 100 streams, with
    `store: true`; the same load direct to the mock upstream, and through each of `peers`
    (the stack floor, a peer gateway)."""
    out: dict[str, Any] = {"store": True}
    for label, interval, conc, requests in (("zero_delay_10", 0.0, 10, int(3000 * scale)),
                                            ("paced20_100", 20.0, 100, int(400 * scale))):
        zero = interval == 0.0
        with mock_upstream(interval) as (up_url, up_pid):
            direct = measured(up_url, "chat", conc, requests, STORED_BODY, {"upstream": up_pid})
            row: dict[str, Any] = {"direct": direct}
            with tempfile.TemporaryDirectory() as tmp, \
                    _gateway(up_url, tmp, target, target_pid) as (gw_url, gw_pid):
                row.update(_through("orp", gw_url, {"proxy": gw_pid, "upstream": up_pid},
                                    STORED_BODY, conc, requests, zero))
            for peer in peers:
                with peer_gateway(up_url, peer) as (peer_url, peer_pid):
                    row.update(_through(peer.name, peer_url,
                                        {"proxy": peer_pid, "upstream": up_pid},
                                        peer.body(), conc, requests, zero))
        mock_floor = direct["upstream_cpu_us_per_token"]
        for name in ("orp", *(peer.name for peer in peers)):
            through = row.get(f"through_{name}")
            if through is None:
                continue
            row[f"throughput_ratio_{name}_vs_direct"] = _ratio(through["tokens_per_s"],
                                                               direct["tokens_per_s"])
            row[f"cpu_per_token_ratio_{name}_vs_mock"] = _ratio(
                through["proxy_cpu_us_per_token"], mock_floor)
        if "through_peer" in row:
            row["cpu_per_token_ratio_peer_vs_orp"] = _ratio(
                row["through_peer"]["proxy_cpu_us_per_token"],
                row["through_orp"]["proxy_cpu_us_per_token"], 2)
        if "floor_fixed_cpu_us_per_request" in row:
            row["orp_own_fixed_cpu_us_per_request"] = _minus(
                row["proxy_fixed_cpu_us_per_request"], row["floor_fixed_cpu_us_per_request"])
        out[label] = row
        _print(label, row)
    return out


def section_burst(scale: float, target: str | None, target_pid: int | None,
                  peers: Sequence[Peer] = ()) -> dict[str, Any]:
    """Time to first byte when 100 paced streams (20 ms, 256 tokens) start together, each on
    a new connection: direct to the mock upstream and through each gateway, rounds
    interleaved (the median of the rounds' p50 and p99); then one request alone, for the
    unloaded added latency."""
    requests, rounds, singles = 100, (5 if scale >= 1 else 3), (10 if scale >= 1 else 5)
    with contextlib.ExitStack() as stack:
        up_url, _ = stack.enter_context(mock_upstream(20.0))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        gw_url, gw_pid = stack.enter_context(_gateway(up_url, tmp, target, target_pid))
        parties: list[tuple[str, str, str, dict[str, Any], int | None]] = [
            ("direct", up_url, "chat", STORED_BODY, None),
            ("orp", gw_url, "responses", STORED_BODY, gw_pid)]
        for peer in peers:
            peer_url, peer_pid = stack.enter_context(peer_gateway(up_url, peer))
            parties.append((peer.name, peer_url, "responses", peer.body(), peer_pid))
        for _, url, kind, body, _pid in parties[1:]:  # warm-up
            run_load(url, kind, 10, 20, dict(body, max_output_tokens=16))
        trees = {name: procs.tree(pid) for name, _, _, _, pid in parties if pid is not None}
        before = {name: procs.tree_cpu_seconds(tree) for name, tree in trees.items()}
        loaded = run_bursts([Burst(url, kind, requests, body)
                             for _ in range(rounds) for _, url, kind, body, _ in parties])
        cpu = {name: procs.tree_cpu_seconds(tree) - before[name] for name, tree in trees.items()}
        alone = run_bursts([Burst(url, kind, 1, dict(body, max_output_tokens=16))
                            for _ in range(singles) for _, url, kind, body, _ in parties],
                           pause=0.05)
    out: dict[str, Any] = {"requests": requests, "rounds": rounds, "interval_ms": 20.0,
                           "tokens": TOKENS}
    single: dict[str, Any] = {"rounds": singles, "tokens": 16}
    for i, (name, *_rest) in enumerate(parties):
        mine = loaded[i::len(parties)]
        p50s = [pct(r.ttfe, 0.5) for r in mine]
        p99s = [pct(r.ttfe, 0.99) for r in mine]
        row: dict[str, Any] = {
            "ttfb_p50_ms": _ms(_median(p50s)), "ttfb_p99_ms": _ms(_median(p99s)),
            "round_p50_ms": [_ms(v) for v in p50s],
            "ok": sum(r.ok for r in mine), "errors": sum(r.errors for r in mine)}
        if name in cpu:
            row["cpu_us_per_request"] = round(cpu[name] / max(row["ok"], 1) * 1e6, 1)
        samples = [s for r in mine for s in r.error_samples][:3]
        if samples:
            row["error_samples"] = samples
        out[name] = row
        firsts = [t for r in alone[i::len(parties)] for t in r.ttfe]
        single[name] = {"ttfb_p50_ms": _ms(_median(firsts)),
                        "errors": sum(r.errors for r in alone[i::len(parties)])}
    for name, *_rest in parties[1:]:
        out[name]["added_ttfb_p50_ms"] = _minus(out[name]["ttfb_p50_ms"],
                                                out["direct"]["ttfb_p50_ms"])
        out[name]["added_ttfb_p99_ms"] = _minus(out[name]["ttfb_p99_ms"],
                                                out["direct"]["ttfb_p99_ms"])
        single[name]["added_ttfb_ms"] = _minus(single[name]["ttfb_p50_ms"],
                                               single["direct"]["ttfb_p50_ms"])
    out["single"] = single
    _print("burst", out)
    return out


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


@contextlib.contextmanager
def _gateway(upstream: str, tmp: str, target: str | None, target_pid: int | None
             ) -> Iterator[tuple[str, int]]:
    if target is not None:
        if target_pid is None:
            raise SystemExit("--target needs --target-pid to measure the gateway's CPU")
        if PIN.gateway is not None and "target" not in PIN.observed:
            procs.pin_tree(target_pid, PIN.gateway)  # best effort: it may not be ours
            PIN.note("target", target_pid)
        yield target, target_pid
        return
    with orp(upstream, os.path.join(tmp, "bench.sqlite3")) as gateway:
        yield gateway


def section_sweep(scale: float, target: str | None, target_pid: int | None) -> dict[str, Any]:
    """Requests/s, time to first event and errors at 1, 10, 100 and 1000 concurrent streams."""
    out: dict[str, Any] = {}
    for label, interval in (("zero_delay", 0.0), ("paced20", 20.0)):
        rows = {}
        with mock_upstream(interval) as (up_url, up_pid), \
                tempfile.TemporaryDirectory() as tmp, \
                _gateway(up_url, tmp, target, target_pid) as (gw_url, gw_pid):
            for conc in (1, 10, 100, 1000):
                requests = max(conc, int(conc * (3 if conc < 1000 else 1) * scale), 20)
                processes = 2 if conc >= 100 else 1
                rows[str(conc)] = measured(gw_url, "responses", conc, requests, BENCH_BODY,
                                           {"proxy": gw_pid, "upstream": up_pid}, processes)
                _print(f"sweep {label} c={conc}", rows[str(conc)])
        out[label] = rows
    return out


def section_memory(scale: float, target: str | None, target_pid: int | None,
                   floor: Peer | None = None) -> dict[str, Any]:
    """RSS of the proxy per concurrent open stream: 1000 slow streams held open at once; the
    same through the stack `floor` if given (under "floor"), against a mock of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        row = _open_streams_rss(lambda up_url: _gateway(up_url, tmp, target, target_pid),
                                BENCH_BODY)
    _print("memory", row)
    if floor is not None:
        row[floor.name] = _open_streams_rss(lambda up_url: peer_gateway(up_url, floor),
                                            floor.body())
        _print(f"memory {floor.name}", row[floor.name])
    return row


# Starts a gateway against an upstream (its base URL) and yields the gateway's URL and PID.
GatewayStart = Callable[[str], contextlib.AbstractContextManager[tuple[str, int]]]


def _open_streams_rss(gateway: GatewayStart, body: dict[str, Any]) -> dict[str, Any]:
    """RSS per open stream of the gateway `gateway(upstream)` starts (its URL and PID), with
    1000 slow streams of `body` held open at once.

    Each stream lasts ~10 s (256 tokens at 40 ms); the plateau is the middle of that window.
    Not every stream is open by then on a busy machine (some upstream connects wait seconds
    for a retransmitted SYN): the figure divides the RSS gained by the streams whose upstream
    connection is open at the same moment (the gateway's connections to the mock; those the
    warm-up left pooled are reused first), median over the plateau's samples. The peak
    includes the burst of 1000 requests arriving and finishing together.
    """
    streams = 1000
    interval_ms = 40.0
    with mock_upstream(interval_ms) as (up_url, _), gateway(up_url) as (gw_url, gw_pid):
        up_port = int(up_url.rsplit(":", 1)[1].split("/", 1)[0])
        run_load(gw_url, "responses", 20, 40, body)  # warm up allocator and pools
        time.sleep(1.0)
        idle = procs.rss_kb(gw_pid) * 1024
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(2)
        samples: list[tuple[float, int, int]] = []  # (seconds, RSS, streams open upstream)
        try:
            started = time.monotonic()
            pending = pool.map_async(_load_entry, [
                LoadSpec(gw_url, "responses", streams // 2, streams // 2, body)] * 2)
            while not pending.ready() and time.monotonic() - started < 90:
                samples.append((time.monotonic() - started, procs.rss_kb(gw_pid) * 1024,
                                procs.tcp_connections(up_port)))
                time.sleep(0.1)
            results = pending.get(timeout=120)
        finally:
            pool.close()
            pool.join()
    errors = sum(r.errors for r in results)
    lifetime = TOKENS * interval_ms / 1000
    plateau = [(rss, open_) for t, rss, open_ in samples
               if lifetime * 0.4 <= t <= lifetime * 0.8 and open_ > 0]
    if not plateau:  # nothing sampled in the window: the highest point, all streams counted
        plateau = [(max(rss for _, rss, _ in samples), streams)]
    middle = statistics.median(rss for rss, _ in plateau)
    peak = max(rss for _, rss, _ in samples)
    return {"streams": streams, "idle_rss_mb": round(idle / 2**20, 1),
            "plateau_rss_mb": round(middle / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
            "plateau_open_streams": round(statistics.median(n for _, n in plateau)),
            "rss_kb_per_open_stream": round(
                statistics.median((rss - idle) / min(n, streams) for rss, n in plateau) / 1024,
                1),
            "rss_kb_per_stream_of_1000": round((middle - idle) / streams / 1024, 1),
            "peak_rss_kb_per_stream": round((peak - idle) / streams / 1024, 1),
            "errors": errors}


# Rounds of each `store` setting in the store section, false and true alternating.
STORE_ROUNDS = 3


def store_rounds(url: str, pid: int, body: dict[str, Any], concurrency: int, requests: int,
                 rounds: int = STORE_ROUNDS, processes: int = 1) -> dict[str, Any]:
    """CPU per request of the gateway `pid` with `store: false` and `store: true`, `rounds`
    runs of `requests` each, interleaved (false, true, false, ...: the machine's noise hits
    both alike), and the median of each setting's runs (one disturbed run moves it less than
    it moves a mean)."""
    cost: dict[str, list[float]] = {"false": [], "true": []}
    errors = 0
    for store in (False, True) * rounds:
        row = measured(url, "responses", concurrency, requests, dict(body, store=store),
                       {"proxy": pid}, processes)
        cost[str(store).lower()].append(row["proxy_cpu_us_per_request"])
        errors += row["errors"]
    false, true = statistics.median(cost["false"]), statistics.median(cost["true"])
    return {"store_false_us": round(false, 1), "store_true_us": round(true, 1),
            "store_overhead_pct": round((true / false - 1) * 100, 1),
            "requests_per_run": requests, "errors": errors, "runs_us": cost}


def section_store(scale: float, store_url: str | None = None) -> dict[str, Any]:
    """CPU per request with store true vs false, and with replayed lineages of 10/100/1000;
    on SQLite, or on the store `store_url` names (PostgreSQL)."""
    import urllib.request

    out: dict[str, Any] = {}
    with mock_upstream(0.0) as (up_url, _), tempfile.TemporaryDirectory() as tmp, \
            orp(up_url, os.path.join(tmp, "bench.sqlite3"), store_url) as (gw_url, gw_pid):
        short = {"model": "bench", "input": "x", "max_output_tokens": 16}
        measured(gw_url, "responses", 10, 100, dict(short, store=True),
                 {"proxy": gw_pid})  # warm-up
        # Each round at least a few hundred requests (a second or so of the gateway's CPU:
        # /proc counts it in 10 ms ticks), even with --quick.
        for label, body, requests in (("16_tokens", short, max(300, int(800 * scale))),
                                      ("256_tokens", dict(BENCH_BODY),
                                       max(150, int(400 * scale)))):
            out[label] = store_rounds(gw_url, gw_pid, body, 10, requests)
        _print("store", out)
        out["paced20_256_tokens"] = _store_cost_paced(store_url)
        _print("store paced", out["paced20_256_tokens"])

        def post(body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(gw_url + "/responses", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return dict(json.loads(resp.read()))

        replay: dict[str, Any] = {}
        previous = None
        depth = 0
        for target_depth in (10, 100, 1000):
            while depth < target_depth:
                previous = post(dict(short, previous_response_id=previous))["id"]
                depth += 1
            body = dict(short, previous_response_id=previous, store=False)
            before = procs.cpu_seconds(gw_pid)
            started = time.perf_counter()
            n = 20
            for _ in range(n):
                post(body)
            spent = procs.cpu_seconds(gw_pid) - before
            replay[str(target_depth)] = {
                "proxy_cpu_ms_per_request": round(spent / n * 1000, 2),
                "wall_ms_per_request": round((time.perf_counter() - started) / n * 1000, 2)}
        out["replay"] = replay
        _print("replay", replay)
    return out


def _store_cost_paced(store_url: str | None = None) -> dict[str, Any]:
    """store:true vs false where models really are: 256 tokens at 20 ms, 100 streams (a run
    of 100 is one wave of ~5 s, with --quick too)."""
    with mock_upstream(20.0) as (up_url, _), tempfile.TemporaryDirectory() as tmp, \
            orp(up_url, os.path.join(tmp, "bench.sqlite3"), store_url) as (gw_url, gw_pid):
        # Warm-up (imports, the store's first connections), kept out of the first run.
        run_load(gw_url, "responses", 10, 20, dict(BENCH_BODY, store=True, max_output_tokens=16))
        return store_rounds(gw_url, gw_pid, BENCH_BODY, 100, 100, processes=2)


def section_json(scale: float, target: str | None, target_pid: int | None) -> dict[str, Any]:
    with mock_upstream(0.0) as (up_url, up_pid), tempfile.TemporaryDirectory() as tmp, \
            _gateway(up_url, tmp, target, target_pid) as (gw_url, gw_pid):
        body = dict(BENCH_BODY, max_output_tokens=16)
        row = measured(gw_url, "responses-json", 10, int(1000 * scale), body,
                       {"proxy": gw_pid, "upstream": up_pid})
    _print("json", row)
    return row


def section_routing(scale: float) -> dict[str, Any]:
    """CPU per request with ORP_CONFIG routing one model over two replicas, against the same
    load through one upstream (no file): what choosing a deployment, counting it in and out
    and its metrics add. Interleaved runs, so that the machine's noise hits both alike."""
    with mock_upstream(0.0) as (one_url, _), mock_upstream(0.0) as (two_url, _), \
            tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "orp.toml")
        with open(path, "w") as handle:
            handle.write(f"""
[upstreams.one]
url = "{one_url}"
[upstreams.two]
url = "{two_url}"
[models.bench]
deployments = [{{ upstream = "one", model = "bench" }}, {{ upstream = "two", model = "bench" }}]
""")
        out: dict[str, Any] = {}
        with orp(one_url, os.path.join(tmp, "single.sqlite3")) as (single_url, single_pid), \
                orp(None, os.path.join(tmp, "routed.sqlite3"), ORP_CONFIG=path) as (
                    routed_url, routed_pid):
            for label, tokens, requests in (("16_tokens", 16, int(2000 * scale)),
                                            ("256_tokens", TOKENS, int(800 * scale))):
                body = dict(BENCH_BODY, max_output_tokens=tokens)
                cost: dict[str, list[float]] = {"single": [], "routed": []}
                errors = 0
                for name, url, pid in (("single", single_url, single_pid),
                                       ("routed", routed_url, routed_pid)) * 3:
                    row = measured(url, "responses", 10, requests, body, {"proxy": pid})
                    cost[name].append(row["proxy_cpu_us_per_request"])
                    errors += row["errors"]
                single = statistics.median(cost["single"])
                routed = statistics.median(cost["routed"])
                out[label] = {"single_upstream_us": round(single, 1),
                              "routed_2_replicas_us": round(routed, 1),
                              "added_us_per_request": round(routed - single, 1),
                              "added_pct": round((routed / single - 1) * 100, 1),
                              "errors": errors, "runs_us": cost}
                _print(f"routing {label}", out[label])
    out["router_in_process_us"] = _router_bookkeeping()
    _print("routing in process", out["router_in_process_us"])
    return out


def _router_bookkeeping(n: int = 100_000) -> dict[str, float]:
    """The router's own work per request, timed in this process: picking one of two
    deployments, counting it in and out, its metrics (no I/O)."""
    import aiohttp

    from orp_proxy.config import Quirks
    from orp_proxy.config_file import parse_config
    from orp_proxy.routing import RouteHints, Router
    from orp_proxy.upstream.client import UpstreamClient

    text = """
[upstreams.one]
url = "http://127.0.0.1:1/v1"
[upstreams.two]
url = "http://127.0.0.1:2/v1"
[routing]
sticky = "prompt_cache_key"
[models.bench]
deployments = [{ upstream = "one", model = "bench" }, { upstream = "two", model = "bench" }]
"""

    async def run() -> dict[str, float]:
        file = parse_config("bench.toml", text, {})
        async with aiohttp.ClientSession() as session:
            clients = {name: UpstreamClient(session, spec.url, None, max_line_bytes=1024)
                       for name, spec in file.upstreams.items()}
            router = Router.from_config(file, clients, session, defaults=Quirks())
            deployments = router.table["bench"]
            out = {}
            for label, hints in (("least_outstanding", None),
                                 ("prompt_cache_key", RouteHints(prompt_cache_key="tenant-42"))):
                started = time.perf_counter()
                for _ in range(n):
                    # The same steps as Router.open around the upstream call.
                    chosen = router._pick(deployments, [], time.monotonic(), hints)
                    assert chosen is not None
                    chosen.begin()
                    chosen.observe(0.01)
                    router._succeeded(chosen)
                    chosen.end()
                out[label] = round((time.perf_counter() - started) / n * 1e6, 2)
            return out

    return asyncio.run(run())


def _print(label: str, row: Any) -> None:
    print(f"== {label}\n{json.dumps(row, indent=1)}", flush=True)


# -- targets (issue 16) and the README's table ------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target: `label`, the figure it is judged by (`get` from the results, None when
    not measured), `op` and `limit`, `unit`."""

    key: str
    label: str
    get: Callable[[dict[str, Any]], float | None]
    op: str  # "<=" | ">=" | "=="
    limit: float
    unit: str = ""


def _path(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        value: Any = results
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value if isinstance(value, (int, float)) else None
    return get


def _errors_1000(results: dict[str, Any]) -> float | None:
    """Errors among 1000 concurrent streams: the sweep's c=1000 rows and the memory run."""
    found = [_path("sweep", label, "1000", "errors")(results) for label in ("zero_delay",
                                                                            "paced20")]
    found.append(_path("memory", "errors")(results))
    present = [v for v in found if v is not None]
    return sum(present) if present else None


def _peer_vs_orp_zero(results: dict[str, Any]) -> float | None:
    peer = _path("cpu", "zero_delay_10", "through_peer", "proxy_cpu_us_per_token")(results)
    orp = _path("cpu", "zero_delay_10", "through_orp", "proxy_cpu_us_per_token")(results)
    return _ratio(peer, orp, 2)


TARGETS = (
    Target("paced_cpu_per_token_vs_mock", "Paced 20 ms, 100 streams: CPU per token, ORP / mock",
           _path("cpu", "paced20_100", "cpu_per_token_ratio_orp_vs_mock"), "<=", 1.7, "x"),
    Target("zero_delay_cpu_per_token", "Zero-delay, 10 streams: CPU per token",
           _path("cpu", "zero_delay_10", "through_orp", "proxy_cpu_us_per_token"), "<=", 5.0,
           "µs"),
    Target("zero_delay_peer_vs_orp", "Zero-delay, 10 streams: peer / ORP CPU per token",
           _peer_vs_orp_zero, ">=", 10.0, "x"),
    Target("fixed_cpu_per_request", "Fixed CPU per request (store on, 16-token answer)",
           _path("cpu", "zero_delay_10", "proxy_fixed_cpu_us_per_request"), "<=", 300.0, "µs"),
    Target("burst_added_ttfb_p50", "100 streams starting together: added TTFB p50",
           _path("burst", "orp", "added_ttfb_p50_ms"), "<=", 10.0, "ms"),
    Target("rss_per_open_stream", "RSS per open paced stream (1000 streams)",
           _path("memory", "rss_kb_per_open_stream"), "<=", 25.0, "KB"),
    Target("store_overhead_sqlite_256", "store:true extra CPU, zero-delay, 256 t, SQLite",
           _path("store", "256_tokens", "store_overhead_pct"), "<=", 10.0, "%"),
    Target("store_overhead_sqlite_16", "store:true extra CPU, zero-delay, 16 t, SQLite",
           _path("store", "16_tokens", "store_overhead_pct"), "<=", 10.0, "%"),
    Target("store_overhead_postgresql_256", "store:true extra CPU, zero-delay, 256 t, PostgreSQL",
           _path("store_postgresql", "256_tokens", "store_overhead_pct"), "<=", 10.0, "%"),
    Target("store_overhead_postgresql_16", "store:true extra CPU, zero-delay, 16 t, PostgreSQL",
           _path("store_postgresql", "16_tokens", "store_overhead_pct"), "<=", 10.0, "%"),
    Target("paced_throughput_ratio", "Paced 20 ms, 100 streams: throughput ORP / direct",
           _path("cpu", "paced20_100", "throughput_ratio_orp_vs_direct"), ">=", 0.99, "x"),
    Target("errors_1000_streams", "1000 concurrent streams: errors", _errors_1000, "==", 0.0),
)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target with its measured figure, threshold and pass/fail ("not measured" when its
    section did not run)."""
    out: dict[str, Any] = {}
    for target in TARGETS:
        figure = target.get(results)
        row: dict[str, Any] = {"label": target.label, "threshold": _threshold(target)}
        if figure is None:
            row.update(figure=None, result="not measured")
        else:
            ok = {"<=": figure <= target.limit, ">=": figure >= target.limit,
                  "==": figure == target.limit}[target.op]
            row.update(figure=figure, result="pass" if ok else "fail")
        out[target.key] = row
    return out


def _threshold(target: Target) -> str:
    sign = {"<=": "≤", ">=": "≥", "==": "="}[target.op]
    return f"{sign} {target.limit:g}{(' ' + target.unit) if target.unit else ''}"


def _figure(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):  # ratios keep 3 decimals: 0.985 must not read as 0.99
        text = f"{value:,.{3 if abs(value) < 10 else 1}f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:,}"
    return f"{text} {unit}".strip()


def machine_line(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    pin = results.get("pinning", {})
    where = (f"gateway on CPU {','.join(map(str, pin['gateway_cpus']))}, mock upstream and "
             f"load on CPU {','.join(map(str, pin['others_cpus']))}"
             if pin.get("enabled") else "not pinned")
    return (f"Measured {results.get('date', '?')} on {machine.get('cores', '?')} cores, Python "
            f"{machine.get('python', '?')}, {machine.get('platform', '?')}; {where}; "
            f"load average {machine.get('loadavg', '?')} at the start; "
            f"{results.get('tokens_per_response', TOKENS)}-token streams, store on; "
            + (f"PostgreSQL: {results['postgres']}; " if results.get("postgres") else "")
            + f"peer: {results.get('peer', {}).get('command', 'none')}.")


def table(results: dict[str, Any]) -> str:
    """The README's table (reStructuredText): the targets, then the figures they are judged
    against (mock upstream floor, stack floor, peer), with the machine line; a row of several
    figures (a / b) shows when all of them were measured."""
    rows: list[tuple[str, str, str, str]] = []
    for row in (results.get("targets") or targets(results)).values():
        target = next(t for t in TARGETS if t.label == row["label"])
        rows.append((row["label"], _figure(row["figure"], target.unit), row["threshold"],
                     row["result"]))
    context: tuple[tuple[Any, ...], ...] = (  # label, unit, the figures' getters
        ("Mock upstream's own CPU per token, zero-delay", "µs",
         _path("cpu", "zero_delay_10", "direct", "upstream_cpu_us_per_token")),
        ("Mock upstream's own CPU per token, paced", "µs",
         _path("cpu", "paced20_100", "direct", "upstream_cpu_us_per_token")),
        ("ORP CPU per token, paced", "µs",
         _path("cpu", "paced20_100", "through_orp", "proxy_cpu_us_per_token")),
        ("Stack floor (aiohttp relay): fixed CPU per request", "µs",
         _path("cpu", "zero_delay_10", "floor_fixed_cpu_us_per_request")),
        ("ORP's own fixed CPU per request (ORP \N{MINUS SIGN} floor)", "µs",
         _path("cpu", "zero_delay_10", "orp_own_fixed_cpu_us_per_request")),
        ("Stack floor: CPU per token, zero-delay / paced", "µs",
         _path("cpu", "zero_delay_10", "through_floor", "proxy_cpu_us_per_token"),
         _path("cpu", "paced20_100", "through_floor", "proxy_cpu_us_per_token")),
        ("Stack floor: RSS per open paced stream", "KB",
         _path("memory", "floor", "rss_kb_per_open_stream")),
        ("Stack floor: 100 streams together, added TTFB p50", "ms",
         _path("burst", "floor", "added_ttfb_p50_ms")),
        ("Peer CPU per token, zero-delay", "µs",
         _path("cpu", "zero_delay_10", "through_peer", "proxy_cpu_us_per_token")),
        ("Peer CPU per token, paced", "µs",
         _path("cpu", "paced20_100", "through_peer", "proxy_cpu_us_per_token")),
        ("Peer fixed CPU per request", "µs",
         _path("cpu", "zero_delay_10", "peer_fixed_cpu_us_per_request")),
        ("Burst TTFB p50 direct / ORP", "ms", _path("burst", "direct", "ttfb_p50_ms"),
         _path("burst", "orp", "ttfb_p50_ms")),
        ("Peer: 100 streams together, added TTFB p50", "ms",
         _path("burst", "peer", "added_ttfb_p50_ms")),
        ("One request alone: added TTFB, ORP", "ms",
         _path("burst", "single", "orp", "added_ttfb_ms")),
        ("One request alone: added TTFB, peer", "ms",
         _path("burst", "single", "peer", "added_ttfb_ms")),
    )
    for label, unit, *getters in context:
        values = [get(results) for get in getters]
        if None not in values:
            rows.append((label, f"{' / '.join(map(_figure, values))} {unit}", "—", ""))
    header = ("Figure", "Measured", "Target", "Result")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
    rule = " ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    body = [line(r) for r in rows]
    return "\n".join([machine_line(results), "", rule, line(header), rule, *body, rule])


SECTIONS = ("cpu", "burst", "sweep", "memory", "store", "json", "routing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument("--target", help="measure another Responses endpoint (base URL with /v1)")
    parser.add_argument("--target-pid", type=int, help="PID of that gateway's process")
    parser.add_argument("--out", default="bench-results.json", help="result file (JSON)")
    postgres = parser.add_mutually_exclusive_group()
    postgres.add_argument("--postgres", action="store_true",
                          help="the store section also on PostgreSQL, next to SQLite: a "
                               "throwaway server of the run's own on 127.0.0.1, pinned off the "
                               "gateway's CPU (Debian's postgresql package binaries)")
    postgres.add_argument("--store-url", metavar="URL",
                          help="the same on an external PostgreSQL database "
                               "(postgresql://USER@HOST:PORT/DB), not pinned")
    parser.add_argument("--peer", metavar="COMMAND",
                        help="a peer gateway measured beside ORP in the cpu and burst sections: "
                             "a shell command with {upstream}, {port}, {tmp} and {config}")
    parser.add_argument("--peer-config", metavar="FILE",
                        help="a template written to {config} for each start of the peer "
                             "(same substitutions)")
    parser.add_argument("--peer-model", default="bench", help="the model the peer is asked for")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the stack floor (scripts/floor_gateway.py), measured "
                             "beside ORP in the cpu, burst and memory sections by default")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave every process on every CPU")
    parser.add_argument("--table", metavar="RESULTS",
                        help="print the README's table from a results file, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    scale = 0.25 if args.quick else 1.0
    chosen = args.only or list(SECTIONS)
    peer = None
    if args.peer:
        config = Path(args.peer_config) if args.peer_config else None
        peer = Peer(args.peer, args.peer_model, config.read_text() if config else None,
                    config.name if config else "peer-config.yaml")
    floor = None if args.no_floor else FLOOR
    peers = [each for each in (floor, peer) if each is not None]
    pinning = configure_pinning(not args.no_pin)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())},
        "tokens_per_response": TOKENS, "target": args.target or "orp (orp-proxy serve)",
        "quick": args.quick,
    }
    if peer is not None:
        results["peer"] = {"command": peer.command, "model": peer.model,
                           "config": peer.config}
    if floor is not None:
        results["floor"] = {"command": floor.command}
    started = time.time()
    if "cpu" in chosen:
        results["cpu"] = section_cpu(scale, args.target, args.target_pid, peers)
    if "burst" in chosen:
        results["burst"] = section_burst(scale, args.target, args.target_pid, peers)
    if "sweep" in chosen:
        results["sweep"] = section_sweep(scale, args.target, args.target_pid)
    if "memory" in chosen:
        results["memory"] = section_memory(scale, args.target, args.target_pid, floor)
    if "store" in chosen and args.target is None:
        results["store"] = section_store(scale)
        if args.store_url:
            results["postgres"] = "external"
            results["store_postgresql"] = section_store(scale, args.store_url)
        elif args.postgres:
            with own_postgres() as (url, server):
                results["postgres"] = server
                results["store_postgresql"] = section_store(scale, url)
    if "json" in chosen:
        results["json"] = section_json(scale, args.target, args.target_pid)
    if "routing" in chosen and args.target is None:
        results["routing"] = section_routing(scale)
    results["duration_s"] = round(time.time() - started, 1)
    results["pinning"] = dict(PIN.record(), **pinning)
    results["targets"] = targets(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
