"""scripts/profile's grouping of py-spy samples (no profiling runs here)."""

from __future__ import annotations

from pathlib import Path

from scripts.profile_breakdown import breakdown, classify

LOOP = "run_app (aiohttp/web.py:502)"
PUMP = "Exchange.pump (orp_proxy/exchange.py:95)"


def test_the_innermost_known_frame_decides() -> None:
    assert classify([LOOP, PUMP, "Transcoder.feed (orp_proxy/protocol/transcoder.py:270)",
                     "_Text.append (orp_proxy/protocol/transcoder.py:93)"]) == \
        "transcoder (events, response object)"
    assert classify([LOOP, PUMP, "UpstreamStream.batches (orp_proxy/upstream/client.py:246)",
                     "SSELineBuffer.feed (orp_proxy/protocol/sse_lines.py:54)"]) == \
        "upstream chunks: line split"
    assert classify([LOOP, PUMP, "SSETransport.send (orp_proxy/http/sse.py:48)",
                     "StreamWriter._writelines (aiohttp/http_writer.py:90)"]) == \
        "client writes (aiohttp StreamResponse / writer)"
    assert classify([LOOP]) == "event loop, syscalls, task switches"
    assert classify(["<module> (x.py:1)"]) == "other"


def test_the_idle_store_thread_is_not_cpu(tmp_path: Path) -> None:
    idle = ("Thread.run (threading.py:975);_connection_worker_thread (aiosqlite/core.py:60);"
            "_queue_SimpleQueue_get (_queuemodule.c:10);PyThread_acquire_lock_timed (x.c:1)")
    busy = ("Thread.run (threading.py:975);_connection_worker_thread (aiosqlite/core.py:60);"
            "_save_batch (orp_proxy/store/sqlite.py:300)")
    raw = tmp_path / "raw.txt"
    raw.write_text(f"{idle} 40\n{busy} 7\n{LOOP};{PUMP} 3\n")
    counts = breakdown(raw)
    assert counts == {"store (SQLite/PostgreSQL, its thread included)": 7,
                      "exchange pump and transport glue": 3}
