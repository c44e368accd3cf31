"""Start-up checks: everything about the settings that can be known wrong before ORP listens.

`orp-proxy serve` runs them before it builds the application, the gunicorn config in the master
(`on_starting`) before any worker is forked, so a mistake is one line naming the setting and the
reason rather than a traceback per worker. Each check raises `ConfigError`.
"""

from __future__ import annotations

import socket

from orp_proxy.config import ConfigError, Settings, upstream_key
from orp_proxy.ops.auth import Authenticator
from orp_proxy.protocol.summaries import CompactionCipher
from orp_proxy.store.sqlite import check_path


def check_listen_address(host: str, port: int) -> None:
    """The host must resolve to an address to listen on (binding is the server's business)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"ORP_HOST={host!r}: cannot listen there ({reason})") from None


def check_settings(settings: Settings) -> None:
    """Every start-up check; ConfigError with a one-line message at the first failure."""
    settings.check_upstream()
    check_listen_address(settings.host, settings.port)
    Authenticator.from_settings(settings)  # mode, keys and their file
    settings.resolved_upstream_key()  # secret files readable
    if settings.file is not None:
        for spec in settings.file.upstreams.values():
            upstream_key(spec)
    settings.resolved_owner_secret()
    compaction_key = settings.resolved_compaction_key()
    if compaction_key is not None:
        CompactionCipher.create(compaction_key, lambda _: "")
    target = settings.store_target()
    if target.backend == "sqlite":
        check_path(target.path)
    else:
        settings.resolved_store_password()  # its file or credential readable
