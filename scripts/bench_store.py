#!/usr/bin/env python3
"""Benchmark the response store: save per turn and `load_lineage` by chain length.

Builds conversations of 10, 100 and 1000 turns (one short user message in, one assistant
message out per turn) in a temporary SQLite database (or the empty PostgreSQL database
`--store-url` names), then times `load_lineage` from the last turn.

    python scripts/bench_store.py [--turns 10,100,1000] [--loads 50] [--json out.json]
                                  [--store-url postgresql://USER@HOST:PORT/DB]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ujson

from orp_proxy.config import Settings
from orp_proxy.store import ResponseStore, StoredResponse
from orp_proxy.store.factory import open_store

# Response ids are unique in a database: a second run against the same one needs new ones.
_RUN = f"{time.time_ns():x}"


def _user_item(turn: int) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_in_{turn:06d}",
        "role": "user",
        "content": [{"type": "input_text", "text": f"Question {turn}: what comes after {turn}?"}],
    }


def _assistant_item(turn: int) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_out_{turn:06d}",
        "role": "assistant",
        "status": "completed",
        "content": [
            {
                "type": "output_text",
                "text": f"After {turn} comes {turn + 1}; the turn after that is {turn + 2}.",
                "annotations": [],
                "logprobs": [],
            }
        ],
    }


def _response(resp_id: str, prev: str | None, turn: int, created: int) -> dict[str, Any]:
    # Shaped like a real ResponseResource, so the row sizes are realistic.
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created,
        "completed_at": created,
        "status": "completed",
        "incomplete_details": None,
        "model": "bench-model",
        "previous_response_id": prev,
        "instructions": None,
        "output": [_assistant_item(turn)],
        "error": None,
        "tools": [],
        "tool_choice": "auto",
        "truncation": "disabled",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_logprobs": 0,
        "temperature": 1.0,
        "reasoning": None,
        "usage": {
            "input_tokens": 20 * turn,
            "output_tokens": 20,
            "total_tokens": 20 * turn + 20,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        "max_output_tokens": None,
        "max_tool_calls": None,
        "store": True,
        "background": False,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": p95 * 1000,
        "min_ms": ordered[0] * 1000,
    }


async def _bench_chain(store: ResponseStore, owner: str, turns: int, loads: int) -> dict[str, Any]:
    prev: str | None = None
    saves: list[float] = []
    base = int(time.time())
    for turn in range(turns):
        resp_id = f"resp_{_RUN}_{turns}_{turn:06d}"
        record = StoredResponse(
            id=resp_id,
            owner=owner,
            previous_response_id=prev,
            created_at=base + turn,
            status="completed",
            response=_response(resp_id, prev, turn, base + turn),
            input_items=[_user_item(turn)],
        )
        start = time.perf_counter()
        await store.save_response(record)
        saves.append(time.perf_counter() - start)
        prev = resp_id
    assert prev is not None
    for _ in range(3):  # warm the page cache and the statement cache
        await store.load_lineage(owner, prev)
    timings: list[float] = []
    items: list[dict[str, Any]] | None = None
    for _ in range(loads):
        start = time.perf_counter()
        items = await store.load_lineage(owner, prev)
        timings.append(time.perf_counter() - start)
    assert items is not None and len(items) == 2 * turns, "lineage is incomplete"
    return {
        "turns": turns,
        "items": len(items),
        "context_json_bytes": len(ujson.dumps(items)),
        "load_lineage": _summary(timings),
        "save_response": _summary(saves),
    }


async def _run(turn_counts: list[int], loads: int, directory: str, store_url: str | None
               ) -> dict[str, Any]:
    url = store_url or f"sqlite:///{os.path.join(directory, 'bench.sqlite3')}"
    store = await open_store(Settings(store_url=url))
    try:
        # A fresh owner per run: the chains of an earlier run in the same database stay apart.
        owner = store.owner_id(f"sk-bench-{time.time_ns()}")
        chains = [await _bench_chain(store, owner, n, loads) for n in turn_counts]
        stats = await store.stats()
    finally:
        await store.close()
    return {
        "python": platform.python_version(),
        "backend": "postgresql" if store_url else "sqlite",
        "server": stats.get("server_version") or f"SQLite {sqlite3.sqlite_version}",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loads_per_chain": loads,
        "db_bytes": stats["db_bytes"],
        "chains": chains,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--turns", default="10,100,1000", help="chain lengths, comma separated")
    parser.add_argument("--loads", type=int, default=50, help="timed loads per chain")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--store-url", metavar="URL",
                        help="an empty PostgreSQL database to measure instead of SQLite")
    args = parser.parse_args(argv)
    turn_counts = [int(part) for part in args.turns.split(",") if part.strip()]

    with tempfile.TemporaryDirectory(prefix="orp-bench-") as directory:
        result = asyncio.run(_run(turn_counts, args.loads, directory, args.store_url))

    print(
        f"{result['server']}, Python {result['python']}, {result['cpus']} CPUs, "
        f"{result['loads_per_chain']} loads per chain"
    )
    header = (
        f"{'turns':>6} {'items':>6} {'ctx KiB':>8} │ {'lineage med':>11} {'p95':>8} │ "
        f"{'save med':>9} {'p95':>8}"
    )
    print(header)
    print("─" * len(header))
    for chain in result["chains"]:
        lineage, save = chain["load_lineage"], chain["save_response"]
        print(
            f"{chain['turns']:>6} {chain['items']:>6} {chain['context_json_bytes'] / 1024:>8.1f} │ "
            f"{lineage['median_ms']:>8.3f} ms {lineage['p95_ms']:>5.3f} ms │ "
            f"{save['median_ms']:>6.3f} ms {save['p95_ms']:>5.3f} ms"
        )
    if args.json:
        Path(args.json).write_text(ujson.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
