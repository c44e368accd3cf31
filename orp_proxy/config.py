"""Settings: one table of every option, read from the environment and overridable by flags.

The table (`SETTINGS`) is the single source for the environment names, the `orp-proxy --help`
text and the README's configuration table, so the three cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ujson


class ConfigError(ValueError):
    """A setting has a value we cannot use; raised at start-up, never per request."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {raw!r}")


def _parse_model_map(raw: str) -> dict[str, str]:
    """`a=b,c=d` or a JSON object; maps the client's model name to the upstream's."""
    raw = raw.strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        loaded = ujson.loads(raw)
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
        ):
            raise ValueError("expected a JSON object of strings")
        return dict(loaded)
    result: dict[str, str] = {}
    for pair in raw.split(","):
        if not pair.strip():
            continue
        name, sep, target = pair.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"expected name=upstream_name, got {pair!r}")
        result[name.strip()] = target.strip()
    return result


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return raw

    return parse


def _optional_str(raw: str) -> str | None:
    return raw or None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


@dataclass(frozen=True)
class Setting:
    """One option: its field on `Settings`, its environment name, parser and help text."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    metavar: str = "VALUE"


SETTINGS: tuple[Setting, ...] = (
    Setting("upstream_url", "ORP_UPSTREAM_URL", _optional_str,
            "Base URL of the Chat Completions backend, including /v1. Unset: the bundled mock "
            "upstream is started on a loopback port (for trying ORP out).", metavar="URL"),
    Setting("upstream_api_key", "ORP_UPSTREAM_API_KEY", _optional_str,
            "Bearer key ORP sends upstream. Prefer ORP_UPSTREAM_API_KEY_FILE or the systemd "
            "credential 'upstream_api_key'.", secret=True, metavar="KEY"),
    Setting("upstream_api_key_file", "ORP_UPSTREAM_API_KEY_FILE", _optional_str,
            "File holding the upstream key (first line).", metavar="PATH"),
    Setting("owner_secret", "ORP_OWNER_SECRET", _optional_str,
            "Key of the keyed hash that names a stored response's owner. Unset: a random key "
            "kept in the database file. Also read from the systemd credential 'owner_secret'.",
            secret=True, metavar="SECRET"),
    Setting("host", "ORP_HOST", str, "Address `orp-proxy serve` listens on.", metavar="HOST"),
    Setting("port", "ORP_PORT", int, "Port `orp-proxy serve` listens on.", metavar="PORT"),
    Setting("db_path", "ORP_DB_PATH", str, "SQLite file of the response store.", metavar="PATH"),
    Setting("store_ttl_seconds", "ORP_STORE_TTL_SECONDS", float,
            "How long stored responses are kept (seconds); 0 keeps them forever.",
            metavar="SECONDS"),
    Setting("purge_interval", "ORP_STORE_PURGE_INTERVAL", _positive_float,
            "Seconds between purges of expired stored responses.", metavar="SECONDS"),
    Setting("max_body_bytes", "ORP_MAX_BODY_BYTES", _positive_int,
            "Largest request body accepted (bytes); larger gets 413.", metavar="BYTES"),
    Setting("model_map", "ORP_MODEL_MAP", _parse_model_map,
            "Model aliases: 'client=upstream,...' or a JSON object. Unlisted names pass "
            "through unchanged.", metavar="MAP"),
    Setting("default_model", "ORP_DEFAULT_MODEL", _optional_str,
            "Model used when a request names none (otherwise such a request gets 400).",
            metavar="MODEL"),
    Setting("connect_timeout", "ORP_UPSTREAM_CONNECT_TIMEOUT", _positive_float,
            "Seconds to open a connection to the upstream.", metavar="SECONDS"),
    Setting("read_timeout", "ORP_UPSTREAM_READ_TIMEOUT", _positive_float,
            "Seconds the upstream may stay silent (before the first byte or between chunks).",
            metavar="SECONDS"),
    Setting("pool_limit", "ORP_UPSTREAM_POOL_LIMIT", _positive_int,
            "Most simultaneous upstream connections per worker.", metavar="N"),
    Setting("developer_role", "ORP_DEVELOPER_ROLE", _choice("system", "developer"),
            "Chat role that 'developer' messages become upstream: system or developer.",
            metavar="ROLE"),
    Setting("max_tokens_field", "ORP_MAX_TOKENS_FIELD",
            _choice("max_tokens", "max_completion_tokens"),
            "Upstream field that carries max_output_tokens.", metavar="FIELD"),
    Setting("reasoning_events", "ORP_REASONING_EVENTS", _choice("spec", "openai"),
            "Names of raw-reasoning stream events: 'spec' (response.reasoning.delta) or "
            "'openai' (response.reasoning_text.delta, for clients that only know those).",
            metavar="STYLE"),
    Setting("max_line_bytes", "ORP_MAX_UPSTREAM_LINE_BYTES", _positive_int,
            "Longest line accepted from the upstream stream (bytes).", metavar="BYTES"),
    Setting("log_level", "ORP_LOG_LEVEL", _choice("debug", "info", "warning", "error"),
            "Log level.", metavar="LEVEL"),
)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one ORP process (all workers share the same values)."""

    upstream_url: str | None = None
    upstream_api_key: str | None = None
    upstream_api_key_file: str | None = None
    owner_secret: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    db_path: str = "./orp.sqlite3"
    store_ttl_seconds: float = 30 * 24 * 3600.0
    purge_interval: float = 300.0
    max_body_bytes: int = 32 * 1024 * 1024
    model_map: Mapping[str, str] = field(default_factory=dict)
    default_model: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    pool_limit: int = 1000
    developer_role: str = "system"
    max_tokens_field: str = "max_tokens"
    reasoning_events: str = "spec"
    max_line_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"

    def upstream_model(self, client_model: str) -> str:
        return self.model_map.get(client_model, client_model)

    def resolved_upstream_key(self) -> str | None:
        """The upstream key from the setting, its file, or a systemd credential, in that order."""
        return _secret(self.upstream_api_key, self.upstream_api_key_file, "upstream_api_key")

    def resolved_owner_secret(self) -> bytes | None:
        secret = _secret(self.owner_secret, None, "owner_secret")
        return secret.encode() if secret else None

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets replaced by a marker."""
        out: dict[str, Any] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if setting.secret and value:
                value = "<redacted>"
            out[setting.field] = dict(value) if isinstance(value, Mapping) else value
        return out


def _secret(value: str | None, path: str | None, credential: str) -> str | None:
    """A secret given directly, in a file, or as a systemd credential (`LoadCredential=`)."""
    if value:
        return value
    if path is None and os.environ.get("CREDENTIALS_DIRECTORY"):
        candidate = os.path.join(os.environ["CREDENTIALS_DIRECTORY"], credential)
        path = candidate if os.path.exists(candidate) else None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().strip() or None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment, then `overrides` (raw strings keyed by field name)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.env)
        if overrides is not None and overrides.get(setting.field) is not None:
            raw = overrides[setting.field]
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            shown = "<redacted>" if setting.secret else repr(raw)
            raise ConfigError(f"{setting.env}={shown}: {exc}") from None
    return dataclasses.replace(Settings(), **values)
