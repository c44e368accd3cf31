"""The configuration file (`ORP_CONFIG`, TOML): upstreams, models and routing.

Environment variables cannot express several backends well, so they live in one file, read with
the standard library's `tomllib` and validated completely at start-up (and on every reload):
each problem is one line naming the file and the key (`orp.toml: upstreams.a.url: ...`). The
file's `[settings]` table may also hold any single setting by its field name; an environment
variable (or flag) for the same setting wins.

Keys are never in the file: an upstream names a file (`api_key_file`) or a systemd credential
(`api_key_credential`) that holds it, read when the gateway starts. This module only parses and
checks shapes; nothing here does I/O beyond reading the file itself.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEVELOPER_ROLES = ("system", "developer")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
STICKY_MODES = ("none", "previous_response_id", "prompt_cache_key", "both")
# Keys of the body ORP itself writes: `extra_body` may not replace them (the stream, the
# messages and the model are what make the answer an answer to this request).
RESERVED_BODY_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})


class ConfigFileError(ValueError):
    """The file cannot be used; the message is one line naming the file and the key."""


REASONING_FIELDS = ("both", "reasoning_content", "reasoning", "none")


@dataclass(frozen=True)
class Quirks:
    """How one backend wants its Chat Completions requests (the defaults: the process-wide
    settings ORP_MAX_TOKENS_FIELD, ORP_DEVELOPER_ROLE, ORP_UPSTREAM_REASONING_FIELD and
    ORP_UPSTREAM_THINKING_KWARG)."""

    max_tokens_field: str = "max_tokens"
    developer_role: str = "system"
    # Assistant message field(s) that carry replayed reasoning upstream.
    reasoning_field: str = "both"
    # Chat-template argument that switches a hybrid model's thinking (None: reasoning_effort).
    thinking_kwarg: str | None = None
    # False: a forced `{"type": "function"}` tool_choice goes upstream as "required" (the
    # tools are still enforced on the way back), for servers that reject the object form.
    tool_choice_object: bool = True
    # Merged into every request body (e.g. vLLM's `top_k`, `chat_template_kwargs`).
    extra_body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamSpec:
    """One backend: where it is, how to authenticate, how long to wait, how much to send."""

    name: str
    url: str
    api_key_file: str | None = None
    api_key_credential: str | None = None
    connect_timeout: float | None = None  # None: the process-wide setting
    read_timeout: float | None = None
    max_concurrency: int = 0  # per worker; 0: unlimited
    # The quirks this file sets for the upstream (`Quirks` field → value); the others follow
    # the process-wide settings.
    quirks: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentSpec:
    """A model served by an upstream under its own name, with a share of the traffic."""

    upstream: str
    model: str
    weight: float = 1.0


@dataclass(frozen=True)
class RoutingOptions:
    """How requests are spread and when a deployment is taken out."""

    retries: int = 2  # further deployments tried before the first byte went to the client
    eject_after: int = 3  # consecutive connect errors / 5xx that eject a deployment
    eject_seconds: float = 5.0  # first ejection; doubles with each further one
    eject_max_seconds: float = 300.0
    probe_interval: float = 2.0  # seconds between /models probes of an ejected deployment
    sticky: str = "none"
    readyz_requires_model: bool = False  # /readyz 503 when no model is servable


@dataclass(frozen=True)
class FileConfig:
    """A parsed, validated configuration file."""

    path: str
    settings: Mapping[str, str] = field(default_factory=dict)  # raw values by field name
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)
    models: Mapping[str, tuple[DeploymentSpec, ...]] = field(default_factory=dict)
    routing: RoutingOptions = field(default_factory=RoutingOptions)


# -- checking values ----------------------------------------------------------------------


class _Problem(Exception):
    """A bad value; the caller adds the key."""


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Problem(f"expected a table, got {type(value).__name__}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Problem("expected a non-empty string")
    return value


def _number(minimum: float, *, above: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise _Problem("expected a number")
        if value < minimum or (above and value == minimum):
            raise _Problem(f"must be {'>' if above else '>='} {minimum:g}")
        return float(value)

    return check


def _integer(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Problem("expected an integer")
        if value < minimum:
            raise _Problem(f"must be >= {minimum}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Problem("expected true or false")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise _Problem(f"expected one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return check


def _url(value: Any) -> str:
    text = _string(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise _Problem(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Problem("expected an http:// or https:// URL with a host, e.g. "
                       "http://gpu-1:8000/v1")
    if parts.username or parts.password:
        # A key in the URL would end up in logs; it belongs in api_key_file.
        raise _Problem("must not contain credentials; use api_key_file or api_key_credential")
    return text


def _extra_body(value: Any) -> dict[str, Any]:
    table = _table(value)
    reserved = sorted(RESERVED_BODY_FIELDS & table.keys())
    if reserved:
        raise _Problem(f"must not set {', '.join(reserved)} (ORP writes them)")
    return dict(table)


class _Reader:
    """Reads one table's keys, each checked, refusing keys it does not know."""

    def __init__(self, path: str, where: str, table: dict[str, Any]) -> None:
        self.path = path
        self.where = where
        self.table = table
        self.seen: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigFileError:
        name = f"{self.where}.{key}" if key and self.where else (key or self.where)
        return ConfigFileError(f"{self.path}: {name}: {message}")

    def get(self, key: str, check: Callable[[Any], Any], default: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.table:
            return default
        try:
            return check(self.table[key])
        except _Problem as exc:
            raise self.error(key, str(exc)) from None

    def require(self, key: str, check: Callable[[Any], Any]) -> Any:
        if key not in self.table:
            raise self.error(key, "required")
        return self.get(key, check)

    def done(self) -> None:
        for key in self.table:
            if key not in self.seen:
                raise self.error(key, "unknown key" + _did_you_mean(key, self.seen))


# -- the file -----------------------------------------------------------------------------


def _settings_table(path: str, table: dict[str, Any], known: Mapping[str, str]
                    ) -> dict[str, str]:
    """`[settings]`: field name → the raw string the environment variable would hold."""
    out: dict[str, str] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigFileError(f"{path}: settings.{key}: unknown setting"
                                  + _did_you_mean(key, known))
        if key == "config_file":
            raise ConfigFileError(f"{path}: settings.{key}: a file cannot name another file")
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            out[key] = str(value)
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            import json

            out[key] = json.dumps(value)
        else:
            raise ConfigFileError(f"{path}: settings.{key}: expected a string, number, "
                                  "boolean or table of strings")
    return out


def _upstream(path: str, name: str, value: Any) -> UpstreamSpec:
    where = f"upstreams.{name}"
    try:
        table = _table(value)
    except _Problem as exc:
        raise ConfigFileError(f"{path}: {where}: {exc}") from None
    r = _Reader(path, where, table)
    url = r.require("url", _url)
    key_file = r.get("api_key_file", _string)
    credential = r.get("api_key_credential", _string)
    if key_file and credential:
        raise r.error("api_key_credential", "give api_key_file or api_key_credential, not both")
    if "api_key" in table:
        r.seen.add("api_key")
        raise r.error("api_key", "the key itself does not belong in the file; name a file "
                      "(api_key_file) or a systemd credential (api_key_credential)")
    spec = UpstreamSpec(
        name=name, url=url, api_key_file=key_file, api_key_credential=credential,
        connect_timeout=r.get("connect_timeout", _number(0, above=True)),
        read_timeout=r.get("read_timeout", _number(0, above=True)),
        max_concurrency=r.get("max_concurrency", _integer(0), 0),
        quirks={key: value for key, value in (
            ("max_tokens_field", r.get("max_tokens_field", _choice(*MAX_TOKENS_FIELDS))),
            ("developer_role", r.get("developer_role", _choice(*DEVELOPER_ROLES))),
            ("reasoning_field", r.get("reasoning_field", _choice(*REASONING_FIELDS))),
            ("thinking_kwarg", r.get("thinking_kwarg", _string)),
            ("tool_choice_object", r.get("tool_choice_object", _boolean)),
            ("extra_body", r.get("extra_body", _extra_body)),
        ) if value is not None},
    )
    r.done()
    return spec


def _deployments(path: str, name: str, value: Any, upstreams: Mapping[str, UpstreamSpec]
                 ) -> tuple[DeploymentSpec, ...]:
    where = f"models.{name}"
    try:
        table = _table(value)
    except _Problem as exc:
        raise ConfigFileError(f"{path}: {where}: {exc}") from None
    r = _Reader(path, where, table)
    raw = r.require("deployments", lambda v: v)
    r.done()
    if not isinstance(raw, list) or not raw:
        raise r.error("deployments", "expected a non-empty array of tables")
    out = []
    seen = set()
    for i, item in enumerate(raw):
        dr = _Reader(path, f"{where}.deployments[{i}]", item if isinstance(item, dict) else {})
        if not isinstance(item, dict):
            raise dr.error(None, "expected a table {upstream = ..., model = ...}")
        upstream = dr.require("upstream", _string)
        if upstream not in upstreams:
            raise dr.error("upstream", f"no upstream named {upstream!r}"
                           + _did_you_mean(upstream, upstreams))
        spec = DeploymentSpec(upstream=upstream, model=dr.get("model", _string, name),
                              weight=dr.get("weight", _number(0, above=True), 1.0))
        dr.done()
        if (spec.upstream, spec.model) in seen:
            raise dr.error(None, f"duplicate deployment {spec.upstream}/{spec.model}")
        seen.add((spec.upstream, spec.model))
        out.append(spec)
    return tuple(out)


def _routing(path: str, value: Any, default_retries: int) -> RoutingOptions:
    try:
        table = _table(value)
    except _Problem as exc:
        raise ConfigFileError(f"{path}: routing: {exc}") from None
    r = _Reader(path, "routing", table)
    options = RoutingOptions(
        retries=r.get("retries", _integer(0), default_retries),
        eject_after=r.get("eject_after", _integer(1), 3),
        eject_seconds=r.get("eject_seconds", _number(0, above=True), 5.0),
        eject_max_seconds=r.get("eject_max_seconds", _number(0, above=True), 300.0),
        probe_interval=r.get("probe_interval", _number(0, above=True), 2.0),
        sticky=r.get("sticky", _choice(*STICKY_MODES), "none"),
        readyz_requires_model=r.get("readyz_requires_model", _boolean, False),
    )
    r.done()
    if options.eject_max_seconds < options.eject_seconds:
        raise r.error("eject_max_seconds", "must be >= eject_seconds")
    return options


def parse_config(path: str, text: str, known_settings: Mapping[str, str]) -> FileConfig:
    """Validate a file's text. `known_settings`: field name → environment name."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
    top = _Reader(path, "", data)
    settings = _settings_table(path, top.get("settings", _table, {}), known_settings)
    upstream_tables = top.get("upstreams", _table, {})
    model_tables = top.get("models", _table, {})
    routing_table = top.get("routing", _table, {})
    top.done()
    upstreams = {name: _upstream(path, name, value) for name, value in upstream_tables.items()}
    models = {name: _deployments(path, name, value, upstreams)
              for name, value in model_tables.items()}
    if upstreams and not models:
        raise ConfigFileError(f"{path}: models: at least one model is needed when upstreams "
                              "are configured")
    unused = sorted(set(upstreams) - {d.upstream for ds in models.values() for d in ds})
    if unused:
        raise ConfigFileError(f"{path}: upstreams.{unused[0]}: not used by any model")
    retries = settings.get("upstream_retries")
    default_retries = int(retries) if retries is not None and retries.isdigit() else 2
    routing = _routing(path, routing_table, default_retries)
    return FileConfig(path=path, settings=settings, upstreams=upstreams, models=models,
                      routing=routing)


def read_config(path: str, known_settings: Mapping[str, str]) -> FileConfig:
    """Read and validate the file at `path`."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    return parse_config(path, text, known_settings)
