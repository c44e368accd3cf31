"""A real PostgreSQL server for the tests: an unprivileged cluster in a temporary directory.

Started once per test session (when a test first asks for it) by `scripts/pgcluster.py` from
Debian's `postgresql` package binaries, listening on 127.0.0.1 and a free port, and removed at
the end. The server refuses to run as root, so as root the cluster belongs to the `postgres`
user. Each test gets a database of its own.

Without the binaries the PostgreSQL tests are skipped on a developer's machine, but fail under
CI (`CI` set), where `.ci/run` installs them; `ORP_TEST_PG=0` skips them anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
from typing import Any

import asyncpg
import pytest

from orp_proxy.config import StoreTarget
from scripts.pgcluster import (
    PASSWORD,
    PASSWORD_USER,
    SUPERUSER,
    Cluster,
    find_bindir,
    running_cluster,
)

__all__ = ["PASSWORD", "PASSWORD_USER", "SUPERUSER", "Cluster", "find_bindir",
           "require_postgres", "running_cluster", "store_rows"]


def require_postgres() -> str:
    """The binaries' directory, or skip (fail under CI) when there are none."""
    if os.environ.get("ORP_TEST_PG") == "0":
        pytest.skip("ORP_TEST_PG=0: PostgreSQL tests turned off")
    bindir = find_bindir()
    if bindir is None:
        message = ("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                   "apt-get install postgresql, or set ORP_TEST_PG=0 to skip these tests")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return bindir


async def store_rows(target: StoreTarget, sql: str, params: tuple[Any, ...] = ()
                     ) -> list[tuple[Any, ...]]:
    """Rows of `sql` read from a store's database directly, as another process would: SQLite's
    `?` placeholders, turned into `$n` for PostgreSQL."""
    if target.backend == "sqlite":
        def read() -> list[tuple[Any, ...]]:
            with contextlib.closing(sqlite3.connect(target.path)) as db:
                return [tuple(row) for row in db.execute(sql, params).fetchall()]

        return await asyncio.to_thread(read)
    numbered = iter(range(1, 1000))
    text = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
    con = await asyncpg.connect(target.dsn)
    try:
        return [tuple(row) for row in await con.fetch(text, *params)]
    finally:
        await con.close()
