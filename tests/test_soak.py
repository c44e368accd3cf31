"""The soak script, shortened: `scripts/soak.py` must pass a short run end to end.

The full-length soak (minutes; see the script) runs with ORP_SOAK_SECONDS=180 (and optionally
ORP_SOAK_CONCURRENCY); in CI it runs for 10 s, which still checks that no acknowledged response
is lost, no request fails and the database is intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("ORP_SOAK_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("ORP_SOAK_CONCURRENCY", "20" if SECONDS < 60 else "50"))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="samples /proc of the gunicorn workers")


def test_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", str(SECONDS),
         "--concurrency", str(CONCURRENCY), "--json", str(out), "--workdir",
         str(tmp_path / "work")],
        capture_output=True, text=True, timeout=SECONDS + 240, cwd=tmp_path)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == []
    assert result["responses_lost"] == 0 and result["errors"] == 0
    assert result["integrity_check"] == "ok"
    assert result["worker_restarts"] == 0
    # Real work happened: chained conversations, both workers, many streams at once.
    assert result["acknowledged"] == result["turns"] > 10 * CONCURRENCY / 2
    assert result["conversations"] >= CONCURRENCY
    assert len(result["growth"]["workers"]) == 2
    assert result["concurrent_streams_max"] == CONCURRENCY
