"""`orp-proxy` as a newcomer runs it: a real process, a backend or the demo mock, the store,
and the mistakes a newcomer makes."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from orp_proxy.cli import build_parser, main
from orp_proxy.config import SETTINGS, ConfigError, load_settings
from scripts import procs

ROOT = Path(__file__).resolve().parent.parent


def test_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = capsys.readouterr().out
    build_parser().print_help()
    top_help = capsys.readouterr().out
    for setting in SETTINGS:
        assert setting.env in serve_help and setting.env in top_help
        assert "--" + setting.field.replace("_", "-") in serve_help
    assert "gunicorn" in top_help


def test_flags_override_environment() -> None:
    settings = load_settings({"ORP_PORT": "9000", "ORP_MODEL_MAP": "a=b,c=d"},
                             overrides={"port": "9100"})
    assert settings.port == 9100 and settings.model_map == {"a": "b", "c": "d"}
    assert load_settings({"ORP_MODEL_MAP": '{"x": "y"}'}).model_map == {"x": "y"}
    with pytest.raises(ConfigError, match="ORP_PORT"):
        load_settings({"ORP_PORT": "eighty"})
    with pytest.raises(ConfigError) as err:
        load_settings({"ORP_UPSTREAM_API_KEY": "sk-secret", "ORP_DEVELOPER_ROLE": "boss"})
    assert "sk-secret" not in str(err.value)


def test_settings_command_hides_secrets(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORP_UPSTREAM_API_KEY", "sk-very-secret")
    monkeypatch.setenv("ORP_UPSTREAM_APIKEY", "typo")
    assert main(["settings"]) == 0
    out, err = capsys.readouterr()
    assert "sk-very-secret" not in out and "upstream_api_key = <redacted>" in out
    assert "ORP_UPSTREAM_APIKEY is ignored; did you mean ORP_UPSTREAM_API_KEY?" in err


def test_upstream_key_from_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "upstream_api_key").write_text("sk-from-cred\n")
    os.environ["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    try:
        assert load_settings({}).resolved_upstream_key() == "sk-from-cred"
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]


def _readme_serve_args() -> list[str]:
    """The arguments of the README's first command (`scripts/serve ...` on its first screen)."""
    first_screen = (ROOT / "README.rst").read_text().splitlines()[:25]
    line = next(x for x in first_screen if x.strip().startswith("scripts/serve"))
    return shlex.split(line.partition("#")[0])[1:]


@contextlib.contextmanager
def _serve(cwd: Path, *args: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`orp-proxy serve *args` on a free port in `cwd` (its default store lands there)."""
    port = procs.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orp_proxy.cli", "serve", *args, "--port", str(port)],
        cwd=cwd, env=procs.clean_env(cwd, **env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with procs.running(proc):  # killed if it does not come up or does not stop
        procs.wait_port(port, proc, timeout=20)
        yield f"http://127.0.0.1:{port}", proc
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out


async def test_readme_first_command_serves_a_real_upstream(tmp_path: Path, mock_url: str) -> None:
    """The README's first command runs ORP doing its job: a backend, the SQLite file, no mock."""
    args = _readme_serve_args()
    assert "--mock-upstream" not in args
    args[args.index("--upstream-url") + 1] = mock_url  # the README's backend, here on loopback
    with _serve(tmp_path, *args) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/responses", json={"model": "m", "input": "hi"},
                                    headers={"Authorization": "Bearer sk-client"}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            async with session.get(f"{url}/v1/responses/{body['id']}",
                                   headers={"Authorization": "Bearer sk-client"}) as resp:
                assert resp.status == 200
    assert body["status"] == "completed"
    assert (tmp_path / "orp.sqlite3").exists()  # the embedded default store


async def test_serve_answers_with_the_bundled_mock_when_asked(tmp_path: Path) -> None:
    db = tmp_path / "orp.sqlite3"
    with _serve(tmp_path, "--mock-upstream", "--db-path", str(db)) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/responses",
                                    json={"model": "demo", "input": "hi there"}) as resp:
                assert resp.status == 200
                body = await resp.json()
            async with session.post(f"{url}/v1/responses",
                                    json={"model": "demo", "input": "hi", "stream": True}) as resp:
                text = await resp.text()
    assert body["output"][0]["content"][0]["text"] == "You said: hi there"
    assert text.endswith("data: [DONE]\n\n")
    assert db.exists()


def _refused(tmp_path: Path, *args: str, **env: str) -> str:
    """`orp-proxy serve *args` must exit at once with status 2 and one line on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "orp_proxy.cli", "serve", *args], env=procs.clean_env(
            tmp_path, **env), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orp-proxy: "), done.stderr
    return lines[0]


def test_serve_without_an_upstream_refuses_instead_of_serving_the_mock(tmp_path: Path) -> None:
    line = _refused(tmp_path, "--port", "0")
    assert "ORP_UPSTREAM_URL is not set" in line and "--mock-upstream" in line
    # A typo in the variable's name is the same as no upstream; the warning names it.
    done = subprocess.run(
        [sys.executable, "-m", "orp_proxy.cli", "serve", "--port", "0"],
        env=procs.clean_env(tmp_path, ORP_UPSTRAEM_URL="http://127.0.0.1:9/v1"),
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown setting ORP_UPSTRAEM_URL is ignored; did you mean ORP_UPSTREAM_URL?" in \
        done.stderr
    assert not (tmp_path / "orp.sqlite3").exists()
    line = _refused(tmp_path, "--mock-upstream", "--upstream-url", "http://127.0.0.1:9/v1")
    assert "both set" in line


@pytest.mark.parametrize(("args", "expected"), [
    (["--port", "70000"], "ORP_PORT='70000': expected a port number from 1 to 65535"),
    (["--port", "-1"], "ORP_PORT='-1': expected a port number"),
    (["--host", "no-such-host.invalid"], "ORP_HOST='no-such-host.invalid': cannot listen"),
    (["--upstream-url", "ftp://llm.example/v1"], "expected an http:// or https:// URL"),
    (["--upstream-url", "127.0.0.1:8000/v1"], "expected an http:// or https:// URL"),
    (["--upstream-url", "http:///v1"], "the URL has no host name"),
    (["--upstream-url", "http://u:sekrit@llm.example:99999/v1"], "not a usable URL"),
])
def test_bad_address_settings_are_one_line_errors(tmp_path: Path, args: list[str],
                                                  expected: str) -> None:
    base = ["--auth-mode", "none", "--db-path", str(tmp_path / "x.db")]
    if "--upstream-url" not in args:
        base += ["--upstream-url", "http://127.0.0.1:9/v1"]
    line = _refused(tmp_path, *base, *args)
    assert expected in line and "sekrit" not in line


@pytest.mark.parametrize(("where", "reason"), [
    ("missing/orp.sqlite3", "the directory {dir}/missing does not exist"),
    ("a-directory", "it is a directory"),
    ("not-a-database", "the file is not an SQLite database"),
])
def test_a_bad_db_path_is_one_line_naming_it(tmp_path: Path, where: str, reason: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "not-a-database").write_bytes(b"this is not SQLite" * 100)
    path = tmp_path / where
    line = _refused(tmp_path, "--mock-upstream", "--db-path", str(path))
    assert line == f"orp-proxy: ORP_DB_PATH={path}: " + reason.format(dir=tmp_path)
    # The store commands say the same.
    done = subprocess.run([sys.executable, "-m", "orp_proxy.cli", "store", "stats", "--db-path",
                           str(path)], env=procs.clean_env(tmp_path), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == line


def test_an_unusable_store_url_is_one_line_without_its_password(tmp_path: Path) -> None:
    """A PostgreSQL URL asyncpg refuses (here a bad sslmode) is a settings error: one line,
    the password redacted, no traceback."""
    env = {**procs.clean_env(tmp_path),
           "ORP_STORE_URL": "postgresql://u@127.0.0.1:1/db?sslmode=bogus&password=SEKRIT"}
    done = subprocess.run([sys.executable, "-m", "orp_proxy.cli", "store", "status"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "SEKRIT" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("orp-proxy: ORP_STORE_URL=postgresql://u@127.0.0.1:1/db?"
                           "sslmode=bogus&password=<redacted>: ")
    assert "sslmode" in last.partition(": ")[2]


def test_store_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "s.sqlite3")
    for action in ("stats", "purge", "vacuum"):
        assert main(["store", action, "--db-path", db]) == 0
        json.loads(capsys.readouterr().out)


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    readme = (ROOT / "README.rst").read_text()
    missing = [s.env for s in SETTINGS if f"``{s.env}``" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "scripts/serve" in first_screen and "scripts/test" in first_screen
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_valid_restructuredtext() -> None:
    import io

    import docutils.core

    warnings = io.StringIO()
    docutils.core.publish_doctree((ROOT / "README.rst").read_text(),
                                  settings_overrides={"warning_stream": warnings,
                                                      "report_level": 2})
    assert warnings.getvalue() == ""
