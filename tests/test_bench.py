"""scripts/bench's bookkeeping: targets judged from a results file, the README table, the
peer's template substitution, the store section's rounds and its PostgreSQL server (`--postgres`);
the stack floor (scripts/floor_gateway.py) relaying the mock upstream's streams (no timing:
nothing here runs a benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from scripts import bench, floor_gateway, procs
from tests import pg


def _results() -> dict[str, Any]:
    return {
        "date": "2026-12-02 12:00 UTC",
        "machine": {"cores": 2, "python": "3.11.7", "platform": "Linux", "loadavg": "1.00"},
        "tokens_per_response": 256,
        "pinning": {"enabled": True, "gateway_cpus": [0], "others_cpus": [1]},
        "peer": {"command": "litellm --port {port}"},
        "cpu": {
            "zero_delay_10": {
                "direct": {"upstream_cpu_us_per_token": 0.3},
                "through_orp": {"proxy_cpu_us_per_token": 4.0},
                "through_peer": {"proxy_cpu_us_per_token": 60.0},
                "proxy_fixed_cpu_us_per_request": 350.0,
            },
            "paced20_100": {
                "direct": {"upstream_cpu_us_per_token": 26.0},
                "through_orp": {"proxy_cpu_us_per_token": 39.0},
                "cpu_per_token_ratio_orp_vs_mock": 1.5,
                "throughput_ratio_orp_vs_direct": 0.995,
            },
        },
        "burst": {"direct": {"ttfb_p50_ms": 80.0}, "orp": {"ttfb_p50_ms": 95.0,
                                                            "added_ttfb_p50_ms": 15.0}},
        "store": {"16_tokens": {"store_overhead_pct": 12.5},
                  "256_tokens": {"store_overhead_pct": 3.0}},
        "sweep": {"zero_delay": {"1000": {"errors": 0}}, "paced20": {"1000": {"errors": 0}}},
        "memory": {"errors": 2, "rss_kb_per_open_stream": 24.0},
    }


def test_targets_judge_each_figure_and_name_what_was_not_measured() -> None:
    judged = bench.targets(_results())
    assert {key: row["result"] for key, row in judged.items()} == {
        "paced_cpu_per_token_vs_mock": "pass",
        "zero_delay_cpu_per_token": "pass",
        "zero_delay_peer_vs_orp": "pass",  # 60 / 4 = 15
        "fixed_cpu_per_request": "fail",
        "burst_added_ttfb_p50": "fail",
        "rss_per_open_stream": "pass",
        "store_overhead_sqlite_256": "pass",
        "store_overhead_sqlite_16": "fail",
        "store_overhead_postgresql_256": "not measured",
        "store_overhead_postgresql_16": "not measured",
        "paced_throughput_ratio": "pass",
        "errors_1000_streams": "fail",  # the memory run's 2 count
    }
    assert judged["zero_delay_peer_vs_orp"]["figure"] == 15.0
    assert judged["fixed_cpu_per_request"]["threshold"] == "≤ 300 µs"
    assert judged["store_overhead_postgresql_16"]["figure"] is None


def test_targets_of_an_empty_run_are_all_not_measured() -> None:
    assert {row["result"] for row in bench.targets({}).values()} == {"not measured"}


def test_table_is_a_restructuredtext_simple_table_with_the_machine_line() -> None:
    text = bench.table(_results())
    lines = text.splitlines()
    assert lines[0].startswith("Measured 2026-12-02 12:00 UTC on 2 cores, Python 3.11.7")
    assert "gateway on CPU 0, mock upstream and load on CPU 1" in lines[0]
    rules = [i for i, line in enumerate(lines) if line.startswith("=")]
    assert len(rules) == 3 and rules[1] == rules[0] + 2 and rules[2] == len(lines) - 1
    widths = [len(column) for column in lines[rules[0]].split(" ")]
    assert len(widths) == 4
    rows = lines[rules[1] + 1:rules[2]]
    assert any(row.startswith("Fixed CPU per request") and "350 µs" in row and "fail" in row
               for row in rows)
    assert any("PostgreSQL" in row and "not measured" in row for row in rows)
    assert any(row.startswith("Peer CPU per token, zero-delay") and "60 µs" in row
               for row in rows)
    assert any("80 / 95 ms" in row for row in rows)
    # docutils reads it as a table of that many rows, without a warning.
    import io

    import docutils.core

    warnings = io.StringIO()
    tree = docutils.core.publish_doctree(text, settings_overrides={
        "warning_stream": warnings, "report_level": 2})
    assert warnings.getvalue() == ""
    (body,) = [node for node in tree.findall() if node.tagname == "tbody"]
    assert len(body.children) == len(rows)


def test_fixed_and_marginal_split_cpu_per_request_by_the_tokens_answered() -> None:
    big = {"ok": 10, "tokens": 2560, "proxy_cpu_us_per_request": 1000.0 + 256 * 5.0}
    small = {"ok": 10, "tokens": 160, "proxy_cpu_us_per_request": 1000.0 + 16 * 5.0}
    assert bench.fixed_and_marginal(big, small) == (1000.0, 5.0)
    # A gateway that ignored max_output_tokens: the two runs cannot tell the parts apart.
    assert bench.fixed_and_marginal(big, dict(big)) is None
    assert bench.fixed_and_marginal(big, dict(small, ok=0)) is None


def test_peer_templates_keep_their_own_braces() -> None:
    values = {"upstream": "http://127.0.0.1:9/v1", "port": "8080", "tmp": "/tmp/x"}
    template = 'api_base: "{upstream}"\nextra: {"a": {port}}\nfile: {tmp}/c {other}'
    assert bench.substitute(template, values) == (
        'api_base: "http://127.0.0.1:9/v1"\nextra: {"a": 8080}\nfile: /tmp/x/c {other}')
    assert bench.Peer("x", model="m").body(max_output_tokens=16) == {
        "model": "m", "input": "benchmark", "max_output_tokens": 16}
    # The stack floor is started as a peer is, and never asked to store.
    assert bench.FLOOR.name == "floor" and bench.FLOOR.body() == {"model": "bench",
                                                                  "input": "benchmark"}
    assert str(bench.FLOOR_GATEWAY) in bench.FLOOR.command


# -- the stack floor -------------------------------------------------------------------------


def _with_floor(results: dict[str, Any]) -> dict[str, Any]:
    """`results` with the stack floor's figures, as section_cpu, _burst and _memory give them."""
    results["cpu"]["zero_delay_10"].update(
        through_floor={"proxy_cpu_us_per_token": 3.25}, floor_fixed_cpu_us_per_request=500.0,
        orp_own_fixed_cpu_us_per_request=-150.0)
    results["cpu"]["paced20_100"]["through_floor"] = {"proxy_cpu_us_per_token": 31.5}
    results["memory"]["floor"] = {"rss_kb_per_open_stream": 18.5, "errors": 0}
    results["burst"]["floor"] = {"ttfb_p50_ms": 88.0, "added_ttfb_p50_ms": 8.0}
    return results


FLOOR_ROWS = {
    "Stack floor (aiohttp relay): fixed CPU per request": "500 µs",
    "ORP's own fixed CPU per request (ORP \N{MINUS SIGN} floor)": "-150 µs",
    "Stack floor: CPU per token, zero-delay / paced": "3.25 / 31.5 µs",
    "Stack floor: RSS per open paced stream": "18.5 KB",
    "Stack floor: 100 streams together, added TTFB p50": "8 ms",
}


def _table_rows(results: dict[str, Any]) -> dict[str, list[str]]:
    """The table's rows by label: [figure, target, result], split on its columns' rules."""
    lines = bench.table(results).splitlines()
    rule = next(line for line in lines if line.startswith("="))
    starts = [i for i, c in enumerate(rule) if c == "=" and (i == 0 or rule[i - 1] == " ")]
    cells = [[line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
             for line in lines if line and not line.startswith(("=", "Measured"))]
    return {row[0]: row[1:] for row in cells}


def test_table_shows_the_stack_floor_beside_the_targets_figures() -> None:
    rows = _table_rows(_with_floor(_results()))
    for label, figure in FLOOR_ROWS.items():
        assert rows[label] == [figure, "—", ""], label
    labels = list(rows)
    # In the reference part, after every target; the floor's figures judge nothing.
    last_target = max(labels.index(t.label) for t in bench.TARGETS)
    assert all(labels.index(label) > last_target for label in FLOOR_ROWS)
    assert bench.targets(_with_floor(_results())) == bench.targets(_results())
    # A run without the floor (--no-floor) has none of its rows; one figure missing of a
    # "zero-delay / paced" pair leaves that row out.
    assert not set(FLOOR_ROWS) & set(_table_rows(_results()))
    partial = _with_floor(_results())
    del partial["cpu"]["paced20_100"]["through_floor"]
    assert "Stack floor: CPU per token, zero-delay / paced" not in _table_rows(partial)


def test_cpu_section_measures_the_floor_beside_orp_with_the_same_workloads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """section_cpu's bookkeeping with its processes and loads faked: each gateway costs a
    fixed part per request plus a part per token, the figures the table reads come out."""
    cost = {"orp": (1000.0, 10.0), "floor": (400.0, 3.0)}  # fixed µs, µs per token
    bodies: dict[str, list[dict[str, Any]]] = {"orp": [], "floor": []}

    @contextlib.contextmanager
    def started(name: str) -> Iterator[tuple[str, int]]:
        yield f"http://{name}/v1", 1

    def measured(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
                 pids: dict[str, int], **_: Any) -> dict[str, Any]:
        tokens = body.get("max_output_tokens", bench.TOKENS)
        name = url.split("/")[2]
        fixed, per_token = cost.get(name, (0.0, 0.0))
        if name in bodies:
            bodies[name].append(body)
        return {"ok": requests, "tokens": requests * tokens, "tokens_per_s": 1000.0,
                "upstream_cpu_us_per_token": 1.0,
                "proxy_cpu_us_per_request": fixed + per_token * tokens,
                "proxy_cpu_us_per_token": round(fixed / tokens + per_token, 2)}

    monkeypatch.setattr(bench, "mock_upstream", lambda interval: started("up"))
    monkeypatch.setattr(bench, "_gateway", lambda *args: started("orp"))
    monkeypatch.setattr(bench, "peer_gateway", lambda upstream, peer: started(peer.name))
    monkeypatch.setattr(bench, "run_load", lambda *args, **kwargs: bench.LoadResult())
    monkeypatch.setattr(bench, "measured", measured)
    monkeypatch.setattr(bench, "_print", lambda label, row: None)

    cpu = bench.section_cpu(0.01, None, None, [bench.FLOOR])
    zero, paced = cpu["zero_delay_10"], cpu["paced20_100"]
    assert (zero["proxy_fixed_cpu_us_per_request"], zero["floor_fixed_cpu_us_per_request"],
            zero["orp_own_fixed_cpu_us_per_request"]) == (1000.0, 400.0, 600.0)
    assert zero["floor_marginal_cpu_us_per_token"] == 3.0
    assert zero["through_floor_16_tokens"]["tokens"] == zero["through_orp_16_tokens"]["tokens"]
    assert paced["through_floor"]["proxy_cpu_us_per_token"] == 4.56  # 400 / 256 + 3
    assert "through_floor_16_tokens" not in paced  # as ORP's: no short run when paced
    assert paced["cpu_per_token_ratio_floor_vs_mock"] == 4.56
    # The same workloads, the floor without `store` (a peer's body).
    assert [b.get("max_output_tokens") for b in bodies["floor"]] == [
        b.get("max_output_tokens") for b in bodies["orp"]]
    assert all(b["store"] for b in bodies["orp"]) and not any("store" in b
                                                              for b in bodies["floor"])
    rows = _table_rows({"cpu": cpu})
    assert rows["Stack floor: CPU per token, zero-delay / paced"][0] == "4.56 / 4.56 µs"
    assert rows["ORP's own fixed CPU per request (ORP \N{MINUS SIGN} floor)"][0] == "600 µs"


def test_stack_floor_relays_the_mock_upstreams_tokens(tmp_path: Path) -> None:
    """The floor as the bench starts it, against the bundled mock upstream as its own
    process: the load generator counts as many tokens through it as direct, and
    max_output_tokens caps the answer."""
    body = bench.FLOOR.body()
    with procs.mock_upstream(tmp_path) as (upstream, _), \
            bench.peer_gateway(upstream, bench.FLOOR) as (url, _pid):
        direct = bench.run_load(upstream, "chat", 2, 4, body)
        full = bench.run_load(url, "responses", 2, 4, body)
        short = bench.run_load(url, "responses", 2, 4, dict(body, max_output_tokens=16))
    assert (direct.ok, full.ok, short.ok) == (4, 4, 4), (full.error_samples, short.error_samples)
    assert direct.tokens == full.tokens == 4 * bench.TOKENS
    assert short.tokens == 4 * 16


async def test_stack_floor_marks_whole_lines_only(aiohttp_server: AiohttpServer,
                                                  aiohttp_client: AiohttpClient) -> None:
    """A read that cuts a token line in two still has it marked once, the request is sent
    upstream as a streaming chat completion, and the last bytes (no newline) are not lost."""
    pieces = [b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
              b'data: {"choices":[{"delta":{"con',
              b'tent":" w0"}}]}\n',
              b'\ndata: {"choices":[{"delta":{"content":" w1"}}]}\n\ndata: [DONE]']
    received: list[Any] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        received.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.05)  # each piece its own read at the floor
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    server = await aiohttp_server(app, host="127.0.0.1")
    client = await aiohttp_client(floor_gateway.build_app(str(server.make_url("/v1/"))))
    async with client.post("/v1/responses", json={"model": "m", "input": "hi",
                                                  "max_output_tokens": 3}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        data = await resp.read()
    assert data == b"".join(pieces).replace(floor_gateway.TOKEN, floor_gateway.MARKED)
    assert data.count(bench.RESPONSES_DELTA) == 2
    assert received == [{"model": "m", "stream": True, "max_tokens": 3,
                         "messages": [{"role": "user", "content": "hi"}]}]


# -- the store section ----------------------------------------------------------------------


def test_store_rounds_alternate_the_settings_and_take_each_ones_median(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three runs of each setting, false and true alternating; one disturbed run (the 900)
    moves neither median (it would triple the mean of the false runs)."""
    figures = iter([100.0, 110.0, 900.0, 112.0, 104.0, 108.0])
    runs: list[tuple[Any, ...]] = []

    def measured(url: str, kind: str, concurrency: int, requests: int, body: dict[str, Any],
                 pids: dict[str, int], processes: int = 1, **_: Any) -> dict[str, Any]:
        runs.append((body["store"], body.get("max_output_tokens"), concurrency, requests,
                     pids, processes))
        return {"proxy_cpu_us_per_request": next(figures), "errors": 1 if body["store"] else 0}

    monkeypatch.setattr(bench, "measured", measured)
    row = bench.store_rounds("http://orp/v1", 7, {"model": "bench", "max_output_tokens": 16},
                             10, 300)
    assert [run[0] for run in runs] == [False, True] * 3
    assert all(run[1:] == (16, 10, 300, {"proxy": 7}, 1) for run in runs)
    assert row == {"store_false_us": 104.0, "store_true_us": 110.0, "store_overhead_pct": 5.8,
                   "requests_per_run": 300, "errors": 3,
                   "runs_us": {"false": [100.0, 900.0, 104.0], "true": [110.0, 112.0, 108.0]}}


# -- --postgres: the store section's own PostgreSQL server ------------------------------------


def test_postgres_options_own_server_or_external_never_both(
        capsys: pytest.CaptureFixture[str]) -> None:
    own = bench.parse_args(["--only", "store", "--postgres"])
    assert own.postgres and own.store_url is None
    external = bench.parse_args(["--store-url", "postgresql://orp@127.0.0.1:5432/bench"])
    assert not external.postgres and external.store_url.endswith("/bench")
    assert not bench.parse_args([]).postgres
    with pytest.raises(SystemExit):
        bench.parse_args(["--postgres", "--store-url", "postgresql://x@127.0.0.1/y"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--postgres", "--store-url"])
def test_store_section_runs_on_sqlite_then_on_the_postgresql_server(
        option: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """main's wiring with the sections and the server faked: SQLite first, then the server's
    URL; its own server is up for that section only, and the results say which it was."""
    calls: list[tuple[str | None, bool]] = []
    server = {"up": False, "starts": 0}

    @contextlib.contextmanager
    def own_postgres() -> Iterator[tuple[str, str]]:
        server.update(up=True, starts=server["starts"] + 1)
        try:
            yield "postgresql://orp@127.0.0.1:1/bench", "own, pinned to CPU 1"
        finally:
            server["up"] = False

    def section_store(scale: float, store_url: str | None = None) -> dict[str, Any]:
        calls.append((store_url, server["up"]))
        return {"16_tokens": {"store_overhead_pct": 4.0 if store_url else 2.0}}

    monkeypatch.setattr(bench, "configure_pinning", lambda enabled: {})
    monkeypatch.setattr(bench, "own_postgres", own_postgres)
    monkeypatch.setattr(bench, "section_store", section_store)
    out = tmp_path / "results.json"
    url = ["postgresql://orp@db.internal:5432/bench"] if option == "--store-url" else []
    assert bench.main(["--only", "store", "--quick", option, *url, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    if option == "--postgres":
        assert calls == [(None, False), ("postgresql://orp@127.0.0.1:1/bench", True)]
        assert server == {"up": False, "starts": 1}
        assert results["postgres"] == "own, pinned to CPU 1"
    else:
        assert calls == [(None, False), ("postgresql://orp@db.internal:5432/bench", False)]
        assert server["starts"] == 0 and results["postgres"] == "external"
    assert results["targets"]["store_overhead_postgresql_16"]["figure"] == 4.0
    assert results["targets"]["store_overhead_sqlite_16"]["figure"] == 2.0
    assert f"PostgreSQL: {results['postgres']}; peer: none." in bench.machine_line(results)


def test_no_postgresql_without_an_option(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "configure_pinning", lambda enabled: {})
    monkeypatch.setattr(bench, "own_postgres", None)  # would fail if called
    monkeypatch.setattr(bench, "section_store", lambda scale, store_url=None: {})
    out = tmp_path / "results.json"
    assert bench.main(["--only", "store", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert "postgres" not in results and "store_postgresql" not in results
    assert "PostgreSQL" not in bench.machine_line(results)


def test_own_postgres_answers_on_loopback_pinned_off_the_gateway_cpu_and_is_gone_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server (tests/pg.py's, through scripts/pgcluster.py): ORP's store URL answers,
    the postmaster, every process it started and a backend forked later run on the others'
    CPUs only, nothing listens beyond 127.0.0.1; after the block the server and its
    directory are gone, and the harness's own CPU mask is what it was."""
    pg.require_postgres()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pinning needs 2 CPUs")
    others = cpus[1:]
    monkeypatch.setattr(bench.PIN, "gateway", cpus[:1])
    monkeypatch.setattr(bench.PIN, "others", others)
    monkeypatch.setattr(bench.PIN, "observed", {})
    mask = os.sched_getaffinity(0)

    async def ask(url: str) -> tuple[Any, ...]:
        """What the server says of itself, and its backend for this connection: the
        postmaster (its parent) and its CPUs, read while it runs."""
        con = await asyncpg.connect(url)
        try:
            row = await con.fetchrow("SELECT current_database(), "
                                     "current_setting('listen_addresses'), "
                                     "inet_server_addr()::text, pg_backend_pid()")
            backend = row[3]
            return (*row[:3], int(procs.stat_fields(backend)[1]),
                    sorted(os.sched_getaffinity(backend)))
        finally:
            await con.close()

    with bench.own_postgres() as (url, server):
        assert url.startswith("postgresql://orp@127.0.0.1:") and url.endswith("/bench")
        assert server.startswith("own (PostgreSQL ")
        assert server.endswith(f"fsync off), pinned to CPU {','.join(map(str, others))}")
        database, listen, address, postmaster, backend_cpus = asyncio.run(ask(url))
        assert (database, listen, address) == ("bench", "127.0.0.1", "127.0.0.1/32")
        assert backend_cpus == others
        directory = Path(os.readlink(f"/proc/{postmaster}/cwd")).parent
        assert directory.name.startswith("orp-pg-")
        server_procs = procs.tree(postmaster)
        assert len(server_procs) > 2  # the postmaster's helpers, at least
        assert {pid: sorted(os.sched_getaffinity(pid)) for pid in server_procs} == {
            pid: others for pid in server_procs}
        assert bench.PIN.observed["postgres"] == others
        assert os.sched_getaffinity(0) == mask
    assert not directory.exists()
    with contextlib.suppress(OSError):  # gone, or a zombie its new parent has yet to reap
        assert procs.stat_fields(postmaster)[0] == "Z"
    assert os.sched_getaffinity(0) == mask
