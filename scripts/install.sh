#!/usr/bin/env bash
# Install ORP as the systemd service `orp-proxy` from this checkout (run as root; safe to re-run):
#   - a virtualenv in /opt/orp-proxy/venv with ORP and gunicorn (upgraded on every run);
#   - /etc/orp-proxy/orp-proxy.env from the example, only if it does not exist yet;
#   - /etc/orp-proxy/credentials/: owner_secret generated once, upstream_api_key, api_keys and
#     store_password created empty (fill them in), never overwritten;
#   - with --store-url: ORP_STORE_URL set in the environment file (several hosts sharing one
#     PostgreSQL database), and with --store-password-file the password copied into the
#     credential store_password;
#   - the unit in /etc/systemd/system (local changes belong in drop-ins: systemctl edit), then
#     `systemctl daemon-reload`. Enabling and starting is left to you.
#
# Usage: scripts/install.sh [--dry-run] [--python PYTHON] [--store-url URL]
#                           [--store-password-file FILE]
#   --dry-run   print what would be done, change nothing (no root needed)
#   --store-url postgresql://USER@HOST:PORT/DB (no password in it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/orp-proxy
ETC=/etc/orp-proxy
UNIT_DIR=/etc/systemd/system
PYTHON=python3
DRY=0
STORE_URL=""
STORE_PASSWORD_FILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --python) PYTHON="$2"; shift ;;
        --store-url) STORE_URL="$2"; shift ;;
        --store-password-file) STORE_PASSWORD_FILE="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

run() {
    if [ "$DRY" = 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

# Creates FILE (mode 0600) with the output of the remaining command, unless FILE exists.
create_secret() {
    local file="$1"
    shift
    if [ -e "$file" ]; then
        echo "keeping $file"
    elif [ "$DRY" = 1 ]; then
        printf '+ %s > %s (mode 0600)\n' "$*" "$file"
    else
        (umask 077 && "$@" > "$file")
        echo "created $file"
    fi
}

case "$STORE_URL" in
    ""|postgresql://*|postgres://*|sqlite:///*) ;;
    *) echo "install.sh: --store-url must be postgresql://... or sqlite:///..." >&2; exit 2 ;;
esac
# user:password@ in the URL would put the password in the environment of every process.
if [[ "$STORE_URL" =~ ^[a-z]+://[^/@]*:[^/@]*@ ]]; then
    echo "install.sh: no password in --store-url; use --store-password-file" >&2
    exit 2
fi
if [ -n "$STORE_PASSWORD_FILE" ] && [ ! -r "$STORE_PASSWORD_FILE" ]; then
    echo "install.sh: cannot read $STORE_PASSWORD_FILE" >&2
    exit 2
fi

if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --dry-run)" >&2
    exit 1
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "ORP needs Python >= 3.11"'

if [ ! -x "$PREFIX/venv/bin/python" ]; then
    run install -d -m 0755 "$PREFIX"
    run "$PYTHON" -m venv "$PREFIX/venv"
fi
run "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# Not editable: the service must not depend on this checkout staying where it is.
run "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    "$ROOT[server]"

run install -d -m 0755 "$ETC"
if [ -e "$ETC/orp-proxy.env" ]; then
    echo "keeping $ETC/orp-proxy.env"
else
    run install -m 0644 "$ROOT/systemd/orp-proxy.env.example" "$ETC/orp-proxy.env"
fi
run install -d -m 0700 "$ETC/credentials"
create_secret "$ETC/credentials/owner_secret" \
    "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))'
create_secret "$ETC/credentials/upstream_api_key" true
create_secret "$ETC/credentials/api_keys" true
if [ -n "$STORE_PASSWORD_FILE" ]; then
    # Given explicitly: replaces what was there.
    run install -m 0600 "$STORE_PASSWORD_FILE" "$ETC/credentials/store_password"
else
    create_secret "$ETC/credentials/store_password" true
fi
if [ -n "$STORE_URL" ]; then
    # One ORP_STORE_URL line in the environment file, replacing an earlier one.
    if [ "$DRY" = 1 ]; then
        printf '+ set ORP_STORE_URL=%s in %s\n' "$STORE_URL" "$ETC/orp-proxy.env"
    else
        sed -i '/^ORP_STORE_URL=/d' "$ETC/orp-proxy.env"
        printf 'ORP_STORE_URL=%s\n' "$STORE_URL" >> "$ETC/orp-proxy.env"
    fi
fi

run install -m 0644 "$ROOT/systemd/orp-proxy.service" "$UNIT_DIR/orp-proxy.service"
run systemctl daemon-reload

[ "$DRY" = 1 ] && echo "(dry run: nothing was changed)"
cat <<NEXT
Next:
  - set ORP_UPSTREAM_URL (and more) in $ETC/orp-proxy.env;
  - put the upstream key in $ETC/credentials/upstream_api_key and client keys, one per line,
    in $ETC/credentials/api_keys;
  - systemctl enable --now orp-proxy     (after an upgrade: systemctl restart orp-proxy)
  - curl -fsS http://127.0.0.1:8080/readyz
NEXT
