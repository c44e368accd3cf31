"""The systemd unit, its environment file and the install script.

`systemd-analyze verify` runs where it is installed (CI installs it); it insists that ExecStart's
program exists, so scripts/verify-unit checks a copy pointing at this venv's gunicorn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orp_proxy.config import SETTINGS

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "orp-proxy.service"
ENV_EXAMPLE = REPO / "systemd" / "orp-proxy.env.example"
# Read by the unit's ExecStop only, not by ORP.
UNIT_ONLY = {"ORP_DRAIN_SECONDS"}

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "verify-unit"), sys.prefix, str(unit)],
                          capture_output=True, text=True, timeout=120)


@needs_systemd_analyze
def test_systemd_analyze_verify_passes() -> None:
    assert Path(sys.prefix, "bin", "gunicorn").exists(), "the test venv lacks gunicorn"
    result = _verify(UNIT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


@needs_systemd_analyze
def test_verify_unit_fails_on_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "orp-proxy.service"
    broken.write_text(UNIT.read_text().replace("KillMode=mixed", "KillMode=gently"))
    result = _verify(broken)
    assert result.returncode == 1 and "gently" in result.stderr


def _unit_values(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(), re.MULTILINE)


def test_unit_environment_names_real_settings_and_stop_timeout_fits() -> None:
    known = {s.env for s in SETTINGS} | UNIT_ONLY | {"PROMETHEUS_MULTIPROC_DIR",
                                                     "PYTHONDONTWRITEBYTECODE"}
    env = dict(value.split("=", 1) for value in _unit_values("Environment"))
    assert set(env) <= known, set(env) - known
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.lstrip("#").split("=", 1)[0]
        if re.fullmatch(r"ORP_[A-Z_]+", name):
            assert name in known, f"{ENV_EXAMPLE.name} names unknown setting {name}"
    (timeout,) = _unit_values("TimeoutStopSec")
    assert int(timeout) > int(env["ORP_GRACEFUL_TIMEOUT"]) + 5
    assert int(timeout) > int(env["ORP_DRAIN_SECONDS"])
    # Secrets come as credentials, under the names config.py and auth.py look for.
    credentials = {value.split(":", 1)[0] for value in _unit_values("LoadCredential")}
    assert credentials == {"upstream_api_key", "owner_secret", "api_keys", "store_password"}
    assert _unit_values("Type") == ["notify"]


def test_install_script_dry_run_changes_nothing() -> None:
    result = subprocess.run([str(REPO / "scripts" / "install.sh"), "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "+ systemctl daemon-reload" in out
    assert "/etc/systemd/system/orp-proxy.service" in out
    assert "/opt/orp-proxy/venv" in out and "dry run: nothing was changed" in out
