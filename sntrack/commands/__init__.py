"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`.

COMMANDS names the commands, in the order `sntrack --help` lists them, without importing their modules: `sntrack NAME`
imports only NAME's module (some import a broker client, MLflow's HTTP client or the web server at the top), and
`sntrack --help` imports them all (tests/test_cli.py::test_the_command_table_names_what_each_module_registers).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

COMMANDS = (
    "worker", "consume", "dashboard", "report", "reconcile", "replay", "subscribe", "status", "studies", "export",
    "trial", "publish-sample", "spool", "topology", "db", "gateway", "mlflow-server", "dlq", "up",
)


def command_module(name: str) -> ModuleType:
    """The module of the command `name` (one of COMMANDS): sntrack/commands/<name with _ for ->.py."""
    return import_module(f"sntrack.commands.{name.replace('-', '_')}")
