"""gunicorn settings for ORP, shipped with the package::

    gunicorn -c python:orp_proxy.ops.gunicorn_conf orp_proxy.app:create_app

Values come from ORP's own settings (the `ORP_*` variables, see `orp-proxy --help`), so one
environment file configures both; gunicorn flags given on the command line still win.

- aiohttp workers on uvloop; `ORP_WORKERS` of them (0: `$WEB_CONCURRENCY`, else one per CPU
  core the process may run on — an async worker serves thousands of streams, so more workers
  than cores only adds contention); listening on `ORP_HOST:ORP_PORT`.
- Keep-alive `ORP_KEEPALIVE_TIMEOUT` (75 s: above the usual 60 s idle timeout of load balancers,
  so they, not we, close idle connections); graceful timeout `ORP_GRACEFUL_TIMEOUT` for
  streams to finish after SIGTERM.
- Prometheus multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` as given, else
  `$RUNTIME_DIRECTORY/metrics` under systemd, else a temporary directory removed at exit; wiped
  when the master starts, and a dead worker's live gauges are dropped in `child_exit`.
- SIGTERM in a worker first marks it draining (`/readyz` → 503), then stops it as usual.
- The control socket (gunicorn ≥ 25.1) goes to `ORP_CONTROL_SOCKET`, or under systemd to
  `$RUNTIME_DIRECTORY/gunicorn.ctl`; otherwise it is off rather than under `$HOME`.
- Logs: access lines alone on stdout, everything else on stderr, both in `ORP_LOG_FORMAT`.
- The settings are checked in the master before any worker is forked (`on_starting`): a
  mistake is one line on stderr and exit status 78 (EX_CONFIG, which the systemd unit does not
  restart on), not a traceback per worker.
- SIGHUP (`systemctl reload`): gunicorn starts new workers, which read the settings and the
  `ORP_CONFIG` file afresh, and stops the old ones gracefully (their streams finish). The
  master first runs the start-up checks on what they would load: if one fails, it is logged
  and nothing changes.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from typing import Any, NoReturn

from orp_proxy.config import ConfigError, load_settings, unknown_variables

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from retrying.
EXIT_CONFIG = 78


def _refuse(error: ConfigError) -> NoReturn:
    print(f"orp-proxy: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


try:
    _settings = load_settings()
except ConfigError as exc:
    _refuse(exc)


def _worker_count(configured: int) -> int:
    if configured > 0:
        return configured
    given = os.environ.get("WEB_CONCURRENCY", "").strip()
    if given:
        try:
            if int(given) > 0:
                return int(given)
        except ValueError:
            pass
        raise SystemExit(f"orp-proxy: WEB_CONCURRENCY={given!r}: expected a positive integer")
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _runtime_directory() -> str | None:
    # systemd sets it (colon-separated when several directories are configured).
    value = os.environ.get("RUNTIME_DIRECTORY", "")
    return value.split(":")[0] or None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


wsgi_app = "orp_proxy.app:create_app"
worker_class = "aiohttp.GunicornUVLoopWebWorker"
workers = _worker_count(_settings.workers)
bind = [_address(_settings.host, _settings.port)]
keepalive = _settings.keepalive_timeout
graceful_timeout = _settings.graceful_timeout
proc_name = "orp-proxy"

_control = _settings.control_socket
if _control is None and _runtime_directory():
    _control = os.path.join(str(_runtime_directory()), "gunicorn.ctl")
if _control is None or _control.lower() == "off":
    control_socket_disable = True
else:
    control_socket = _control

_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
_own_metrics_dir = False
if _metrics_dir is None:
    runtime = _runtime_directory()
    if runtime:
        _metrics_dir = os.path.join(runtime, "metrics")
    else:
        _metrics_dir = tempfile.mkdtemp(prefix="orp-metrics-")
        _own_metrics_dir = True
    # Set in the master before any worker exists (and before anything imports
    # prometheus_client, which picks its storage when imported).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

_level = _settings.log_level.upper()
loglevel = _settings.log_level
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        # One formatter for both handlers: it lays out access records and messages alike.
        "orp": {"()": "orp_proxy.ops.logs." + (
            "JsonFormatter" if _settings.log_format == "json" else "TextFormatter")},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "orp",
                    "stream": "ext://sys.stderr"},
        "access": {"class": "logging.StreamHandler", "formatter": "orp",
                   "stream": "ext://sys.stdout"},
    },
    "root": {"level": _level, "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": _level, "handlers": [], "propagate": True},
        # Only used if someone adds --access-logfile: aiohttp's own access line.
        "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        "orp.access": {"handlers": ["access"], "propagate": False},
        # Its DEBUG lines carry SQL parameters: message content and the owner-hash key.
        "aiosqlite": {"level": "INFO"},
    },
}


def on_starting(server: Any) -> None:
    """Master start (not on reload): check the settings before any worker exists, and wipe
    the samples of an earlier run, which must not be summed in."""
    from orp_proxy.ops.preflight import check_settings

    for warning in unknown_variables():
        server.log.warning("%s", warning)
    try:
        check_settings(_settings)
    except ConfigError as exc:
        on_exit(server)  # the temporary metrics directory
        _refuse(exc)
    assert _metrics_dir is not None
    os.makedirs(_metrics_dir, exist_ok=True)
    for path in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.remove(path)


def when_ready(server: Any) -> None:
    server.log.info("ORP settings: %s", _settings.summary())
    server.log.info("Prometheus multiprocess directory: %s", _metrics_dir)
    _check_before_reload(server)


def _loadable_config() -> None:
    """The start-up checks on what a new worker will load (the settings with the `ORP_CONFIG`
    file, the key files); ConfigError if any of it is unusable."""
    from orp_proxy.ops.preflight import check_settings

    check_settings(load_settings())


def _check_before_reload(server: Any) -> None:
    """Wrap the master's SIGHUP handling: new workers only for a configuration that loads.

    Otherwise every new worker would fail to boot, and gunicorn stops altogether when one
    does; the old workers (and their streams) would be gone with it."""
    reload = server.handle_hup

    def handle_hup() -> None:
        try:
            _loadable_config()
        except ConfigError as exc:
            server.log.error("SIGHUP: %s; keeping the running configuration and workers", exc)
            return
        server.log.info("SIGHUP: configuration checked; new workers start with it, the old "
                        "ones finish their requests")
        reload()

    # The arbiter looks its handlers up on the instance at each signal.
    server.handle_hup = handle_hup


def post_worker_init(worker: Any) -> None:
    from orp_proxy.ops.health import drain_on_sigterm

    drain_on_sigterm(worker)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    if _own_metrics_dir and _metrics_dir is not None:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
