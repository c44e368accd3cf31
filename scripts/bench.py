"""ORP benchmark harness: mock upstream, proxy and load generators as separate processes.

Figures that stay stable on a shared, noisy machine: CPU time of the proxy process per streamed
token and per request (from /proc/PID/stat), the same for the mock upstream as the floor, and
ratios measured within one run (through ORP vs direct to the upstream). Wall-clock figures
(requests/s, time to first event) are reported too, for the same workload.

    scripts/bench                       # the full suite, results in bench-results.json
    scripts/bench --quick               # a smaller run
    scripts/bench --only cpu            # one section: cpu, sweep, memory, store, json, routing
    scripts/bench --target URL --target-pid PID   # the same load against another gateway
    scripts/bench --only store --store-url postgresql://orp@127.0.0.1:5432/bench
                                        # store costs on SQLite and on PostgreSQL

Everything listens on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import procs  # run as a script: its folder is on sys.path
except ImportError:  # imported as scripts.bench
    from scripts import procs

TOKENS = 256


# -- processes ----------------------------------------------------------------------------


@contextlib.contextmanager
def mock_upstream(interval_ms: float) -> Iterator[tuple[str, int]]:
    """The mock upstream pacing `interval_ms`, a bench model answering `TOKENS` tokens."""
    with tempfile.TemporaryDirectory(prefix="orp-bench-mock-") as home, \
            procs.mock_upstream(Path(home), "--interval-ms", str(interval_ms),
                                "--bench-tokens", str(TOKENS)) as (url, proc):
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
    proc = subprocess.Popen(args, env=procs.clean_env(ORP_AUTH_MODE="none", **settings),
                            cwd=procs.ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    with procs.running(proc, sig=signal.SIGINT):
        procs.wait_port(port, proc)
        yield f"http://{procs.HOST}:{port}/v1", proc.pid


# -- load generation (runs in separate processes) -----------------------------------------


@dataclass
class LoadSpec:
    url: str  # .../v1
    kind: str  # "responses" | "chat" | "responses-json"
    concurrency: int
    requests: int  # total for this process
    body: dict[str, Any]
    timeout: float = 120.0


@dataclass
class LoadResult:
    ok: int = 0
    errors: int = 0
    tokens: int = 0
    ttfe: list[float] = field(default_factory=list)
    wall: float = 0.0
    error_samples: list[str] = field(default_factory=list)


async def _load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    result = LoadResult()
    path = "/chat/completions" if spec.kind == "chat" else "/responses"
    url = spec.url.rstrip("/") + path
    body = dict(spec.body)
    if spec.kind == "chat":
        body = {"model": body["model"], "stream": True, "messages": [
            {"role": "user", "content": "benchmark"}], "stream_options": {"include_usage": True}}
        if "max_output_tokens" in spec.body:
            body["max_tokens"] = spec.body["max_output_tokens"]
    elif spec.kind == "responses":
        body["stream"] = True
    marker = b'"content":' if spec.kind == "chat" else b"event: response.output_text.delta"
    remaining = spec.requests
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                async with session.post(url, json=body) as resp:
                    first = await resp.content.readany()
                    result.ttfe.append(time.perf_counter() - started)
                    rest = await resp.read()
                    data = first + rest
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {data[-200:]!r}")
                    if spec.kind == "responses-json":
                        answer = json.loads(data)
                        if answer["status"] not in ("completed", "incomplete"):
                            raise RuntimeError(f"response {answer['status']}")
                        result.tokens += answer["usage"]["output_tokens"]
                    else:
                        if b"[DONE]" not in data[-300:]:
                            raise RuntimeError(f"stream did not end: {data[-200:]!r}")
                        result.tokens += data.count(marker) - (1 if spec.kind == "chat" else 0)
                    result.ok += 1
            except Exception as exc:  # counted and sampled, never fatal
                result.errors += 1
                if len(result.error_samples) < 3:
                    result.error_samples.append(repr(exc)[:300])

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(spec.concurrency)))
    result.wall = time.perf_counter() - started
    return result


def _load_entry(spec: LoadSpec) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(_load(spec))
    except ImportError:
        return asyncio.run(_load(spec))


def run_load(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
             processes: int = 1) -> LoadResult:
    """Drive the load from `processes` separate processes and merge their results."""
    per = [requests // processes + (1 if i < requests % processes else 0)
           for i in range(processes)]
    conc = [max(1, concurrency // processes + (1 if i < concurrency % processes else 0))
            for i in range(processes)]
    specs = [LoadSpec(url, kind, c, n, body) for c, n in zip(conc, per, strict=True) if n]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(specs)) as pool:
        results = pool.map(_load_entry, specs)
    merged = LoadResult()
    for r in results:
        merged.ok += r.ok
        merged.errors += r.errors
        merged.tokens += r.tokens
        merged.ttfe.extend(r.ttfe)
        merged.wall = max(merged.wall, r.wall)
        merged.error_samples.extend(r.error_samples)
    return merged


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measured(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
             pids: dict[str, int], processes: int = 1) -> dict[str, Any]:
    """One workload: load result plus CPU seconds of each named process during it."""
    before = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
    result = run_load(url, kind, concurrency, requests, body, processes)
    cpu = {name: procs.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
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


def section_cpu(scale: float, target: str | None, target_pid: int | None) -> dict[str, Any]:
    """CPU per token and per request, zero-delay 10 streams and paced 20 ms 100 streams."""
    out: dict[str, Any] = {}
    for label, interval, conc, requests in (("zero_delay_10", 0.0, 10, int(3000 * scale)),
                                            ("paced20_100", 20.0, 100, int(400 * scale))):
        with mock_upstream(interval) as (up_url, up_pid), \
                tempfile.TemporaryDirectory() as tmp, \
                _gateway(up_url, tmp, target, target_pid) as (gw_url, gw_pid):
            pids = {"proxy": gw_pid, "upstream": up_pid}
            direct = measured(up_url, "chat", conc, requests, BENCH_BODY, {"upstream": up_pid})
            through = measured(gw_url, "responses", conc, requests, BENCH_BODY, pids)
            row = {"direct": direct, "through_orp": through}
            if direct["tokens_per_s"] and through["tokens_per_s"]:
                row["throughput_ratio_orp_vs_direct"] = round(
                    through["tokens_per_s"] / direct["tokens_per_s"], 3)
            if interval == 0.0:
                short = dict(BENCH_BODY, max_output_tokens=16)
                small = measured(gw_url, "responses", conc, requests, short, pids)
                row["through_orp_16_tokens"] = small
                big_req = through["proxy_cpu_us_per_request"]
                small_req = small["proxy_cpu_us_per_request"]
                per_token = (big_req - small_req) / (TOKENS - 16)
                row["proxy_fixed_cpu_us_per_request"] = round(small_req - 16 * per_token, 1)
                row["proxy_marginal_cpu_us_per_token"] = round(per_token, 2)
            out[label] = row
            _print(label, row)
    return out


@contextlib.contextmanager
def _gateway(upstream: str, tmp: str, target: str | None, target_pid: int | None
             ) -> Iterator[tuple[str, int]]:
    if target is not None:
        if target_pid is None:
            raise SystemExit("--target needs --target-pid to measure the gateway's CPU")
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


def section_memory(scale: float, target: str | None, target_pid: int | None
                   ) -> dict[str, Any]:
    """RSS of the proxy per concurrent open stream: 1000 slow streams held open at once.

    Each stream lasts ~10 s (256 tokens at 40 ms); the plateau is the median RSS over the middle
    of that window, when all streams are open; the peak includes the burst of 1000 requests
    arriving and finishing together.
    """
    streams = 1000
    interval_ms = 40.0
    with mock_upstream(interval_ms) as (up_url, _), tempfile.TemporaryDirectory() as tmp, \
            _gateway(up_url, tmp, target, target_pid) as (gw_url, gw_pid):
        run_load(gw_url, "responses", 20, 40, BENCH_BODY)  # warm up allocator and pools
        time.sleep(1.0)
        idle = procs.rss_kb(gw_pid) * 1024
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(2)
        samples: list[tuple[float, int]] = []
        try:
            started = time.monotonic()
            pending = pool.map_async(_load_entry, [
                LoadSpec(gw_url, "responses", streams // 2, streams // 2, BENCH_BODY)] * 2)
            while not pending.ready() and time.monotonic() - started < 90:
                samples.append((time.monotonic() - started, procs.rss_kb(gw_pid) * 1024))
                time.sleep(0.1)
            results = pending.get(timeout=120)
        finally:
            pool.close()
            pool.join()
    errors = sum(r.errors for r in results)
    lifetime = TOKENS * interval_ms / 1000
    plateau = [rss for t, rss in samples if lifetime * 0.4 <= t <= lifetime * 0.8]
    middle = statistics.median(plateau) if plateau else max(rss for _, rss in samples)
    peak = max(rss for _, rss in samples)
    row = {"streams": streams, "idle_rss_mb": round(idle / 2**20, 1),
           "plateau_rss_mb": round(middle / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
           "rss_kb_per_open_stream": round((middle - idle) / streams / 1024, 1),
           "peak_rss_kb_per_stream": round((peak - idle) / streams / 1024, 1),
           "errors": errors}
    _print("memory", row)
    return row


def section_store(scale: float, store_url: str | None = None) -> dict[str, Any]:
    """CPU per request with store true vs false, and with replayed lineages of 10/100/1000;
    on SQLite, or on the store `store_url` names (PostgreSQL)."""
    import urllib.request

    out: dict[str, Any] = {}
    with mock_upstream(0.0) as (up_url, _), tempfile.TemporaryDirectory() as tmp, \
            orp(up_url, os.path.join(tmp, "bench.sqlite3"), store_url) as (gw_url, gw_pid):
        short = {"model": "bench", "input": "x", "max_output_tokens": 16}
        pids = {"proxy": gw_pid}
        measured(gw_url, "responses", 10, 100, dict(short, store=True), pids)  # warm-up
        for label, body, requests in (("16_tokens", short, int(1200 * scale)),
                                      ("256_tokens", dict(BENCH_BODY), int(600 * scale))):
            cost: dict[str, list[float]] = {"false": [], "true": []}
            for store in (False, True, False, True):  # interleaved: noise hits both alike
                row = measured(gw_url, "responses", 10, requests, dict(body, store=store), pids)
                cost[str(store).lower()].append(row["proxy_cpu_us_per_request"])
            false, true = statistics.mean(cost["false"]), statistics.mean(cost["true"])
            out[label] = {"store_false_us": round(false, 1), "store_true_us": round(true, 1),
                          "store_overhead_pct": round((true / false - 1) * 100, 1)}
        _print("store", out)
        out["paced20_256_tokens"] = _store_cost_paced(scale, store_url)
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


def _store_cost_paced(scale: float, store_url: str | None = None) -> dict[str, Any]:
    """store:true vs false where models really are: 256 tokens at 20 ms, 100 streams."""
    cost: dict[str, list[float]] = {"false": [], "true": []}
    with mock_upstream(20.0) as (up_url, _), tempfile.TemporaryDirectory() as tmp, \
            orp(up_url, os.path.join(tmp, "bench.sqlite3"), store_url) as (gw_url, gw_pid):
        requests = max(100, int(200 * scale))
        for store in (False, True, False, True):
            row = measured(gw_url, "responses", 100, requests, dict(BENCH_BODY, store=store),
                           {"proxy": gw_pid}, processes=2)
            cost[str(store).lower()].append(row["proxy_cpu_us_per_request"])
    false, true = statistics.mean(cost["false"]), statistics.mean(cost["true"])
    return {"store_false_us": round(false, 1), "store_true_us": round(true, 1),
            "store_overhead_pct": round((true / false - 1) * 100, 1)}


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


SECTIONS = ("cpu", "sweep", "memory", "store", "json", "routing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument("--target", help="measure another Responses endpoint (base URL with /v1)")
    parser.add_argument("--target-pid", type=int, help="PID of that gateway's process")
    parser.add_argument("--out", default="bench-results.json", help="result file (JSON)")
    parser.add_argument("--store-url", metavar="URL",
                        help="the store section also on this PostgreSQL database "
                             "(postgresql://USER@HOST:PORT/DB), next to SQLite")
    args = parser.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    chosen = args.only or list(SECTIONS)
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "tokens_per_response": TOKENS, "target": args.target or "orp (orp-proxy serve)",
    }
    started = time.time()
    if "cpu" in chosen:
        results["cpu"] = section_cpu(scale, args.target, args.target_pid)
    if "sweep" in chosen:
        results["sweep"] = section_sweep(scale, args.target, args.target_pid)
    if "memory" in chosen:
        results["memory"] = section_memory(scale, args.target, args.target_pid)
    if "store" in chosen and args.target is None:
        results["store"] = section_store(scale)
        if args.store_url:
            results["store_postgresql"] = section_store(scale, args.store_url)
    if "json" in chosen:
        results["json"] = section_json(scale, args.target, args.target_pid)
    if "routing" in chosen and args.target is None:
        results["routing"] = section_routing(scale)
    results["duration_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
