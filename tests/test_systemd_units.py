"""The unit templates in infra/systemd/ (operations issue, item 8): `systemd-analyze verify` accepts them with no
warning, for every consumer; each restarts on failure, stops with SIGTERM and reads its credentials from an
EnvironmentFile."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.registry import CONSUMER_NAMES

UNITS = Path(__file__).resolve().parent.parent / "infra" / "systemd"
INSTALLED = "/opt/sntrack/venv/bin/sntrack"  # where the units expect the console script
VERIFY = shutil.which("systemd-analyze")


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_every_daemon_has_a_unit_that_restarts_on_failure_stops_with_sigterm_and_reads_an_environment_file():
    units = {p.name: directives(p) for p in UNITS.glob("*.service")}
    assert set(units) == {"sntrack-consume@.service", "sntrack-worker@.service", "sntrack-dashboard.service"}
    assert units["sntrack-consume@.service"]["ExecStart"] == [f"{INSTALLED} consume %i"]
    assert units["sntrack-worker@.service"]["ExecStart"][0].startswith(f"{INSTALLED} worker --study %i")
    for name, unit in units.items():
        assert unit["Restart"] == ["on-failure"], name
        assert unit["KillSignal"] == ["SIGTERM"], name
        assert unit["KillMode"] == ["mixed"], name  # SIGTERM to the daemon; the rest only after the timeout
        assert "/etc/sntrack/sntrack.env" in unit["EnvironmentFile"], name
        assert unit["RestartPreventExitStatus"] == ["2"], name  # a configuration mistake is not retried


def _verify(folder: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run([VERIFY, "verify", *units], cwd=folder, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(VERIFY is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_every_unit_with_no_warning(tmp_path):
    # verify checks that ExecStart's program exists: point the units at this environment's console script.
    sntrack = Path(sys.executable).parent / "sntrack"
    if not sntrack.exists():
        sntrack = tmp_path / "sntrack"
        sntrack.write_text("#!/bin/sh\n")
        sntrack.chmod(0o755)
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(sntrack)))
    instances = [f"sntrack-consume@{name}.service" for name in CONSUMER_NAMES]
    run = _verify(tmp_path, *instances, "sntrack-worker@demo.service", "sntrack-dashboard.service")
    assert run.returncode == 0 and run.stderr == "", run.stderr

    # The check sees a mistake: verify exits 0 on an unknown key, but says so on stderr.
    broken = tmp_path / "sntrack-consume@.service"
    broken.write_text(broken.read_text().replace("KillSignal=", "KilSignal="))
    assert "Unknown key 'KilSignal'" in _verify(tmp_path, "sntrack-consume@trials.service").stderr
