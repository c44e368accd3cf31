"""The PostgreSQL store's own machinery, against a real server: migrations under the advisory
lock, the owner key shared by every process, passwords from files, group commit, and what
happens while the database is away (restarted, connections dropped, statements too slow).

The store's semantics (the same on both backends) are in `test_store.py` and
`test_e2e_store.py`; several hosts under gunicorn in `test_multihost.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orp_proxy.config import ConfigError, Settings, load_settings
from orp_proxy.store import StoreUnavailable
from orp_proxy.store import postgres as pg_module
from orp_proxy.store.factory import open_store
from orp_proxy.store.postgres import SCHEMA_VERSION, PostgresStore
from orp_proxy.upstream.mock import MockUpstream
from scripts import procs
from tests import pg
from tests.conftest import Proxy
from tests.test_store import OWNER, record, texts


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(pg_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def own_cluster() -> Iterator[pg.Cluster]:
    """A server of this test's own, to stop and start without disturbing the others."""
    with pg.running_cluster(pg.require_postgres()) as cluster:
        yield cluster


async def admin(url: str, sql: str, *args: Any) -> list[Any]:
    con = await asyncpg.connect(url)
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


# -- migrations and the owner key ------------------------------------------------------------


async def test_workers_starting_together_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(pg_url) for _ in range(8)))
    try:
        owners = {store.owner_id("sk-x") for store in stores}
        assert len(owners) == 1  # one key, created once, read by every process
        await stores[0].save_response(record("resp_1", OWNER))
        assert await stores[7].get_response(OWNER, "resp_1") is not None
        assert (await stores[3].stats())["schema_version"] == SCHEMA_VERSION
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    rows = await admin(pg_url, "SELECT key FROM meta ORDER BY key")
    assert [row[0] for row in rows] == ["owner_secret", "schema_version"]
    again = await PostgresStore.open(pg_url)  # nothing left to do: opens as it is
    try:
        assert again.owner_id("sk-x") in owners
    finally:
        await again.close()


async def test_refuses_newer_schema_and_an_outdated_one_without_migrating(pg_url: str) -> None:
    with pytest.raises(RuntimeError, match="run `orp-proxy store migrate`"):
        await PostgresStore.open(pg_url, migrate=False)
    (await PostgresStore.open(pg_url)).owner_id(None)  # migrates
    opened = await PostgresStore.open(pg_url, migrate=False)
    await opened.close()
    await admin(pg_url, "UPDATE meta SET value = $1 WHERE key = 'schema_version'",
                str(SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer"):
        await PostgresStore.open(pg_url)


async def test_owner_secret_setting_overrides_the_stored_key(pg_url: str) -> None:
    plain = await PostgresStore.open(pg_url)
    keyed = await PostgresStore.open(pg_url, owner_secret=b"operator key")
    try:
        assert plain.owner_id("sk-a") != keyed.owner_id("sk-a")
        assert keyed.owner_id("sk-a") == keyed.owner_id("sk-a")
        await keyed.save_response(record("resp_1", keyed.owner_id("sk-a")))
    finally:
        await plain.close()
        await keyed.close()
    dump = json.dumps([list(r) for r in await admin(
        pg_url, "SELECT owner, response FROM responses UNION ALL SELECT key, value FROM meta")])
    assert "sk-a" not in dump and "operator key" not in dump


# -- passwords -------------------------------------------------------------------------------


async def test_password_from_a_file_or_credential(pg_cluster: pg.Cluster, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_cluster.url("postgres", user=pg.PASSWORD_USER)
    database = pg_cluster.create_database()
    pg_cluster.psql(f"GRANT ALL ON DATABASE {database} TO {pg.PASSWORD_USER}")
    pg_cluster.psql(f"ALTER DATABASE {database} OWNER TO {pg.PASSWORD_USER}")
    url = pg_cluster.url(database, user=pg.PASSWORD_USER)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    secret = tmp_path / "pw"
    secret.write_text(pg.PASSWORD + "\n")

    without = Settings(store_url=url)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await open_store(without)

    store = await open_store(Settings(store_url=url, store_password_file=str(secret)))
    await store.close()
    (tmp_path / "store_password").write_text(pg.PASSWORD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    store = await open_store(without)
    try:
        assert pg.PASSWORD not in json.dumps(await store.stats())
    finally:
        await store.close()
    pg_cluster.drop_database(database)


def test_a_password_in_the_url_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://orp:sekrit-pw@db.example:5432/orp?sslmode=require&password=sekrit2"
    settings = load_settings({"ORP_DATABASE_URL": url})  # the alias
    assert settings.store_url == url
    shown = str(settings.redacted())
    assert "sekrit" not in shown and "db.example:5432/orp" in shown
    assert "sekrit" not in settings.store_target().shown()
    with pytest.raises(ConfigError) as caught:
        load_settings({"ORP_STORE_URL": "postgresql://orp:sekrit@db.example:99999999/x"})
    assert "sekrit" not in str(caught.value)
    for bad in ("mysql://x", "sqlite:relative", "sqlite:///", "postgresql:///nohost"):
        with pytest.raises(ConfigError, match="ORP_STORE_URL"):
            load_settings({"ORP_STORE_URL": bad})
    assert load_settings({"ORP_STORE_URL": "sqlite:///rel/orp.db"}).store_target().path == \
        "rel/orp.db"
    assert load_settings({"ORP_STORE_URL": "sqlite:////abs/orp.db"}).store_target().path == \
        "/abs/orp.db"
    assert Settings(db_path="x.db").store_target().path == "x.db"


async def test_inline_password_and_a_password_file_together_are_refused(
        tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("other")
    with pytest.raises(ConfigError, match="keep one"):
        await open_store(Settings(store_url="postgresql://u:p@127.0.0.1:1/x",
                                  store_password_file=str(secret)))


# -- group commit ----------------------------------------------------------------------------


async def test_concurrent_saves_share_statements_and_a_bad_one_fails_alone(
        store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    original = store._save_batch

    async def counting(batch: list[Any]) -> None:
        batches.append(len(batch))
        await original(batch)

    monkeypatch.setattr(store, "_save_batch", counting)
    good = [record(f"resp_{i}", OWNER) for i in range(50)]
    bad = record("resp_bad", OWNER)
    bad.previous_response_id = ["not", "a", "string"]  # type: ignore[assignment]
    results = await asyncio.gather(*(store.save_response(r) for r in good[:25]),
                                   store.save_response(bad),
                                   *(store.save_response(r) for r in good[25:]),
                                   return_exceptions=True)
    assert isinstance(results[25], (asyncpg.PostgresError, asyncpg.InterfaceError))
    assert [r for i, r in enumerate(results) if i != 25] == [None] * 50
    for rec in good:
        assert await store.get_response(OWNER, rec.id) is not None
    assert await store.get_response(OWNER, "resp_bad") is None
    # All 51 went in one statement, which the bad record failed, so that batch was written
    # again one record at a time.
    assert batches == [51] + [1] * 51, batches


async def test_the_same_response_saved_twice_in_one_batch(store: PostgresStore) -> None:
    first = record("resp_1", OWNER)
    second = record("resp_1", OWNER, outputs=[])
    second.status = "incomplete"
    await asyncio.gather(store.save_response(record("resp_0", OWNER)),
                         store.save_response(first), store.save_response(second))
    assert await store.get_response(OWNER, "resp_1") == second.response
    assert (await store.stats())["items"] == 2 + 1


async def test_save_is_shielded_from_cancellation(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    inputs = [{"type": "message", "id": f"in_{n}", "role": "user",
               "content": [{"type": "input_text", "text": "x" * 2000}]} for n in range(3000)]
    task = asyncio.create_task(store.save_response(record("resp_big", OWNER, inputs=inputs)))
    for _ in range(1000):  # until the save is queued and its writer started
        if store._saver is not None:
            break
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()  # waits for the shielded write
    reopened = await PostgresStore.open(pg_url)
    try:
        assert len(await reopened.load_lineage(OWNER, "resp_big") or []) == 3001
    finally:
        await reopened.close()


async def test_check_writable(store: PostgresStore, pg_url: str) -> None:
    assert await store.check_writable() is True
    blocker = await asyncpg.connect(pg_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")
        assert await store.check_writable(timeout=0.2) is False
        await transaction.rollback()
    finally:
        await blocker.close()
    assert await store.check_writable(timeout=5) is True


async def test_stats_and_vacuum(store: PostgresStore) -> None:
    for n in range(5):
        await store.save_response(record(f"resp_{n}", OWNER, created_at=100 + n))
    await store.vacuum()
    stats = await store.stats()
    assert (stats["responses"], stats["items"], stats["backend"]) == (5, 10, "postgresql")
    assert (stats["oldest_created_at"], stats["newest_created_at"]) == (100, 104)
    assert stats["db_bytes"] > 0 and stats["schema_version"] == SCHEMA_VERSION


# -- the database away -----------------------------------------------------------------------


async def test_a_restart_between_requests_goes_unnoticed(store: PostgresStore, pg_url: str
                                                         ) -> None:
    await store.save_response(record("resp_1", OWNER))
    await store.get_response(OWNER, "resp_1")  # the pool holds an open connection now
    # What a restart or failover does to open connections (and an idle-timeout killer too);
    # repeated, since the server's notice and the next statement race in several ways.
    for _ in range(10):
        await admin(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'orp-proxy'")
        assert await store.get_response(OWNER, "resp_1") is not None
    await store.save_response(record("resp_2", OWNER, "resp_1"))
    assert len(texts(await store.load_lineage(OWNER, "resp_2"))) == 4


async def test_statement_timeout_is_store_unavailable(pg_url: str) -> None:
    store = await open_store(Settings(store_url=pg_url, store_statement_timeout=0.3))
    blocker = await asyncpg.connect(pg_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE responses IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.get_response(OWNER, "resp_1")
        assert time.monotonic() - started < 5
        assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
        with pytest.raises(StoreUnavailable):
            await store.save_response(record("resp_1", OWNER))
        await transaction.rollback()
        await store.save_response(record("resp_1", OWNER))
    finally:
        await blocker.close()
        await store.close()


async def test_database_down_fails_fast_and_recovers_by_itself(own_cluster: pg.Cluster) -> None:
    url = own_cluster.url()
    store = await PostgresStore.open(url)
    try:
        await store.save_response(record("resp_1", OWNER))
        own_cluster.stop("fast")
        for attempt in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.load_lineage(OWNER, "resp_1")
            with pytest.raises(StoreUnavailable):
                await store.save_response(record(f"resp_down{attempt}", OWNER))
            assert time.monotonic() - started < 3, "not failing fast"
            await asyncio.sleep(0.3)
        assert await store.check_writable(timeout=1) is False
        own_cluster.start()
        deadline = time.monotonic() + 10
        while not await store.check_writable(timeout=1):
            assert time.monotonic() < deadline, "never recovered"
            await asyncio.sleep(0.1)
        assert len(await store.load_lineage(OWNER, "resp_1") or []) == 2
        await store.save_response(record("resp_2", OWNER, "resp_1"))
        assert len(await store.load_lineage(OWNER, "resp_2") or []) == 4
        assert await store.get_response(OWNER, "resp_down0") is None
    finally:
        await store.close()


async def test_the_gateway_while_the_database_is_away(
        own_cluster: pg.Cluster, start_proxy: Any, settings: Settings, mock: MockUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The fail-fast period lasts until the readiness probe finds the database again, so that
    # what happens inside it does not depend on the machine's speed.
    monkeypatch.setattr(pg_module, "_DOWN_SECONDS", 600.0)
    proxy: Proxy = await start_proxy(dataclasses.replace(settings, store_url=own_cluster.url()))
    url = proxy.server.make_url

    async def post(body: dict[str, Any]) -> tuple[int, Any]:
        async with proxy.session.post(url("/v1/responses"), json=body) as resp:
            return resp.status, await resp.read()

    status, raw = await post({"model": "mock", "input": "hi"})
    assert status == 200
    first = json.loads(raw)["id"]
    own_cluster.stop("fast")

    def unavailable(status: int, raw: bytes) -> None:
        assert status == 503, raw
        assert json.loads(raw)["error"]["code"] == "store_unavailable"

    # Not yet known to be away: the answer streams, but it cannot be saved, so it ends failed.
    status, _, raw = await proxy.post({"model": "mock", "input": "x", "stream": True})
    assert status == 200
    terminal = [line for line in raw.decode().splitlines() if line.startswith("data: {")][-1]
    event = json.loads(terminal[6:])
    assert event["type"] == "response.failed"
    assert event["response"]["error"]["code"] == "store_unavailable"
    # Known to be away now: whatever needs the store is refused at once, before the upstream.
    upstream_calls = len(mock.requests)
    unavailable(*await post({"model": "mock", "input": "x", "previous_response_id": first}))
    unavailable(*await post({"model": "mock", "input": "x"}))
    status, headers, raw = await proxy.post({"model": "mock", "input": "x", "stream": True})
    unavailable(status, raw)
    assert headers["Retry-After"] == "1"
    for path in (f"/v1/responses/{first}", f"/v1/responses/{first}/input_items"):
        async with proxy.session.get(url(path)) as resp:
            unavailable(resp.status, await resp.read())
    assert len(mock.requests) == upstream_calls
    # store: false needs no store.
    status, raw = await post({"model": "mock", "input": "x", "store": False})
    assert status == 200
    # WebSocket mode: the turn is refused with the same error, the connection stays open.
    async with proxy.session.ws_connect(url("/v1/responses")) as ws:
        await ws.send_json({"type": "response.create", "model": "mock", "input": "x",
                            "previous_response_id": first})
        envelope = await ws.receive_json(timeout=10)
        assert envelope["type"] == "error" and envelope["status"] == 503
        assert envelope["error"]["code"] == "store_unavailable"
        await ws.send_json({"type": "response.create", "model": "mock", "input": "y",
                            "store": False})
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "error"):
            events.append(await ws.receive_json(timeout=10))
        assert events[-1]["type"] == "response.completed"
    async with proxy.session.get(url("/readyz")) as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "store_not_writable"

    own_cluster.start()
    deadline = time.monotonic() + 15
    while True:
        async with proxy.session.get(url("/readyz")) as resp:
            if resp.status == 200:
                break
        assert time.monotonic() < deadline, "never ready again"
        await asyncio.sleep(0.1)
    status, raw = await post({"model": "mock", "input": "again", "previous_response_id": first})
    assert status == 200, raw


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX")
async def test_start_up_with_the_database_down_is_a_clear_error(own_cluster: pg.Cluster) -> None:
    own_cluster.stop("fast")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await open_store(Settings(store_url=own_cluster.url(), store_connect_timeout=2))
    assert time.monotonic() - started < 10
    assert "cannot connect" in caught.value.detail


def test_module_constants_are_sane() -> None:
    assert 0 < pg_module._MIGRATION_LOCK < 2**63
    assert pg_module.is_unavailable(ConnectionRefusedError())
    assert not pg_module.is_unavailable(ValueError())


# -- orp-proxy store migrate / status / copy -------------------------------------------------


def cli(*args: str) -> tuple[int, Any, str]:
    result = subprocess.run([sys.executable, "-m", "orp_proxy.cli", "store", *args],
                            capture_output=True, text=True, timeout=120,
                            env=procs.clean_env(), cwd=procs.ROOT)
    try:
        out = json.loads(result.stdout) if result.stdout.strip() else None
    except ValueError:
        out = result.stdout
    return result.returncode, out, result.stderr


def test_store_status_and_migrate_commands(pg_url: str, tmp_path: Path) -> None:
    code, status, _ = cli("status", "--store-url", pg_url)
    assert code == 0
    assert (status["schema_version"], status["pending_migrations"]) == (0, SCHEMA_VERSION)
    code, migrated, _ = cli("migrate", "--store-url", pg_url)
    assert code == 0 and migrated["schema_version"] == SCHEMA_VERSION
    assert migrated["pending_migrations"] == 0
    code, stats, _ = cli("stats", "--store-url", pg_url)
    assert code == 0 and stats["responses"] == 0 and stats["backend"] == "postgresql"
    sqlite_url = f"sqlite:///{tmp_path / 'new.sqlite3'}"
    code, status, _ = cli("status", "--store-url", sqlite_url)
    assert code == 0 and status["schema_version"] == 0 and status["backend"] == "sqlite"
    assert cli("migrate", "--store-url", sqlite_url)[1]["pending_migrations"] == 0
    # An unreachable server: one line, exit 1, no traceback.
    code, _, err = cli("status", "--store-url", "postgresql://orp@127.0.0.1:1/x",
                       "--store-connect-timeout", "2")
    assert code == 1 and "unavailable" in err and "Traceback" not in err


async def test_store_copy_between_backends(pg_url: str, tmp_path: Path) -> None:
    source_path = tmp_path / "old.sqlite3"
    source = await open_store(Settings(store_url=f"sqlite:///{source_path}"))
    alice = source.owner_id("sk-alice")
    now = time.time()
    try:
        await source.save_response(record("resp_1", alice))
        await source.save_response(record("resp_2", alice, "resp_1", expires_at=now + 3600))
        await source.save_response(record("resp_3", source.owner_id("sk-bob"), created_at=7))
        original = await source.get_response(alice, "resp_2")
    finally:
        await source.close()

    code, copied, err = cli("copy", "--from", f"sqlite:///{source_path}", "--to", pg_url)
    assert code == 0, err
    assert (copied["responses"], copied["items"]) == (3, 6)
    moved = await open_store(Settings(store_url=pg_url))
    try:
        assert moved.owner_id("sk-alice") == alice  # the key came along
        assert await moved.get_response(alice, "resp_2") == original
        assert texts(await moved.load_lineage(alice, "resp_2")) == [
            "question of resp_1", "answer of resp_1", "question of resp_2", "answer of resp_2"]
        assert await moved.get_response(moved.owner_id("sk-bob"), "resp_3") is not None
        page = await moved.list_input_items(alice, "resp_2")
        assert page is not None and [i["id"] for i in page.data] == ["in_resp_2"]
    finally:
        await moved.close()
    # Only into an empty store.
    code, _, err = cli("copy", "--from", f"sqlite:///{source_path}", "--to", pg_url)
    assert code == 2 and "already holds 3 responses" in err

    back = tmp_path / "back.sqlite3"
    code, copied, err = cli("copy", "--from", pg_url, "--to", f"sqlite:///{back}")
    assert code == 0 and copied["responses"] == 3, err
    returned = await open_store(Settings(store_url=f"sqlite:///{back}"))
    try:
        assert returned.owner_id("sk-alice") == alice
        assert await returned.get_response(alice, "resp_2") == original
    finally:
        await returned.close()


# -- deployment ------------------------------------------------------------------------------


def test_unit_and_install_script_carry_the_database_password_as_a_credential() -> None:
    unit = (procs.ROOT / "systemd" / "orp-proxy.service").read_text()
    assert "LoadCredential=store_password:/etc/orp-proxy/credentials/store_password" in unit
    script = str(procs.ROOT / "scripts" / "install.sh")
    shown = subprocess.run(
        ["bash", script, "--dry-run", "--store-url", "postgresql://orp@db.internal:5432/orp",
         "--store-password-file", __file__], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "set ORP_STORE_URL=postgresql://orp@db.internal:5432/orp" in shown.stdout
    assert f"install -m 0600 {__file__} /etc/orp-proxy/credentials/store_password" in \
        shown.stdout
    refused = subprocess.run(
        ["bash", script, "--dry-run", "--store-url", "postgresql://orp:pw@db/orp"],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no password in --store-url" in refused.stderr


# -- the test cluster itself -----------------------------------------------------------------


def test_missing_postgres_fails_under_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "find_bindir", lambda: None)
    monkeypatch.delenv("ORP_TEST_PG", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        pg.require_postgres()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        pg.require_postgres()
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("ORP_TEST_PG", "0")
    with pytest.raises(pytest.skip.Exception, match="ORP_TEST_PG=0"):
        pg.require_postgres()


def test_a_killed_test_run_leaves_no_server_behind(tmp_path: Path) -> None:
    # A child that starts a cluster and is then SIGKILLed, as a timed-out CI job would be.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from tests import pg\n"
         "with pg.running_cluster(pg.require_postgres()) as c:\n"
         "    print(c.directory, flush=True)\n"
         "    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, env=procs.clean_env(), cwd=procs.ROOT)
    try:
        assert child.stdout is not None
        directory = Path(child.stdout.readline().strip())
        assert (directory / "data" / "postmaster.pid").exists()
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 30
    while directory.exists():
        assert time.monotonic() < deadline, "the server outlived the killed run"
        time.sleep(0.2)
