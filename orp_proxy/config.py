"""Settings: one table of every option, read from the environment and overridable by flags.

The table (`SETTINGS`) is the single source for the environment names, the `orp-proxy --help`
text and the README's configuration table, so the three cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import ujson

from orp_proxy.config_file import ConfigFileError, FileConfig, UpstreamSpec, read_config
from orp_proxy.config_file import Quirks as Quirks  # re-exported for the protocol layer


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


def _choice_ci(*allowed: str) -> Callable[[str], str]:
    """Like `_choice`, ignoring case and surrounding space (`INFO` is `info`)."""
    exact = _choice(*allowed)

    def parse(raw: str) -> str:
        return exact(raw.strip().lower())

    return parse


# Chat Completions request fields that ORP fills from the Responses request when it has them.
FORWARDABLE_FIELDS = ("prompt_cache_key", "safety_identifier", "user", "verbosity",
                      "service_tier")


def _field_set(raw: str) -> frozenset[str]:
    """A comma-separated subset of FORWARDABLE_FIELDS ('' or 'none': the empty set)."""
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if names == ["none"]:
        return frozenset()
    unknown = [name for name in names if name not in FORWARDABLE_FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; expected some of "
                         f"{', '.join(FORWARDABLE_FIELDS)} or 'none'")
    return frozenset(names)


def _optional_str(raw: str) -> str | None:
    return raw or None


def _upstream_url(raw: str) -> str | None:
    """An http(s) URL with a host (and a port in range), or None when empty."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a usable URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8000/v1")
    if not parts.hostname:
        raise ValueError("the URL has no host name")
    return raw


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number from 1 to 65535 (0: any free port)")
    return value


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a host name or an IP address")
    return value


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


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _store_url(raw: str) -> str | None:
    if not raw.strip():
        return None
    parse_store_url(raw)
    return raw.strip()


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


@dataclass(frozen=True)
class StoreTarget:
    """Where the response store lives: a SQLite file or a PostgreSQL database."""

    backend: str  # "sqlite" | "postgresql"
    path: str = ""  # sqlite: the file
    dsn: str = ""  # postgresql: the URL as given (asyncpg reads it)

    def shown(self) -> str:
        """The target as it may be logged (a password in the URL is replaced)."""
        return f"sqlite:///{self.path}" if self.backend == "sqlite" else redacted_store_url(
            self.dsn)


def parse_store_url(raw: str) -> StoreTarget:
    """`sqlite:///relative/path`, `sqlite:////absolute/path` (SQLAlchemy's convention) or
    `postgresql://user@host:port/database` (also `postgres://`). Errors never repeat the URL
    (it may hold a password)."""
    scheme, sep, rest = raw.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("expected a URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    if scheme == "sqlite":
        if not rest.startswith("/") or not rest[1:]:
            raise ValueError("a SQLite URL is sqlite:///relative/path or sqlite:////abs/path")
        return StoreTarget("sqlite", path=rest[1:])
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urlsplit(raw.strip())
            parts.port  # noqa: B018 - raises for a bad port
        except ValueError:
            raise ValueError("not a valid postgresql:// URL") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("a postgresql:// URL needs a host")
        return StoreTarget("postgresql", dsn=raw.strip())
    raise ValueError(f"unsupported store URL scheme {scheme[:20]!r}: use sqlite or postgresql")


_PASSWORD_PARAMS = ("password", "sslpassword", "passfile")


def redacted_store_url(url: str) -> str:
    """A database URL with its password (in the user information or the query) replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<redacted>"
    userinfo, at, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{':<redacted>' if colon else ''}@{host}" if at else host
    query = "&".join(
        f"{key}=<redacted>" if key.lower() in _PASSWORD_PARAMS else f"{key}{eq}{value}"
        for key, eq, value in (pair.partition("=") for pair in parts.query.split("&") if pair))
    if not parts.netloc:  # `postgresql:///db?host=/run/postgresql`: keep the empty host
        return f"{parts.scheme}://{parts.path}{'?' if query else ''}{query}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def has_inline_password(url: str) -> bool:
    """Whether a database URL carries a password itself (rather than in a file)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.password:
        return True
    return any(pair.partition("=")[0].lower() == "password" for pair in parts.query.split("&"))


@dataclass(frozen=True)
class Setting:
    """One option: its field on `Settings`, its environment name, parser and help text."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    metavar: str = "VALUE"
    # Other environment names read when `env` is unset.
    aliases: tuple[str, ...] = ()
    # How a raw value is shown in errors and `orp-proxy settings` (secrets: not at all).
    show: Callable[[str], str] | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("config_file", "ORP_CONFIG", _optional_str,
            "TOML file with upstreams, models and routing (and any setting under "
            "[settings]; an environment variable for the same setting wins). Checked with "
            "`orp-proxy config check FILE`.", metavar="PATH"),
    Setting("upstream_url", "ORP_UPSTREAM_URL", _upstream_url,
            "Base URL of the Chat Completions backend, including /v1 (http:// or https://). "
            "Required, unless ORP_MOCK_UPSTREAM is on.", metavar="URL"),
    Setting("mock_upstream", "ORP_MOCK_UPSTREAM", _parse_bool,
            "Demo: answer from the bundled echo mock upstream, started on a loopback port, "
            "instead of a real backend (and without client authentication unless configured). "
            "Never together with ORP_UPSTREAM_URL.", metavar="BOOL"),
    Setting("upstream_api_key", "ORP_UPSTREAM_API_KEY", _optional_str,
            "Bearer key ORP sends upstream. Prefer ORP_UPSTREAM_API_KEY_FILE or the systemd "
            "credential 'upstream_api_key'.", secret=True, metavar="KEY"),
    Setting("upstream_api_key_file", "ORP_UPSTREAM_API_KEY_FILE", _optional_str,
            "File holding the upstream key (first line).", metavar="PATH"),
    Setting("owner_secret", "ORP_OWNER_SECRET", _optional_str,
            "Key of the keyed hash that names a stored response's owner. Unset: a random key "
            "kept in the database file. Also read from the systemd credential 'owner_secret'.",
            secret=True, metavar="SECRET"),
    Setting("compaction_key", "ORP_COMPACTION_KEY", _optional_str,
            "Key that encrypts the summaries of /v1/responses/compact (at least 32 "
            "characters); several comma-separated to rotate (the first encrypts, all decrypt). "
            "Unset: derived from the owner-hash key. Also read from the systemd credential "
            "'compaction_key'.", secret=True, metavar="KEY"),
    Setting("host", "ORP_HOST", _host, "Address ORP listens on (`orp-proxy serve`, the gunicorn "
            "config).", metavar="HOST"),
    Setting("port", "ORP_PORT", _port, "Port ORP listens on (`orp-proxy serve`, the gunicorn "
            "config).", metavar="PORT"),
    Setting("db_path", "ORP_DB_PATH", str, "SQLite file of the response store (when "
            "ORP_STORE_URL is unset).", metavar="PATH"),
    Setting("store_url", "ORP_STORE_URL", _store_url,
            "Where responses are stored: sqlite:///relative/path, sqlite:////absolute/path, "
            "or postgresql://USER@HOST:PORT/DATABASE to share one database between hosts "
            "(password from ORP_STORE_PASSWORD_FILE). Unset: SQLite at ORP_DB_PATH. Also read "
            "from ORP_DATABASE_URL.", metavar="URL", aliases=("ORP_DATABASE_URL",),
            show=redacted_store_url),
    Setting("store_password_file", "ORP_STORE_PASSWORD_FILE", _optional_str,
            "File holding the PostgreSQL password (first line); also read from the systemd "
            "credential 'store_password'.", metavar="PATH"),
    Setting("store_pool_size", "ORP_STORE_POOL_SIZE", _positive_int,
            "Most PostgreSQL connections per worker (see README, Several hosts).",
            metavar="N"),
    Setting("store_connect_timeout", "ORP_STORE_CONNECT_TIMEOUT", _positive_float,
            "Seconds to open a PostgreSQL connection; then the request fails with 503 "
            "store_unavailable.", metavar="SECONDS"),
    Setting("store_statement_timeout", "ORP_STORE_STATEMENT_TIMEOUT", _positive_float,
            "Seconds one PostgreSQL statement may take; then it is cancelled and the request "
            "fails with 503 store_unavailable.", metavar="SECONDS"),
    Setting("store_statement_cache", "ORP_STORE_STATEMENT_CACHE", _non_negative_int,
            "Prepared statements cached per PostgreSQL connection; 0 behind PgBouncer in "
            "transaction mode.", metavar="N"),
    Setting("store_ttl_seconds", "ORP_STORE_TTL_SECONDS", _non_negative_float,
            "How long a stored response stays readable (seconds; a live response that continues "
            "from it keeps its content as context); 0 keeps them forever.",
            metavar="SECONDS"),
    Setting("purge_interval", "ORP_STORE_PURGE_INTERVAL", _positive_float,
            "Seconds between purges of expired stored responses.", metavar="SECONDS"),
    Setting("max_body_bytes", "ORP_MAX_BODY_BYTES", _positive_int,
            "Largest request body accepted (bytes); larger gets 413.", metavar="BYTES"),
    Setting("body_read_timeout", "ORP_BODY_READ_TIMEOUT", _positive_float,
            "Seconds a client may take to send a request body; slower gets 408 (a body "
            "trickled byte by byte would otherwise hold its handler forever).",
            metavar="SECONDS"),
    Setting("max_inflight_bytes", "ORP_MAX_INFLIGHT_BYTES", _non_negative_int,
            "Most request-body bytes one worker holds at once (HTTP bodies and WebSocket "
            "messages in progress or queued; a request costs several times its body while it "
            "runs); past it 503 with Retry-After. 0: no cap.", metavar="BYTES"),
    Setting("max_concurrent_responses", "ORP_MAX_CONCURRENT_RESPONSES", _non_negative_int,
            "Most responses (HTTP requests and WebSocket turns) one worker runs at once; past "
            "it 503 with Retry-After. 0: no cap.", metavar="N"),
    Setting("ws_max_queued_bytes", "ORP_WS_MAX_QUEUED_BYTES", _positive_int,
            "Bytes of client messages one WebSocket connection may queue behind its running "
            "turn (one message is always taken); beyond it ORP stops reading the socket.",
            metavar="BYTES"),
    Setting("ws_max_age_seconds", "ORP_WS_MAX_AGE_SECONDS", _positive_float,
            "Lifetime of a WebSocket connection (seconds); then it is closed with "
            "'websocket_connection_limit_reached'.", metavar="SECONDS"),
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
    Setting("models_cache_seconds", "ORP_MODELS_CACHE_SECONDS", _non_negative_float,
            "How long each worker reuses the upstream's model list for GET /v1/models "
            "(seconds); 0 asks the upstream every time.", metavar="SECONDS"),
    Setting("forward_fields", "ORP_UPSTREAM_FORWARD", _field_set,
            "Optional Chat Completions fields sent upstream when the request sets them "
            "(comma-separated: prompt_cache_key, safety_identifier, user, verbosity, "
            "service_tier; 'none' for none). Servers that refuse unknown fields need fewer.",
            metavar="FIELDS"),
    Setting("reasoning_events", "ORP_REASONING_EVENTS", _choice("auto", "spec", "openai"),
            "Names of raw-reasoning stream events: 'spec' (response.reasoning.delta), 'openai' "
            "(response.reasoning_text.delta) or 'auto' (OpenAI's names for clients known to "
            "read only those: the openai SDKs, the Vercel AI SDK, Codex; the spec's otherwise).",
            metavar="STYLE"),
    Setting("upstream_reasoning_field", "ORP_UPSTREAM_REASONING_FIELD",
            _choice("both", "reasoning_content", "reasoning", "none"),
            "Field of the assistant message that carries replayed reasoning upstream: "
            "'reasoning_content' (llama.cpp, SGLang, DeepSeek), 'reasoning' (vLLM), 'both', or "
            "'none' (reasoning is not sent back).", metavar="FIELD"),
    Setting("thinking_kwarg", "ORP_UPSTREAM_THINKING_KWARG", _optional_str,
            "Chat-template argument that switches a hybrid model's thinking (e.g. "
            "'enable_thinking' for Qwen3/GLM, 'thinking' for DeepSeek-V3.1): with it, "
            "reasoning.effort none/minimal sends chat_template_kwargs {NAME: false} instead of "
            "reasoning_effort, other efforts {NAME: true} plus reasoning_effort. Unset: "
            "reasoning.effort goes upstream as reasoning_effort.", metavar="NAME"),
    Setting("max_line_bytes", "ORP_MAX_UPSTREAM_LINE_BYTES", _positive_int,
            "Longest line accepted from the upstream stream (bytes).", metavar="BYTES"),
    Setting("log_level", "ORP_LOG_LEVEL", _choice_ci("debug", "info", "warning", "error"),
            "Log level (any case).", metavar="LEVEL"),
    Setting("log_format", "ORP_LOG_FORMAT", _choice_ci("json", "text"),
            "Format of every log line, access lines and application messages alike: 'json' "
            "(one object per line) or 'text' (readable key=value lines).", metavar="FORMAT"),
    Setting("log_content", "ORP_LOG_CONTENT", _parse_bool,
            "Debugging only: put instructions, input and output items in the access log line "
            "(never credentials).", metavar="BOOL"),
    Setting("workers", "ORP_WORKERS", _non_negative_int,
            "gunicorn worker processes; 0: $WEB_CONCURRENCY if set, else one per CPU core.",
            metavar="N"),
    Setting("graceful_timeout", "ORP_GRACEFUL_TIMEOUT", _positive_int,
            "Seconds in-flight requests (streams) may take to finish after SIGTERM.",
            metavar="SECONDS"),
    Setting("keepalive_timeout", "ORP_KEEPALIVE_TIMEOUT", _positive_int,
            "Seconds an idle client connection is kept open; above load balancers' idle "
            "timeouts (often 60).", metavar="SECONDS"),
    Setting("sse_keepalive", "ORP_SSE_KEEPALIVE", _non_negative_float,
            "Seconds of silence after which an open stream gets a ': keep-alive' comment; "
            "0 disables them.", metavar="SECONDS"),
    Setting("drain_file", "ORP_DRAIN_FILE", _optional_str,
            "While this file exists, /readyz answers 503 (checked every second); the "
            "systemd unit creates it before stopping.", metavar="PATH"),
    Setting("upstream_probe_interval", "ORP_UPSTREAM_PROBE_INTERVAL", _non_negative_float,
            "Seconds between checks of GET {upstream}/models, reported by /readyz; 0 disables "
            "them.", metavar="SECONDS"),
    Setting("control_socket", "ORP_CONTROL_SOCKET", _optional_str,
            "gunicorn control socket: a path, or 'off'. Unset: $RUNTIME_DIRECTORY/gunicorn.ctl "
            "under systemd, otherwise off.", metavar="PATH"),
    Setting("upstream_retries", "ORP_UPSTREAM_RETRIES", _non_negative_int,
            "Retries of an upstream request that was refused before it started (connect "
            "error or timeout, 429, 503); 0 disables retries.", metavar="N"),
    Setting("retry_backoff", "ORP_UPSTREAM_RETRY_BACKOFF", _positive_float,
            "Base of the jittered exponential backoff between retries (seconds).",
            metavar="SECONDS"),
    Setting("retry_max_wait", "ORP_UPSTREAM_RETRY_MAX_WAIT", _non_negative_float,
            "Most seconds one request spends waiting between retries, Retry-After included; "
            "a longer Retry-After is passed to the client instead.", metavar="SECONDS"),
    Setting("expose_upstream_errors", "ORP_EXPOSE_UPSTREAM_ERRORS", _parse_bool,
            "Pass upstream error messages to clients verbatim (otherwise URLs, host names, "
            "addresses and key-like strings are scrubbed).", metavar="BOOL"),
    Setting("auth_mode", "ORP_AUTH_MODE", _choice("keys", "passthrough", "none"),
            "Client authentication: 'keys' (one of ORP_API_KEYS), 'passthrough' (the "
            "client's bearer token goes upstream) or 'none' (local development). Unset: "
            "'keys' if keys are configured, 'none' with ORP_MOCK_UPSTREAM (the demo), "
            "otherwise ORP refuses to start.", metavar="MODE"),
    Setting("passthrough_check_ttl", "ORP_PASSTHROUGH_CHECK_TTL", _positive_float,
            "Pass-through mode: seconds the upstream's answer on a client's key (GET "
            "{upstream}/models with it, asked before that key reads or deletes stored "
            "responses) is reused; a revoked key loses its stored data within this time.",
            metavar="SECONDS"),
    Setting("api_keys", "ORP_API_KEYS", _optional_str,
            "Gateway keys clients may present, comma-separated. Prefer ORP_API_KEYS_FILE or "
            "the systemd credential 'api_keys'.", secret=True, metavar="KEYS"),
    Setting("api_keys_file", "ORP_API_KEYS_FILE", _optional_str,
            "File of gateway keys, one per line ('#' starts a comment).", metavar="PATH"),
    Setting("metrics_public", "ORP_METRICS_PUBLIC", _parse_bool,
            "Serve /metrics without a key; false: it needs one of ORP_API_KEYS.",
            metavar="BOOL"),
    Setting("max_input_items", "ORP_MAX_INPUT_ITEMS", _positive_int,
            "Most items in a request's 'input'.", metavar="N"),
    Setting("max_tools", "ORP_MAX_TOOLS", _positive_int,
            "Most entries in a request's 'tools'.", metavar="N"),
    Setting("background_max_runs", "ORP_BACKGROUND_MAX_RUNS", _positive_int,
            "Most background responses one worker runs at once; past it, 429.", metavar="N"),
    Setting("background_max_per_owner", "ORP_BACKGROUND_MAX_PER_OWNER", _positive_int,
            "Most unfinished background responses per credential, over all workers and hosts; "
            "past it, 429.", metavar="N"),
    Setting("background_event_retention", "ORP_BACKGROUND_RETENTION",
            _non_negative_float,
            "How long a finished background response's stream events stay resumable "
            "(seconds); then they are dropped, the response itself stays.", metavar="SECONDS"),
    Setting("background_lease_seconds", "ORP_BACKGROUND_LEASE_SECONDS", _positive_float,
            "Lease on a running background response, renewed every third of it while its "
            "worker lives; a response whose lease ran out is failed ('worker_lost').",
            metavar="SECONDS"),
    Setting("background_poll_interval", "ORP_BACKGROUND_POLL_INTERVAL", _positive_float,
            "SQLite store: how often streams following a background response run by another "
            "process, and cancel requests, are looked for (seconds).", metavar="SECONDS"),
    Setting("hosted_tools", "ORP_HOSTED_TOOLS", _choice("drop", "refuse"),
            "Hosted tools a Chat Completions backend cannot run (web_search*, file_search, "
            "code_interpreter, image_generation, computer*, mcp, server-side tool_search, "
            "shell in a container): 'drop' leaves them out (logged, and named in the "
            "X-ORP-Dropped-Tools response header), 'refuse' answers 400.", metavar="MODE"),
    Setting("undeclared_tools", "ORP_UNDECLARED_TOOLS", _choice("pass", "fail"),
            "A model's call to a tool the request never declared: 'pass' sends it to the "
            "client as a function_call (agents answer it as an unknown tool), 'fail' fails "
            "the response with tool_not_allowed. allowed_tools and a forced tool_choice are "
            "enforced either way.", metavar="MODE"),
)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one ORP process (all workers share the same values)."""

    config_file: str | None = None
    upstream_url: str | None = None
    mock_upstream: bool = False
    upstream_api_key: str | None = None
    upstream_api_key_file: str | None = None
    owner_secret: str | None = None
    compaction_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    db_path: str = "./orp.sqlite3"
    store_url: str | None = None
    store_password_file: str | None = None
    store_pool_size: int = 4
    store_connect_timeout: float = 5.0
    store_statement_timeout: float = 10.0
    store_statement_cache: int = 100
    store_ttl_seconds: float = 30 * 24 * 3600.0
    purge_interval: float = 300.0
    max_body_bytes: int = 32 * 1024 * 1024
    body_read_timeout: float = 60.0
    max_inflight_bytes: int = 256 * 1024 * 1024
    max_concurrent_responses: int = 4096
    ws_max_queued_bytes: int = 8 * 1024 * 1024
    ws_max_age_seconds: float = 3600.0
    model_map: Mapping[str, str] = field(default_factory=dict)
    default_model: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    pool_limit: int = 1000
    developer_role: str = "system"
    max_tokens_field: str = "max_tokens"
    forward_fields: frozenset[str] = frozenset(FORWARDABLE_FIELDS)
    models_cache_seconds: float = 10.0
    reasoning_events: str = "auto"
    upstream_reasoning_field: str = "both"
    thinking_kwarg: str | None = None
    hosted_tools: str = "drop"
    undeclared_tools: str = "pass"
    max_line_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "json"
    log_content: bool = False
    workers: int = 0
    graceful_timeout: int = 300
    keepalive_timeout: int = 75
    sse_keepalive: float = 15.0
    drain_file: str | None = None
    upstream_probe_interval: float = 30.0
    control_socket: str | None = None
    upstream_retries: int = 2
    retry_backoff: float = 0.25
    retry_max_wait: float = 8.0
    expose_upstream_errors: bool = False
    auth_mode: str | None = None
    passthrough_check_ttl: float = 60.0
    api_keys: str | None = None
    api_keys_file: str | None = None
    metrics_public: bool = True
    max_input_items: int = 4096
    max_tools: int = 128
    background_max_runs: int = 100
    background_max_per_owner: int = 20
    background_event_retention: float = 3600.0
    background_lease_seconds: float = 30.0
    background_poll_interval: float = 0.05
    # The parsed ORP_CONFIG file (not a setting of its own: it is where settings come from).
    file: FileConfig | None = field(default=None, compare=False, repr=False)

    @property
    def routed(self) -> bool:
        """Whether a configuration file names upstreams and models (else: one upstream)."""
        return self.file is not None and bool(self.file.models)

    @property
    def quirks(self) -> Quirks:
        """The process-wide quirks: the single upstream's, and the defaults of configured
        ones."""
        return Quirks(max_tokens_field=self.max_tokens_field,
                      developer_role=self.developer_role,
                      reasoning_field=self.upstream_reasoning_field,
                      thinking_kwarg=self.thinking_kwarg)

    def upstream_model(self, client_model: str) -> str:
        return self.model_map.get(client_model, client_model)

    def resolved_upstream_key(self) -> str | None:
        """The upstream key from the setting, its file, or a systemd credential, in that order."""
        return _secret(self.upstream_api_key, self.upstream_api_key_file, "upstream_api_key")

    def resolved_owner_secret(self) -> bytes | None:
        secret = _secret(self.owner_secret, None, "owner_secret")
        return secret.encode() if secret else None

    def resolved_compaction_key(self) -> str | None:
        return _secret(self.compaction_key, None, "compaction_key")

    def store_target(self) -> StoreTarget:
        """The store from ORP_STORE_URL, or SQLite at ORP_DB_PATH."""
        if self.store_url:
            return parse_store_url(self.store_url)
        return StoreTarget("sqlite", path=self.db_path)

    def resolved_store_password(self) -> str | None:
        """The PostgreSQL password from its file or the systemd credential 'store_password'
        (None: the URL's own, or asyncpg's PGPASSWORD / ~/.pgpass)."""
        return _secret(None, self.store_password_file, "store_password")

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets replaced by a marker, and the upstream URL without
        its user information and query (either may hold a key)."""
        out: dict[str, Any] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if setting.secret and value:
                value = "<redacted>"
            elif setting.field == "upstream_url" and value:
                value = redacted_url(value)
            elif setting.show is not None and isinstance(value, str):
                value = setting.show(value)
            out[setting.field] = dict(value) if isinstance(value, Mapping) else value
        return out

    def summary(self) -> str:
        """The start-up log's settings line, secrets hidden: `name=value` pairs of where ORP
        listens, stores and forwards, then every setting that differs from its default."""
        defaults = Settings().redacted()
        return " ".join(
            f"{name}={_shown(value)}" for name, value in self.redacted().items()
            if name in _ALWAYS_SHOWN or value != defaults[name])

    def check_upstream(self) -> None:
        """ConfigError unless exactly one of a real upstream, the demo mock, and a
        configuration file of models is chosen."""
        if self.routed:
            for field_name, env in (("upstream_url", "ORP_UPSTREAM_URL"),
                                    ("mock_upstream", "ORP_MOCK_UPSTREAM")):
                if getattr(self, field_name):
                    raise ConfigError(f"{env} is set, but the ORP_CONFIG file {self.config_file} "
                                      "names the upstreams: remove one of them")
            return
        if self.mock_upstream and self.upstream_url:
            raise ConfigError("ORP_UPSTREAM_URL and ORP_MOCK_UPSTREAM are both set: choose the "
                              "real backend or the demo mock, not both")
        if not self.mock_upstream and not self.upstream_url:
            raise ConfigError("ORP_UPSTREAM_URL is not set: point it at your Chat Completions "
                              "backend (e.g. http://127.0.0.1:8000/v1), or choose the demo echo "
                              "mock with ORP_MOCK_UPSTREAM=true (orp-proxy serve --mock-upstream)")


_ALWAYS_SHOWN = frozenset({"upstream_url", "mock_upstream", "host", "port", "db_path",
                           "auth_mode"})


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "{}"
    text = str(value)
    if text and not any(c.isspace() or c == '"' for c in text):
        return text
    return ujson.dumps(text, escape_forward_slashes=False)


# ORP_* names that are not settings of the process but are legitimately set around it: the
# systemd unit's drain delay, the scripts' virtualenv, and the test and benchmark knobs.
_OTHER_VARIABLES = frozenset({"ORP_DRAIN_SECONDS", "ORP_VENV"})
_OTHER_PREFIXES = ("ORP_TEST_", "ORP_SOAK_", "ORP_FUZZ_", "ORP_BENCH_")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per `ORP_*` variable that is no setting (a typo is otherwise silently
    ignored), with the closest setting's name when there is one."""
    env = os.environ if environ is None else environ
    known = [name for s in SETTINGS for name in (s.env, *s.aliases)]
    warnings = []
    for name in sorted(env):
        if (not name.startswith("ORP_") or name in known or name in _OTHER_VARIABLES
                or name.startswith(_OTHER_PREFIXES)):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else "; see orp-proxy --help"
        warnings.append(f"unknown setting {name} is ignored{hint}")
    return warnings


def redacted_url(url: str) -> str:
    """`url` with user information, query and fragment replaced by a marker."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<redacted>"
    _, at, host = parts.netloc.rpartition("@")
    netloc = f"<redacted>@{host}" if at else host
    return urlunsplit((parts.scheme, netloc, parts.path,
                       "<redacted>" if parts.query else "",
                       "<redacted>" if parts.fragment else ""))


def secret_path(path: str | None, credential: str) -> str | None:
    """The file a secret is read from: `path` if given, else the systemd credential named
    `credential` (`LoadCredential=`) if the service has one; None if neither."""
    if path is not None:
        return path
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = os.path.join(directory, credential)
        if os.path.exists(candidate):
            return candidate
    return None


def read_secret_file(path: str, what: str) -> str:
    """The text of a secret file; ConfigError (naming `what` and the path, never the content)
    if it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {what} {path}: {reason}") from None


def _secret(value: str | None, path: str | None, credential: str) -> str | None:
    """A secret given directly, in a file (its first line), or as a systemd credential."""
    if value:
        return value
    found = secret_path(path, credential)
    if found is None:
        return None
    lines = read_secret_file(found, "secret file").splitlines()
    return (lines[0].strip() if lines else "") or None


def upstream_key(spec: UpstreamSpec) -> str | None:
    """The key of a configured upstream: the first line of its `api_key_file` or of its
    systemd credential `api_key_credential`; None if it names neither. ConfigError (naming
    the upstream, never the key) if the file cannot be read or the credential is missing."""
    if spec.api_key_file is not None:
        path = spec.api_key_file
    elif spec.api_key_credential is not None:
        found = secret_path(None, spec.api_key_credential)
        if found is None:
            raise ConfigError(f"upstreams.{spec.name}.api_key_credential: no systemd "
                              f"credential {spec.api_key_credential!r} "
                              "($CREDENTIALS_DIRECTORY, LoadCredential=)")
        path = found
    else:
        return None
    lines = read_secret_file(path, f"the key of upstream {spec.name!r},").splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"upstreams.{spec.name}: the key file {path} is empty")
    return key


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the `ORP_CONFIG` file's `[settings]`, then the environment, then
    `overrides` (raw strings keyed by field name); later ones win."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = (overrides or {}).get("config_file") or env.get("ORP_CONFIG") or None
    file = load_config_file(path) if path else None
    for setting in SETTINGS:
        raw = env.get(setting.env)
        for alias in setting.aliases:
            if raw is None:
                raw = env.get(alias)
        if raw is None and file is not None:
            raw = file.settings.get(setting.field)
        if overrides is not None and overrides.get(setting.field) is not None:
            raw = overrides[setting.field]
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            shown = ("<redacted>" if setting.secret
                     else repr(redacted_url(raw)) if setting.field == "upstream_url"
                     else repr(setting.show(raw)) if setting.show is not None else repr(raw))
            where = (f"{file.path}: settings.{setting.field}" if file is not None
                     and env.get(setting.env) is None and setting.field in file.settings
                     and not (overrides or {}).get(setting.field) else setting.env)
            raise ConfigError(f"{where}={shown}: {exc}") from None
    return dataclasses.replace(Settings(), **values, file=file)


def load_config_file(path: str) -> FileConfig:
    """The validated `ORP_CONFIG` file; ConfigError (one line naming the key) if unusable."""
    try:
        file = read_config(path, {s.field: s.env for s in SETTINGS})
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    for setting in SETTINGS:
        if setting.secret and setting.field in file.settings:
            raise ConfigError(f"{path}: settings.{setting.field}: a secret does not belong in "
                              f"the file; use {setting.env}, its _FILE variant or a systemd "
                              "credential")
    return file
