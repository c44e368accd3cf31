"""Where the memory of an open stream goes: ORP in this process, N paced streams from others.

    .venv/bin/python scripts/memprobe.py                 # 1000 streams, 40 ms/token, RSS + gc
    .venv/bin/python scripts/memprobe.py --trace 8       # plus tracemalloc (8 frames)

The mock upstream runs as its own process (as in `scripts/bench --only memory`), the load from
two more; ORP runs here on uvloop, so that at the plateau (all streams open) this process can
count what it holds: RSS, Python objects by type (gc, `sys.getsizeof`), and with `--trace`
the traced allocations by line, each minus the same figure taken idle, per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import multiprocessing
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
import procs


def _by_type() -> collections.Counter[str]:
    """Bytes (`sys.getsizeof`) of the objects gc tracks, by type name; plus counts."""
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        module = type(obj).__module__
        key = name if module == "builtins" else f"{module}.{name}"
        sizes[key] += sys.getsizeof(obj)
        sizes["#" + key] += 1
    return sizes


def _report_types(idle: collections.Counter[str], busy: collections.Counter[str], n: int,
                  top: int) -> None:
    diff = {k: busy[k] - idle.get(k, 0) for k in busy if not k.startswith("#")}
    total = sum(diff.values())
    print(f"\n-- gc-tracked objects: +{total / n / 1024:.1f} KB/stream "
          "(container objects only, getsizeof, not their str/bytes/int contents)")
    for key, size in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
        count = busy["#" + key] - idle.get("#" + key, 0)
        print(f"{size / n:9.0f} B/stream {count / n:7.2f} obj/stream  {key}")


def _print_sites(stats: list[Any], n: int, *, with_line: bool) -> None:
    """tracemalloc differences per stream, one line each: where, bytes and blocks."""
    for stat in stats:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1]
        if with_line:
            where += f":{frame.lineno}"
        print(f"{stat.size_diff / n:9.0f} B/stream {stat.count_diff / n:7.2f} blk/stream  {where}")


def _report_trace(idle: tracemalloc.Snapshot, busy: tracemalloc.Snapshot, n: int,
                  top: int) -> None:
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    busy = busy.filter_traces(filters)
    idle = idle.filter_traces(filters)
    stats = busy.compare_to(idle, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"\n-- tracemalloc: +{total / n / 1024:.1f} KB/stream traced, by line")
    _print_sites(stats[:top], n, with_line=True)
    print("\n-- tracemalloc: by file")
    _print_sites(busy.compare_to(idle, "filename")[:top], n, with_line=False)
    stats = busy.compare_to(idle, "traceback")
    print("\n-- tracemalloc: biggest by traceback (innermost last)")
    for stat in stats[:max(8, top // 3)]:
        print(f"{stat.size_diff / n:9.0f} B/stream {stat.count_diff / n:7.2f} blk/stream")
        for frame in list(stat.traceback)[-6:]:
            print(f"        {frame.filename.split('site-packages/')[-1]}:{frame.lineno}")


def _allocators() -> dict[str, int]:
    """Python's small-object allocator (`sys._debugmallocstats`) and glibc's (`mallinfo2`)."""
    import ctypes
    import re

    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode()
    figures: dict[str, int] = {}
    for label, pattern in (("py_arenas", r"arenas \* \d+ bytes/arena\s+=\s+([\d,]+)"),
                           ("py_used", r"# bytes in allocated blocks\s+=\s+([\d,]+)"),
                           ("py_free_blocks", r"# bytes in available blocks\s+=\s+([\d,]+)"),
                           ("py_free_pools", r"unused pools \* \d+ bytes\s+=\s+([\d,]+)")):
        found = re.search(pattern, text)
        figures[label] = int(found.group(1).replace(",", "")) if found else 0

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    figures.update(c_heap=info.arena, c_used=info.uordblks, c_free=info.fordblks,
                   c_mmap=info.hblkhd)
    return figures


def _report_allocators(idle: dict[str, int], busy: dict[str, int], n: int) -> None:
    print("\n-- allocators, KB/stream (plateau minus idle): " + ", ".join(
        f"{k} {(busy[k] - idle[k]) / n / 1024:+.1f}" for k in busy))


def _dict_shapes() -> collections.Counter[str]:
    """Dicts by their first keys, lists by length and first item's type, coroutines and
    generators by name: bytes and counts."""
    shapes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is dict:
            key = "dict {" + ",".join(sorted(map(str, obj))[:6])[:90] + "}"
        elif kind is list:
            key = f"list len {min(len(obj), 10)} of {type(obj[0]).__name__ if obj else '-'}"
        elif kind.__name__ in ("coroutine", "async_generator", "generator"):
            key = f"{kind.__name__} {getattr(obj, '__qualname__', '?')}"
        elif kind.__name__ == "deque":
            key = f"deque maxlen {obj.maxlen} len {min(len(obj), 10)}"
        else:
            continue
        shapes[key] += sys.getsizeof(obj)
        shapes["#" + key] += 1
    return shapes


def _report_dicts(idle: Any, n: int, top: int) -> None:
    busy = _dict_shapes()
    diff = {k: busy[k] - idle.get(k, 0) for k in busy if not k.startswith("#")}
    print("\n-- dicts, lists, coroutines, deques by shape")
    for key, size in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
        count = busy["#" + key] - idle.get("#" + key, 0)
        print(f"{size / n:9.0f} B/stream {count / n:7.2f} obj/stream  {{{key}}}")


def _report_backlog(registry: Any) -> None:
    """Bytes waiting in this process: read but not yet consumed (StreamReader buffers) and
    written but not yet sent (transport write buffers)."""
    from aiohttp.streams import StreamReader

    readers = [o for o in gc.get_objects() if isinstance(o, StreamReader)]
    unread = sum(getattr(r, "_size", 0) for r in readers)
    pending = sum(live.request.transport.get_write_buffer_size() for live in registry._live
                  if live.request.transport is not None)
    n = max(len(registry), 1)
    chunks = [o for o in gc.get_objects()
              if type(o) is dict and o.get("object") == "chat.completion.chunk"]
    print(f"chunk dicts alive: {len(chunks) / n:.2f}/stream")
    if os.environ.get("MEMPROBE_REFERRERS") and chunks:
        import random
        for chunk in random.sample(chunks, 3):
            for ref in gc.get_referrers(chunk):
                if ref is not chunks:
                    print("   referrer:", type(ref), repr(ref)[:300])
    print(f"backlog: {unread / n:.0f} B/stream unread in {len(readers)} StreamReaders, "
          f"{pending / n:.0f} B/stream unsent in server transports")


async def _main(args: argparse.Namespace) -> None:
    from aiohttp import web

    from orp_proxy.app import build_app
    from orp_proxy.config import load_settings
    from orp_proxy.ops.keepalive import STREAMS

    with tempfile.TemporaryDirectory(prefix="orp-memprobe-") as home, \
            procs.mock_upstream(Path(home), "--interval-ms", str(args.interval_ms),
                                "--bench-tokens", str(bench.TOKENS)) as (up_url, _):
        settings = load_settings(environ={}, overrides={
            "upstream_url": up_url, "db_path": os.path.join(home, "db.sqlite3"),
            "auth_mode": "none", "log_level": "warning"})
        port = procs.free_port()
        runner = web.AppRunner(build_app(settings), handler_cancellation=True, access_log=None,
                               keepalive_timeout=settings.keepalive_timeout)
        await runner.setup()
        await web.TCPSite(runner, procs.HOST, port, backlog=2048).start()
        url = f"http://{procs.HOST}:{port}/v1"
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(2)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, bench.run_load, url, "responses", 20, 40,
                                       bench.BENCH_BODY)
            await asyncio.sleep(1.0)
            gc.collect()
            if args.trace:
                tracemalloc.start(args.trace)
            idle_rss = procs.rss_kb(os.getpid())
            idle_alloc = _allocators()
            idle_dicts = _dict_shapes() if args.dicts else None
            idle_types = _by_type()
            idle_trace = tracemalloc.take_snapshot() if args.trace else None
            half = args.streams // 2
            started = time.monotonic()
            body = dict(bench.BENCH_BODY)
            if args.input_kb:
                # A conversation of that size: a message per KB, as an agent's context grows.
                body["input"] = [{"role": "user" if i % 2 == 0 else "assistant",
                                  "content": f"turn {i} " + "lorem ipsum " * 84}
                                 for i in range(args.input_kb)]
            if args.store:
                body["store"] = True
            pending = pool.map_async(bench._load_entry, [
                bench.LoadSpec(url, "responses", half, half, body)] * 2)
            lifetime = bench.TOKENS * args.interval_ms / 1000
            peak = 0
            registry = runner.app[STREAMS]
            # Until (nearly) all are open, then a second more for them to settle, but before
            # the first ones end.
            timeline = []
            while time.monotonic() - started < lifetime * 0.7 \
                    and len(registry) < args.streams * 0.98:
                peak = max(peak, procs.rss_kb(os.getpid()))
                timeline.append(f"{time.monotonic() - started:.1f}s {len(registry)} "
                                f"{procs.rss_kb(os.getpid()) / 1024:.0f}MB")
                await asyncio.sleep(0.25)
            print("timeline:", ", ".join(timeline))
            if args.at:
                await asyncio.sleep(max(0.0, args.at - 1 - (time.monotonic() - started)))
            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.sleep(min(1.0, max(0.2, lifetime * 0.75 - (time.monotonic() - started))))
            print(f"plateau taken at {time.monotonic() - started:.1f} s; this process used "
                  f"{(time.process_time() - cpu) / (time.monotonic() - wall):.0%} CPU just before")
            if args.watch:
                timeline = []
                while time.monotonic() - started < lifetime + 3:
                    timeline.append(f"{time.monotonic() - started:.1f}s {len(registry)} "
                                    f"{procs.rss_kb(os.getpid()) / 1024:.0f}MB")
                    await asyncio.sleep(0.25)
                print("timeline:", ", ".join(timeline))
                return
            open_streams = len(registry)
            # Requests in progress (connections of the load), streaming or about to: each
            # costs its connection's memory whether or not its events have started.
            assert runner.server is not None
            connections = len(runner.server.connections)
            busy_rss = procs.rss_kb(os.getpid())
            busy_alloc = _allocators()
            _report_backlog(registry)
            busy_types = _by_type()
            busy_trace = tracemalloc.take_snapshot() if args.trace else None
            n = max(connections, 1)
            print(f"open streams {open_streams}, connections {connections} (the divisor); "
                  f"RSS idle {idle_rss / 1024:.1f} MB, "
                  f"plateau {busy_rss / 1024:.1f} MB, peak {peak / 1024:.1f} MB: "
                  f"{(busy_rss - idle_rss) / n:.1f} KB/stream "
                  f"(peak {(peak - idle_rss) / n:.1f})")
            if args.trace:
                traced, traced_peak = tracemalloc.get_traced_memory()
                print(f"traced now {traced / 2**20:.1f} MB, peak {traced_peak / 2**20:.1f} MB")
            _report_allocators(idle_alloc, busy_alloc, n)
            if args.dicts:
                _report_dicts(idle_dicts, n, args.top)
            found = gc.collect()
            after = _allocators()
            print(f"gc.collect() at the plateau: {found / n:.1f} objects/stream unreachable, "
                  f"py_used {(after['py_used'] - busy_alloc['py_used']) / n / 1024:+.1f} "
                  "KB/stream")
            _report_types(idle_types, busy_types, n, args.top)
            if idle_trace is not None and busy_trace is not None:
                _report_trace(idle_trace, busy_trace, n, args.top)
            results: list[Any] = await loop.run_in_executor(None, pending.get, 120)
            print(f"\nload: ok {sum(r.ok for r in results)}, "
                  f"errors {sum(r.errors for r in results)}")
        finally:
            pool.close()
            pool.join()
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=40.0)
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    parser.add_argument("--at", type=float, default=0.0,
                        help="take the plateau this many seconds after the load started")
    parser.add_argument("--input-kb", type=int, default=0,
                        help="requests carry a conversation of about this many KB")
    parser.add_argument("--store", action="store_true", help="store: true")
    parser.add_argument("--dicts", action="store_true", help="dicts by their keys")
    parser.add_argument("--watch", action="store_true", help="RSS timeline only")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    import uvloop

    uvloop.run(_main(args))


if __name__ == "__main__":
    main()
