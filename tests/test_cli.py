"""`orp-proxy` as a newcomer runs it: a real process, the embedded mock upstream, the store."""

from __future__ import annotations

import json
import os
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
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret" not in out and "upstream_api_key = <redacted>" in out


def test_upstream_key_from_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "upstream_api_key").write_text("sk-from-cred\n")
    os.environ["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    try:
        assert load_settings({}).resolved_upstream_key() == "sk-from-cred"
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`orp-proxy serve` with no upstream configured: the README's first command."""
    port = procs.free_port()
    db = tmp_path / "orp.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orp_proxy.cli", "serve", "--port", str(port),
         "--db-path", str(db)],
        cwd=tmp_path, env=procs.clean_env(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with procs.running(proc):  # killed if it does not come up or does not stop
        procs.wait_port(port, proc, timeout=20)
        yield f"http://127.0.0.1:{port}", db
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out


async def test_serve_answers_with_the_bundled_mock(served: tuple[str, Path]) -> None:
    url, db = served
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
