"""Settings (orp_proxy.config): parsing, secrets from files and credentials, safe logging."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orp_proxy.config import ConfigError, Settings, load_settings, redacted_url
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
    logged = str(load_settings({"ORP_UPSTREAM_URL": url}).redacted())
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
