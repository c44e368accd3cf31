"""Settings (orp_proxy.config): parsing, secrets from files and credentials, safe logging."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orp_proxy.config import (
    ConfigError,
    Settings,
    load_settings,
    redacted_store_url,
    redacted_url,
)
from orp_proxy.ops.auth import load_api_keys


@pytest.mark.parametrize("raw", ["-60", "nan", "inf", "-inf", "soon"])
def test_store_ttl_must_be_a_finite_number_not_below_zero(raw: str) -> None:
    with pytest.raises(ConfigError, match="ORP_STORE_TTL_SECONDS"):
        load_settings({"ORP_STORE_TTL_SECONDS": raw})


def test_store_ttl_accepts_zero_and_fractions() -> None:
    assert load_settings({"ORP_STORE_TTL_SECONDS": "0"}).store_ttl_seconds == 0
    assert load_settings({"ORP_STORE_TTL_SECONDS": "90.5"}).store_ttl_seconds == 90.5


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:sekrit@llm.example/v1?api-key=abc",
     "https://<redacted>@llm.example/v1?<redacted>"),
    ("https://sekrit@llm.example:8443/v1", "https://<redacted>@llm.example:8443/v1"),
    ("http://127.0.0.1:9000/v1", "http://127.0.0.1:9000/v1"),
    ("https://llm.example/v1#sekrit", "https://llm.example/v1#<redacted>"),
    ("http://[::1/v1?key=sekrit", "<redacted>"),  # unparsable: nothing of it is shown
])
def test_redacted_upstream_url_hides_credentials(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    try:
        logged = str(load_settings({"ORP_UPSTREAM_URL": url}).redacted())
        logged += load_settings({"ORP_UPSTREAM_URL": url}).summary()
    except ConfigError as exc:  # unparsable: refused at start-up, the secret still hidden
        logged = str(exc)
    assert "sekrit" not in logged and "abc" not in logged
    assert Settings().redacted()["upstream_url"] is None


def test_a_secret_file_that_is_not_utf8_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    bad = tmp_path / "key"
    bad.write_bytes(b"sk-\xff\xfe-latin1\n")
    expected = re.escape(f"cannot read secret file {bad}: not UTF-8 text")
    with pytest.raises(ConfigError, match=expected):
        Settings(upstream_api_key_file=str(bad)).resolved_upstream_key()
    with pytest.raises(ConfigError, match=r"cannot read secret file .*missing"):
        Settings(upstream_api_key_file=str(tmp_path / "missing")).resolved_upstream_key()
    # The same through a systemd credential, for every secret read that way.
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for name in ("upstream_api_key", "owner_secret", "compaction_key", "api_keys"):
        (tmp_path / name).write_bytes(b"\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Settings().resolved_upstream_key()
    with pytest.raises(ConfigError, match="not UTF-8"):
        Settings().resolved_owner_secret()
    with pytest.raises(ConfigError, match="not UTF-8"):
        Settings().resolved_compaction_key()
    with pytest.raises(ConfigError, match=r"the API keys file .*not UTF-8"):
        load_api_keys(Settings())


def test_secrets_from_files_and_credentials(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("  sk-first-line  \nignored\n")
    assert Settings(upstream_api_key_file=str(key_file)).resolved_upstream_key() == \
        "sk-first-line"
    (tmp_path / "empty").write_text("")
    assert Settings(upstream_api_key_file=str(tmp_path / "empty")).resolved_upstream_key() is None
    assert Settings().resolved_upstream_key() is None
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert Settings().resolved_owner_secret() is None  # no such credential
    (creds / "owner_secret").write_text("from-systemd\n")
    (creds / "api_keys").write_text("# comment\nkey-a\nkey-b\n")
    assert Settings().resolved_owner_secret() == b"from-systemd"
    assert load_api_keys(Settings()) == ["key-a", "key-b"]
    # A setting given directly wins over the credential.
    assert Settings(owner_secret="direct").resolved_owner_secret() == b"direct"


def test_log_level_and_format_ignore_case() -> None:
    settings = load_settings({"ORP_LOG_LEVEL": "DEBUG", "ORP_LOG_FORMAT": "Text"})
    assert (settings.log_level, settings.log_format) == ("debug", "text")
    assert load_settings({}).log_format == "json"
    with pytest.raises(ConfigError, match="ORP_LOG_FORMAT='xml': expected one of json, text"):
        load_settings({"ORP_LOG_FORMAT": "xml"})


def test_json_log_format_covers_application_messages() -> None:
    import io
    import json
    import logging

    from orp_proxy.ops.logs import configure_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json", stream)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("orp.test").exception("it failed: %s", "why")
        logging.getLogger("orp.access").info('{"type":"access","status":200}',
                                             extra={"access": {"type": "access", "status": 200}})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "error" and first["logger"] == "orp.test"
    assert first["message"] == "it failed: why" and "RuntimeError: boom" in first["exception"]
    assert second == {"type": "access", "status": 200}


def test_settings_line_is_readable_and_secret_free() -> None:
    line = load_settings({
        "ORP_UPSTREAM_URL": "https://user:sekrit@llm.example/v1", "ORP_API_KEYS": "sekrit-key",
        "ORP_MODEL_MAP": "a=b", "ORP_WORKERS": "4"}).summary()
    assert line.startswith("upstream_url=https://<redacted>@llm.example/v1 mock_upstream=false ")
    assert "api_keys=<redacted>" in line and "model_map=a=b" in line and "workers=4" in line
    assert "sekrit" not in line and "{" not in line and "'" not in line
    assert "max_tools" not in line  # at its default


def test_unknown_variables_are_named_with_a_suggestion() -> None:
    from orp_proxy.config import unknown_variables

    assert unknown_variables({"ORP_UPSTRAEM_URL": "x", "ORP_LOGLEVEL": "x", "ORP_ZZZ": "1",
                              "ORP_PORT": "1", "ORP_DRAIN_SECONDS": "5", "PATH": "/bin",
                              "ORP_DATABASE_URL": "sqlite:///x"}) == [
        "unknown setting ORP_LOGLEVEL is ignored; did you mean ORP_LOG_LEVEL?",
        "unknown setting ORP_UPSTRAEM_URL is ignored; did you mean ORP_UPSTREAM_URL?",
        "unknown setting ORP_ZZZ is ignored; see orp-proxy --help",
    ]


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw@db.example:5432/orp", "postgresql://u:<redacted>@db.example:5432/orp"),
    # A Unix-socket URL has an empty host part: it must still read as the URL configured.
    ("postgresql:///orp?host=/run/postgresql&password=pw&user=u",
     "postgresql:///orp?host=/run/postgresql&password=<redacted>&user=u"),
    ("sqlite:///var/lib/orp/orp.sqlite3", "sqlite:///var/lib/orp/orp.sqlite3"),
])
def test_store_urls_are_shown_with_the_password_redacted(url: str, shown: str) -> None:
    assert redacted_store_url(url) == shown
