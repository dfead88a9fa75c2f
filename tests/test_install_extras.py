"""The consumer side runs without the `worker` extra (torch, optuna, scikit-learn): `pip install sntrack` on a machine
with no torch gives working `sntrack consume` and `sntrack report` commands.

Each check runs a fresh interpreter whose import system refuses the worker extra's packages, as if they were not
installed, then drives the command line in process.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER_ONLY = ("torch", "optuna", "sklearn")

BLOCK = f"""
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {WORKER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the worker extra is not installed)")
        return None
sys.meta_path.insert(0, NotInstalled())
"""


def _run_without_worker_extra(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_the_block_really_hides_the_worker_packages():
    out = _run_without_worker_extra("import torch")
    assert out.returncode == 1 and "blocked: the worker extra is not installed" in out.stderr


@pytest.mark.parametrize("command", ["consume", "report", "replay", "reconcile", "status", "subscribe", "db"])
def test_consumer_commands_work_without_the_worker_extra(command):
    out = _run_without_worker_extra(f"""
import sys
from sntrack.cli import main
try:
    main([{command!r}, "--help"])
except SystemExit as exit_:
    code = exit_.code
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {WORKER_ONLY!r})
print("EXIT", code, "LEAKED", leaked)
""")
    assert out.returncode == 0, out.stderr
    assert f"usage: sntrack {command}" in out.stdout and out.stdout.rstrip().endswith("EXIT 0 LEAKED []")


def test_the_worker_says_which_extra_it_needs():
    out = _run_without_worker_extra("""
from sntrack.cli import main
raise SystemExit(main(["worker", "--study", "s"]))
""")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "sntrack: the worker needs the worker extra (torch, optuna, scikit-learn): pip install 'sntrack[worker]'")


def test_pyproject_declares_ranges_and_keeps_the_heavy_packages_in_the_worker_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(d) for d in project["dependencies"]}
    assert not names & {"torch", "optuna", "scikit-learn"}
    assert {"torch", "optuna", "scikit-learn"} <= {_name(d) for d in project["optional-dependencies"]["worker"]}
    for spec in project["dependencies"] + project["optional-dependencies"]["worker"]:
        assert "==" not in spec, f"{spec}: exact pins belong in infra/constraints.txt"
    pins = dict(line.split("==") for line in (ROOT / "infra" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and "sntrack" not in pins
    assert {_normal(n) for n in names} <= {_normal(n) for n in pins}


def _normal(name: str) -> str:
    """PEP 503: `prometheus_client` and `Prometheus-Client` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip()
