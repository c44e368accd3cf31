"""scripts/bench's bookkeeping: targets judged from a results file, the README table, the
peer's template substitution (no timing: nothing here runs a benchmark)."""

from __future__ import annotations

from typing import Any

from scripts import bench


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
