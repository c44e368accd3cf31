# Sourced by scripts/serve and scripts/test: a project virtualenv with ORP installed (editable).
# ORP_VENV picks its location (default .venv in the checkout); extras are passed as arguments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORP_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.orp-installed-$1"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$1]"
    touch "$stamp"
fi
