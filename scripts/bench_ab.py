"""Two ORP checkouts against one mock upstream, interleaved: before and after a change, in one run.

    scripts/bench_ab.py --a /path/to/old/checkout --b . [--tokens 16] [--store false]
                        [--interval-ms 20 --concurrency 100 --requests 300] [--rounds 3]

Each checkout runs as its own `python -m orp_proxy.cli serve` process (its folder first on
PYTHONPATH), pinned to CPU 0 as scripts/bench pins the gateway, the mock upstream and the load
on the other CPUs; the rounds alternate between them so that the machine's noise hits both, and
the medians of CPU per token and per request are printed (with every round's figure).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Any

try:
    import bench  # run as a script: its folder is on sys.path
    import procs
except ImportError:  # imported as scripts.bench_ab
    from scripts import bench, procs


def start(root: str, upstream: str, db: str) -> tuple[subprocess.Popen[bytes], str]:
    port = procs.free_port()
    env = procs.clean_env(ORP_AUTH_MODE="none")
    env["PYTHONPATH"] = root
    process = subprocess.Popen(
        [sys.executable, "-m", "orp_proxy.cli", "serve", "--port", str(port), "--db-path", db,
         "--log-level", "warning", "--upstream-url", upstream], env=env, cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs.wait_port(port, process)
    return process, f"http://{procs.HOST}:{port}/v1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="the checkout before")
    parser.add_argument("--b", required=True, help="the checkout after")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--store", choices=("true", "false"), default="true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    roots = [os.path.abspath(args.a), os.path.abspath(args.b)]
    body = dict(bench.BENCH_BODY, store=args.store == "true", max_output_tokens=args.tokens)
    rows: dict[str, list[dict[str, Any]]] = {root: [] for root in roots}
    with bench.mock_upstream(args.interval_ms) as (upstream, up_pid), \
            tempfile.TemporaryDirectory() as tmp:
        gateways = [start(root, upstream, os.path.join(tmp, f"{i}.sqlite3"))
                    for i, root in enumerate(roots)]
        try:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) >= 2:
                for process, _ in gateways:
                    os.sched_setaffinity(process.pid, {cpus[0]})
                os.sched_setaffinity(up_pid, set(cpus[1:]))
                os.sched_setaffinity(0, set(cpus[1:]))
            for process, url in gateways:  # warm-up
                bench.measured(url, "responses", args.concurrency, 100, body,
                               {"proxy": process.pid})
            for _ in range(args.rounds):
                for root, (process, url) in zip(roots, gateways, strict=True):
                    rows[root].append(bench.measured(
                        url, "responses", args.concurrency, args.requests, body,
                        {"proxy": process.pid, "upstream": up_pid}, processes=2 if
                        args.concurrency >= 100 else 1))
        finally:
            for process, _ in gateways:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(30)
    for label, root in zip(("before", "after"), roots, strict=True):
        token = [r["proxy_cpu_us_per_token"] for r in rows[root]]
        request = [r["proxy_cpu_us_per_request"] for r in rows[root]]
        mock = [r["upstream_cpu_us_per_token"] for r in rows[root]]
        print(f"{label} ({root}): {statistics.median(token)} us/token {token}, "
              f"{statistics.median(request)} us/request {request}; mock "
              f"{statistics.median(mock)} us/token; errors {sum(r['errors'] for r in rows[root])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
