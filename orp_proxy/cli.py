"""`orp-proxy`: run the gateway, inspect and maintain its store."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import textwrap
from typing import Any

from orp_proxy import __version__
from orp_proxy.config import (
    SETTINGS,
    ConfigError,
    Settings,
    load_settings,
    unknown_variables,
    upstream_key,
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _settings_help() -> str:
    lines = ["settings (flag, environment variable, default):"]
    defaults = Settings()
    for setting in SETTINGS:
        default = getattr(defaults, setting.field)
        shown = "unset" if default in (None, {}) else default
        lines.append(f"  {_flag(setting.field)} / {setting.env}  (default: {shown})")
        lines.extend(textwrap.wrap(setting.help, 76, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for setting in SETTINGS:
        if setting.metavar == "BOOL":
            # `--mock-upstream` alone means true; `--mock-upstream false` still works.
            group.add_argument(_flag(setting.field), dest=setting.field, metavar=setting.metavar,
                               nargs="?", const="true", help=f"{setting.help} [{setting.env}]")
        else:
            group.add_argument(_flag(setting.field), dest=setting.field, metavar=setting.metavar,
                               help=f"{setting.help} [{setting.env}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orp-proxy",
        description="ORP: an Open Responses gateway in front of Chat Completions backends.",
        epilog=_settings_help() + textwrap.dedent("""

            Development: `orp-proxy serve` runs one process on uvloop.
            Production: gunicorn with aiohttp workers and the shipped config, which reads
            the same settings (plus ORP_WORKERS, ORP_GRACEFUL_TIMEOUT, ...):
              gunicorn -c python:orp_proxy.ops.gunicorn_conf orp_proxy.app:create_app
            and under systemd the unit in systemd/ (see README, "Production").
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"orp-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a single-process server (uvloop)",
                                description="Run ORP as one process on ORP_HOST:ORP_PORT.")
    _add_setting_flags(serve)
    show = commands.add_parser("settings", help="print the effective settings (secrets hidden)")
    _add_setting_flags(show)
    store = commands.add_parser("store", help="inspect and maintain the response store")
    store.add_argument("action", choices=["stats", "purge", "vacuum", "migrate", "status",
                                          "copy"],
                       help="stats: counts and sizes; purge: delete expired responses now; "
                            "vacuum: compact (SQLite: checkpoint the WAL and rebuild the file; "
                            "PostgreSQL: VACUUM ANALYZE); migrate: bring the schema up to date "
                            "(also done at start-up); status: schema version and pending "
                            "migrations, changing nothing; copy: move every response from "
                            "--from to the empty store --to")
    store.add_argument("--from", dest="copy_from", metavar="URL",
                       help="copy: the store to read (sqlite:///PATH or postgresql://...)")
    store.add_argument("--to", dest="copy_to", metavar="URL",
                       help="copy: the empty store to fill (created or migrated first)")
    _add_setting_flags(store)
    config = commands.add_parser("config", help="validate a configuration file (ORP_CONFIG)")
    config.add_argument("action", choices=["check"], help="check: validate FILE completely "
                        "(values, references, key files readable) without starting anything")
    config.add_argument("file", metavar="FILE", help="the TOML file")
    return parser


def _check_config(path: str) -> int:
    """`orp-proxy config check FILE`: one line saying what is wrong, or a summary."""
    try:
        # The file's own values only: the environment must not hide a bad value in it.
        settings = load_settings({}, {"config_file": path})
        file = settings.file
        assert file is not None
        for spec in file.upstreams.values():
            upstream_key(spec)  # readable, never printed
    except ConfigError as exc:
        print(f"orp-proxy: {exc}", file=sys.stderr)
        return 1
    deployments = sum(len(d) for d in file.models.values())
    print(f"{path}: ok ({len(file.settings)} settings, {len(file.upstreams)} upstreams, "
          f"{len(file.models)} models, {deployments} deployments)")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {s.field: getattr(args, s.field) for s in SETTINGS
                 if getattr(args, s.field, None) is not None}
    return load_settings(overrides=overrides)


def _serve(settings: Settings) -> int:
    from aiohttp import web

    from orp_proxy.app import build_app
    from orp_proxy.ops.preflight import check_settings

    log = logging.getLogger("orp")
    for warning in unknown_variables():
        log.warning("%s", warning)
    try:
        check_settings(settings)
    except ConfigError as exc:
        print(f"orp-proxy: {exc}", file=sys.stderr)
        return 2

    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    log.info("settings: %s", settings.summary())
    # run_app runs the loop until SIGINT/SIGTERM, shuts the app down, then closes the loop.
    # backlog as gunicorn's default: a burst of connects beyond aiohttp's 128 would otherwise
    # wait for SYN retransmits (1 s, 3 s, 7 s, ...) before ORP even sees them.
    try:
        web.run_app(build_app(settings), host=settings.host, port=settings.port, backlog=2048,
                    handler_cancellation=True, loop=loop, access_log=None,
                    keepalive_timeout=settings.keepalive_timeout,
                    shutdown_timeout=settings.graceful_timeout,
                    print=lambda text: _announce(log, text))
    except ConfigError as exc:  # found while opening the store, say
        print(f"orp-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the address is taken, or not ours to listen on
        print(f"orp-proxy: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _announce(log: logging.Logger, text: str) -> None:
    """aiohttp's "======== Running on URL ========" banner as one log line in the format."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    log.info("%s", first.strip("= ").replace("Running on", "listening on"))


async def _store_action(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from orp_proxy.config import parse_store_url
    from orp_proxy.store import factory

    action = args.action
    if action == "status":
        return await factory.schema_status(settings)
    if action == "copy":
        if not args.copy_from or not args.copy_to:
            raise ConfigError("store copy needs --from URL and --to URL")
        try:
            source, destination = parse_store_url(args.copy_from), parse_store_url(args.copy_to)
        except ValueError as exc:
            raise ConfigError(f"store copy: {exc}") from None
        return await factory.copy_store(settings, source, destination)
    store = await factory.open_store(settings)
    try:
        if action == "migrate":
            return await factory.schema_status(settings)
        if action == "purge":
            return {"purged": await store.purge_expired()}
        if action == "vacuum":
            await store.vacuum()
        return await store.stats()
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config":
        return _check_config(args.file)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"orp-proxy: {exc}", file=sys.stderr)
        return 2
    from orp_proxy.ops.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        return _serve(settings)
    elif args.command == "settings":
        for warning in unknown_variables():
            print(f"orp-proxy: {warning}", file=sys.stderr)
        for key, value in settings.redacted().items():
            print(f"{key} = {value}")
    else:
        import json

        from orp_proxy.store import StoreUnavailable

        try:
            result = asyncio.run(_store_action(settings, args))
        except ConfigError as exc:
            print(f"orp-proxy: {exc}", file=sys.stderr)
            return 2
        except StoreUnavailable as exc:
            print(f"orp-proxy: the store is unavailable: {exc.detail}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
