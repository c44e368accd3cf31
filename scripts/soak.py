#!/usr/bin/env python3
"""Soak ORP: many concurrent chained conversations for minutes, then check nothing was lost.

Starts the mock upstream and ORP under gunicorn (the shipped `orp_proxy.ops.gunicorn_conf`, gateway
keys for four tenants) as subprocesses on loopback ports, then keeps `--concurrency`
conversations going for `--seconds`: each conversation is `--turns` turns chained with
`previous_response_id`, alternating streamed and JSON turns. Afterwards it checks that:

- every response acknowledged as completed (a `response.completed` event or a JSON 200) can be
  retrieved by its owner, with the same output (responses lost must be 0);
- no request failed and no worker restarted;
- file descriptors and resident memory of the workers stayed flat (sampled from /proc while
  the load runs; judged only on runs of a minute or more, where warm-up no longer dominates);
- `PRAGMA integrity_check` answers `ok` once ORP has stopped.

It prints a summary, writes it as JSON (`--json`), and exits 0 only if every check passed.
Bounded: loopback only, at most an hour and 500 conversations at a time; it stops by itself.

    python scripts/soak.py --seconds 180 --concurrency 50 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

try:
    import procs  # run as a script: its folder is on sys.path
except ImportError:  # imported by the tests as scripts.soak
    from scripts import procs

HOST = procs.HOST
MAX_SECONDS = 3600.0
MAX_CONCURRENCY = 500
START_TIMEOUT = 60.0
KEYS = tuple(f"soak-tenant-{i}-{'0123456789abcdef' * 2}" for i in range(4))
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima")


# -- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One look at a process in /proc."""

    files: int  # open descriptors that are not sockets: must not grow at all
    sockets: int  # client and upstream connections: bounded by the load
    rss_kb: int
    cpu_seconds: float


def proc_usage(pid: int) -> Usage | None:
    """What `pid` holds and has used, None if it is gone."""
    try:
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed while we looked
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        rss_kb, cpu = procs.rss_kb(pid), procs.cpu_seconds(pid)
    except OSError:
        return None
    sockets = sum(t.startswith("socket:") for t in targets)
    return Usage(len(targets) - sockets, sockets, rss_kb, cpu)


@dataclass
class Stack:
    """Mock upstream and ORP under gunicorn, running."""

    url: str  # ORP's base URL, ending in /v1
    master: subprocess.Popen[bytes]
    db_path: Path
    log: Path
    workers: int

    def worker_pids(self) -> list[int]:
        return procs.children(self.master.pid)


def _wait_until_serving(url: str, master: subprocess.Popen[bytes], workers: int,
                        log: Path) -> None:
    """Until every worker is up and /livez answers 200."""
    health = url.removesuffix("/v1") + "/livez"

    def serving() -> bool | None:
        if len(procs.children(master.pid)) < workers:
            return None
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                return True if resp.status == 200 else None
        except OSError:
            return None

    procs.wait_until(serving, master, what=f"{workers} workers and /livez 200",
                     output=lambda: log.read_text(errors="replace"), timeout=START_TIMEOUT,
                     every=0.1)


@contextlib.contextmanager
def running_stack(workdir: Path, *, workers: int = 2, interval_ms: float = 10.0,
                  keys: tuple[str, ...] = KEYS) -> Iterator[Stack]:
    """Start the mock upstream and gunicorn (gateway-key auth, store in `workdir`)."""
    with procs.mock_upstream(workdir, "--host", HOST, "--interval-ms", str(interval_ms),
                             timeout=START_TIMEOUT) as (upstream, _):
        port = procs.free_port(HOST)
        db_path = workdir / "orp.sqlite3"
        log = workdir / "gunicorn.log"
        env = procs.clean_env(
            workdir, ORP_UPSTREAM_URL=upstream, ORP_DB_PATH=str(db_path), ORP_AUTH_MODE="keys",
            ORP_API_KEYS=",".join(keys), ORP_HOST=HOST, ORP_PORT=str(port),
            ORP_WORKERS=str(workers), ORP_LOG_LEVEL="warning", ORP_UPSTREAM_RETRIES="0",
            PROMETHEUS_MULTIPROC_DIR=str(workdir / "metrics"))
        (workdir / "metrics").mkdir(exist_ok=True)
        with procs.gunicorn(workdir, env, *procs.GUNICORN_CONF, "orp_proxy.app:create_app",
                            stdout=log) as master:
            url = f"http://{HOST}:{port}/v1"
            _wait_until_serving(url, master, workers, log)
            yield Stack(url, master, db_path, log, workers)


def integrity_check(db_path: Path) -> str:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return ", ".join(row[0] for row in db.execute("PRAGMA integrity_check"))


# -- the client -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the client saw of one turn."""

    response_id: str | None = None
    status: str | None = None  # the response's status when acknowledged
    text: str | None = None
    error: str | None = None


def parse_sse(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    events = []
    done = False
    for block in data.split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
            else:
                events.append(json.loads(payload))
    return events, done


def output_text(response: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for item in response.get("output", [])
                   if item.get("type") == "message" for part in item.get("content", []))


async def turn(session: aiohttp.ClientSession, url: str, key: str, text: str,
               previous: str | None, stream: bool) -> Outcome:
    """One request; acknowledged only by a completed terminal event or a completed JSON 200."""
    body: dict[str, Any] = {"model": "mock", "input": text, "stream": stream}
    if previous:
        body["previous_response_id"] = previous
    try:
        async with session.post(url + "/responses", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as resp:
            data = await resp.read()
            if resp.status != 200:
                return Outcome(error=f"HTTP {resp.status}: {data[:200]!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}")
    if stream:
        events, done = parse_sse(data)
        final = events[-1] if events else {}
        if not done or final.get("type") != "response.completed":
            return Outcome(error=f"stream ended with {final.get('type')} (done={done})")
        response = final["response"]
    else:
        response = json.loads(data)
        if response.get("status") != "completed":
            return Outcome(error=f"JSON status {response.get('status')}")
    return Outcome(response["id"], response["status"], output_text(response))


@dataclass
class Load:
    """The running totals of the load phase."""

    acknowledged: dict[str, tuple[str, str]] = field(default_factory=dict)  # id → (key, text)
    conversations: int = 0
    turns: int = 0
    errors: list[str] = field(default_factory=list)
    wrong_answers: int = 0
    in_flight: int = 0
    in_flight_samples: list[int] = field(default_factory=list)


async def conversation_loop(load: Load, session: aiohttp.ClientSession, url: str, slot: int,
                            turns: int, deadline: float, max_turns: int) -> None:
    key = KEYS[slot % len(KEYS)]
    while time.monotonic() < deadline and load.turns < max_turns:
        load.conversations += 1
        number = load.conversations
        previous: str | None = None
        for t in range(turns):
            if time.monotonic() >= deadline or load.turns >= max_turns:
                return
            words = " ".join(random.choice(WORDS) for _ in range(6))
            text = f"conversation {number} turn {t}: {words}"
            load.in_flight += 1
            try:
                outcome = await turn(session, url, key, text, previous, stream=t % 2 == 0)
            finally:
                load.in_flight -= 1
            load.turns += 1
            if outcome.error is not None or outcome.response_id is None:
                load.errors.append(outcome.error or "no id")
                break  # the chain is broken: start a new conversation
            if outcome.text != f"You said: {text}":
                load.wrong_answers += 1
            load.acknowledged[outcome.response_id] = (key, outcome.text or "")
            previous = outcome.response_id


async def verify(url: str, acknowledged: dict[str, tuple[str, str]], concurrency: int
                 ) -> tuple[int, list[str]]:
    """GET every acknowledged response as its owner; (lost, examples of what was wrong)."""
    lost: list[str] = []
    queue = list(acknowledged.items())
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            while queue:
                response_id, (key, text) = queue.pop()
                try:
                    async with session.get(f"{url}/responses/{response_id}",
                                           headers={"Authorization": f"Bearer {key}"}) as resp:
                        body = await resp.json() if resp.status == 200 else None
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    lost.append(f"{response_id}: {type(exc).__name__}")
                    continue
                if body is None:
                    lost.append(f"{response_id}: HTTP {resp.status}")
                elif body.get("status") != "completed" or output_text(body) != text:
                    lost.append(f"{response_id}: stored {body.get('status')} differs")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lost), lost[:10]


# -- sampling and the run ---------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    workers: dict[int, Usage]


def sample_workers(stack: Stack, t: float) -> Sample:
    return Sample(t, {pid: u for pid in stack.worker_pids() if (u := proc_usage(pid))})


async def sampler(stack: Stack, load: Load, samples: list[Sample], every: float,
                  started: float, stop_event: asyncio.Event) -> None:
    while not stop_event.is_set():
        samples.append(sample_workers(stack, time.monotonic() - started))
        load.in_flight_samples.append(load.in_flight)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), every)


def growth(samples: list[Sample], warmup: float, idle: Sample) -> dict[str, Any]:
    """Per worker alive throughout: the first fifth of the steady state against the last, and
    what it holds once the load has stopped."""
    steady = [s for s in samples if s.t >= warmup] or samples
    report: dict[str, Any] = {}
    if len(steady) >= 2:
        fifth = max(1, len(steady) // 5)
        head, tail = steady[:fifth], steady[-fifth:]
        for pid in sorted(set(steady[0].workers) & set(steady[-1].workers)):
            def values(part: list[Sample], name: str, pid: int = pid) -> list[float]:
                return [getattr(s.workers[pid], name) for s in part if pid in s.workers]

            files0, files1 = max(values(head, "files")), max(values(tail, "files"))
            rss0 = statistics.median(values(head, "rss_kb")) / 1024
            rss1 = statistics.median(values(tail, "rss_kb")) / 1024
            idle_usage = idle.workers.get(pid)
            report[str(pid)] = {
                "file_fds_start": files0, "file_fds_end": files1,
                "file_fd_growth": files1 - files0,
                "sockets_start": statistics.median(values(head, "sockets")),
                "sockets_end": statistics.median(values(tail, "sockets")),
                "sockets_max": max(values(steady, "sockets")),
                "idle_sockets": idle_usage.sockets if idle_usage else None,
                "idle_fds": (idle_usage.sockets + idle_usage.files) if idle_usage else None,
                "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
                "rss_growth_mb": round(rss1 - rss0, 1),
                "cpu_seconds": round(steady[-1].workers[pid].cpu_seconds, 1),
            }
    return {
        "workers": report,
        "max_file_fd_growth": max((w["file_fd_growth"] for w in report.values()), default=0),
        "max_idle_sockets": max((w["idle_sockets"] or 0 for w in report.values()), default=0),
        "max_rss_growth_mb": max((w["rss_growth_mb"] for w in report.values()), default=0.0),
        "window_seconds": [round(steady[0].t, 1), round(steady[-1].t, 1)] if steady else [],
    }


async def run_load(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    load = Load()
    samples: list[Sample] = []
    initial_workers = stack.worker_pids()
    started = time.monotonic()
    deadline = started + args.seconds
    stop_event = asyncio.Event()
    # A new connection per request: the kernel spreads them over the workers (kept-alive
    # connections would all stay with whichever worker accepted them first), and connection
    # churn is part of what must not leak.
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampling = asyncio.create_task(
            sampler(stack, load, samples, args.sample_every, started, stop_event))
        await asyncio.gather(*(
            conversation_loop(load, session, stack.url, slot, args.turns, deadline,
                              args.max_turns) for slot in range(args.concurrency)))
        load_seconds = time.monotonic() - started
        stop_event.set()
        await sampling
    await asyncio.sleep(3.0)  # connections wind down; pooled upstream ones stay (keep-alive)
    idle = sample_workers(stack, time.monotonic() - started)
    final_workers = stack.worker_pids()
    lost, lost_examples = await verify(stack.url, load.acknowledged, min(args.concurrency, 20))
    warmup = min(30.0, args.seconds * 0.2)
    mem = growth(samples, warmup, idle)
    busy = [n for n in load.in_flight_samples[1:]] or [0]
    return {
        "seconds": round(load_seconds, 1),
        "concurrency": args.concurrency,
        "turns_per_conversation": args.turns,
        "workers": stack.workers,
        "conversations": load.conversations,
        "turns": load.turns,
        "acknowledged": len(load.acknowledged),
        "turns_per_second": round(load.turns / load_seconds, 1) if load_seconds else 0.0,
        "concurrent_streams_mean": round(statistics.mean(busy), 1),
        "concurrent_streams_max": max(busy),
        "errors": len(load.errors),
        "error_examples": load.errors[:10],
        "wrong_answers": load.wrong_answers,
        "responses_lost": lost,
        "lost_examples": lost_examples,
        "worker_restarts": len(set(final_workers) - set(initial_workers)),
        "samples": len(samples),
        "growth": mem,
    }


def verdict(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    if result["responses_lost"]:
        problems.append(f"{result['responses_lost']} acknowledged responses lost")
    if result["errors"]:
        problems.append(f"{result['errors']} requests failed")
    if result["wrong_answers"]:
        problems.append(f"{result['wrong_answers']} wrong answers")
    if result["worker_restarts"]:
        problems.append(f"{result['worker_restarts']} worker restarts")
    if result["integrity_check"] != "ok":
        problems.append(f"integrity_check: {result['integrity_check']}")
    if not result["acknowledged"]:
        problems.append("nothing was acknowledged")
    if result["seconds"] >= 60:  # shorter runs are all warm-up
        mem = result["growth"]
        if mem["max_file_fd_growth"] > args.max_fd_growth:
            problems.append(f"non-socket file descriptors grew by {mem['max_file_fd_growth']}")
        # Idle, a worker holds its listener and at most one pooled upstream connection per
        # stream it ever ran at once; more means connections leak.
        if mem["max_idle_sockets"] > result["concurrency"] + 8:
            problems.append(f"{mem['max_idle_sockets']} sockets still open when idle")
        if mem["max_rss_growth_mb"] > args.max_rss_growth_mb:
            problems.append(f"memory grew by {mem['max_rss_growth_mb']} MB")
    return problems


def summary(result: dict[str, Any]) -> str:
    mem = result["growth"]
    lines = [
        f"duration            {result['seconds']} s, {result['workers']} gunicorn workers",
        f"conversations       {result['conversations']} ({result['turns_per_conversation']} "
        "turns each, chained)",
        f"turns               {result['turns']} ({result['turns_per_second']}/s), "
        f"{result['acknowledged']} acknowledged",
        f"concurrent streams  {result['concurrent_streams_mean']} mean, "
        f"{result['concurrent_streams_max']} max (of {result['concurrency']})",
        f"errors              {result['errors']}, wrong answers {result['wrong_answers']}",
        f"responses lost      {result['responses_lost']}",
        f"worker restarts     {result['worker_restarts']}",
    ]
    for pid, w in mem["workers"].items():
        lines.append(
            f"worker {pid:<12} RSS {w['rss_start_mb']} -> {w['rss_end_mb']} MB "
            f"({w['rss_growth_mb']:+} MB); non-socket fds {w['file_fds_start']} -> "
            f"{w['file_fds_end']} ({w['file_fd_growth']:+}); sockets {w['sockets_start']:g} -> "
            f"{w['sockets_end']:g} (max {w['sockets_max']}, idle after {w['idle_sockets']}); "
            f"CPU {w['cpu_seconds']} s")
    lines.append(f"integrity_check     {result['integrity_check']}")
    lines.append(f"verdict             {'PASS' if not result['problems'] else 'FAIL: '}"
                 + "; ".join(result["problems"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="how long to keep the load going (default 180)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="conversations running at once (default 50)")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--interval-ms", type=float, default=10.0,
                        help="mock upstream pause between streamed words")
    parser.add_argument("--max-turns", type=int, default=2_000_000,
                        help="stop after this many turns even if time remains")
    parser.add_argument("--sample-every", type=float, default=2.0,
                        help="seconds between /proc samples of the workers")
    parser.add_argument("--max-fd-growth", type=float, default=2,
                        help="most non-socket descriptors a worker may gain (runs >= 60 s)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=32.0,
                        help="most resident MB a worker may gain (runs >= 60 s)")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    parser.add_argument("--workdir", type=Path,
                        help="keep the database and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 0 < args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
    if args.turns < 1 or args.workers < 1 or args.max_turns < 1:
        parser.error("--turns, --workers and --max-turns must be positive")

    with contextlib.ExitStack() as cleanup:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="orp-soak-")))
        with running_stack(workdir, workers=args.workers,
                           interval_ms=args.interval_ms) as stack:
            result = asyncio.run(run_load(stack, args))
        result["integrity_check"] = integrity_check(stack.db_path)  # ORP stopped: quiescent
        result["problems"] = verdict(result, args)
        print(summary(result), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
