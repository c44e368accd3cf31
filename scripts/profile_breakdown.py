"""Where ORP's CPU goes, per token and per request: py-spy samples of the proxy process under a
bench workload, grouped by what the code is doing, scaled by the CPU the process spent.

    scripts/profile                          # zero delay, 256-token streams, store on
    scripts/profile --tokens 16              # the fixed cost of a request dominates
    scripts/profile --interval-ms 20 --concurrency 100 --requests 300   # paced, as in production
    scripts/profile --native                 # C frames too (event loop, syscalls, ujson)

The proxy runs pinned to CPU 0, the mock upstream and the load on the others (as scripts/bench
does). Each sample goes to the first group, from the innermost frame outwards, whose pattern
matches; the idle worker thread of aiosqlite waiting for work is not CPU and is left out.
Sampling slows the process a little: the shares are what to read, the microseconds are the
shares times the CPU measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

try:
    import bench  # run as a script: its folder is on sys.path
except ImportError:  # imported as scripts.profile_breakdown
    from scripts import bench

# (group, substrings of a frame "function (file:line)"); the innermost matching frame decides.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("garbage collector", ("gc_collect",)),
    ("store (SQLite/PostgreSQL, its thread included)", (
        "orp_proxy/store/", "aiosqlite/", "asyncpg/", "sqlite3", "TimedStore")),
    ("upstream chunks: line split", ("SSELineBuffer",)),
    ("upstream chunks: decode (PlainText shortcut, ujson)", (
        "PlainText.", "UpstreamStream.batches")),
    ("transcoder (events, response object)", ("orp_proxy/protocol/transcoder.py",)),
    ("SSE encoding", ("orp_proxy/protocol/sse.py",)),
    ("request: validation, translation, response object", (
        "orp_proxy/protocol/", "orp_proxy/pipeline.py")),
    ("client writes (aiohttp StreamResponse / writer)", (
        "aiohttp/http_writer.py", "aiohttp/web_response.py")),
    ("upstream HTTP client (aiohttp request, response, reads)", (
        "aiohttp/client", "aiohttp/connector.py", "aiohttp/streams.py", "_http_parser",
        "aiohttp/http_parser.py", "orp_proxy/upstream/", "orp_proxy/routing.py")),
    ("server request handling (aiohttp, middlewares)", (
        "aiohttp/web_protocol.py", "aiohttp/web_request.py", "aiohttp/web_app.py",
        "aiohttp/web_middlewares.py", "aiohttp/web_urldispatcher.py", "orp_proxy/http/",
        "orp_proxy/ops/", "aiohttp/helpers.py", "multidict", "yarl")),
    ("exchange pump and transport glue", ("orp_proxy/exchange.py",)),
    ("event loop, syscalls, task switches", (
        "run_app", "uvloop", "libc.so", "asyncio/", "epoll", "uv__", "_asyncio")),
]
IDLE = ("_connection_worker_thread (aiosqlite", "SimpleQueue_get", "PyThread_acquire_lock")


def classify(stack: list[str]) -> str | None:
    """The group of one sample (innermost frame first), None for an idle thread."""
    leaf = stack[-1]
    if any(mark in leaf for mark in IDLE) or (
            len(stack) > 1 and any(mark in stack[-2] for mark in IDLE[1:])):
        return None
    for frame in reversed(stack):
        for group, patterns in GROUPS:
            if any(p in frame for p in patterns):
                return group
    return "other"


def breakdown(raw: Path) -> Counter[str]:
    """Samples per group from py-spy's `--format raw` output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        group = classify(stack.split(";"))
        if group is not None:
            counts[group] += int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--store", choices=("true", "false"), default="true")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="sample C frames too")
    parser.add_argument("--keep", metavar="PATH", help="keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is needed: pip install -e '.[profile]'")
    body = dict(bench.BENCH_BODY, store=args.store == "true", max_output_tokens=args.tokens)
    with bench.mock_upstream(args.interval_ms) as (up_url, up_pid), \
            tempfile.TemporaryDirectory() as tmp, \
            bench.orp(up_url, os.path.join(tmp, "profile.sqlite3")) as (gw_url, gw_pid):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(gw_pid, {cpus[0]})
            os.sched_setaffinity(up_pid, set(cpus[1:]))
        bench.measured(gw_url, "responses", args.concurrency, max(100, args.requests // 10),
                       body, {"proxy": gw_pid})  # warm-up
        raw = Path(tmp) / "profile.txt"
        command = [spy, "record", "--pid", str(gw_pid), "--format", "raw", "--output",
                   str(raw), "--rate", str(args.rate), "--nonblocking"]
        if args.native:
            command.append("--native")
        recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        row = bench.measured(gw_url, "responses", args.concurrency, args.requests, body,
                             {"proxy": gw_pid, "upstream": up_pid})
        recorder.send_signal(2)
        recorder.wait(30)
        counts = breakdown(raw)
        if args.keep:
            shutil.copyfile(raw, args.keep)
    total = sum(counts.values()) or 1
    per_token, per_request = row["proxy_cpu_us_per_token"], row["proxy_cpu_us_per_request"]
    print(f"{args.requests} requests, {args.concurrency} concurrent, {args.tokens} tokens, "
          f"interval {args.interval_ms:g} ms, store {args.store}: proxy {per_token} us/token, "
          f"{per_request} us/request; mock upstream {row['upstream_cpu_us_per_token']} "
          f"us/token; errors {row['errors']}; {total} samples")
    print(f"{'share':>6}  {'us/token':>8}  {'us/req':>7}  group")
    for group, count in counts.most_common():
        share = count / total
        print(f"{share * 100:5.1f}%  {share * per_token:8.2f}  {share * per_request:7.1f}  {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
