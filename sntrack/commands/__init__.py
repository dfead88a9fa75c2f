"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`.

COMMANDS names each command's module, in the order `sntrack --help` lists them, without importing it: `sntrack NAME`
imports only NAME's module (some import a broker client, MLflow's HTTP client or the web server at the top), and
`sntrack --help` imports them all (tests/test_cli.py::test_the_command_table_names_what_each_module_registers).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

COMMANDS = {
    "worker": "worker", "consume": "consume", "dashboard": "dashboard", "report": "report",
    "reconcile": "reconcile", "replay": "replay", "subscribe": "subscribe", "status": "status", "studies": "studies",
    "export": "export", "trial": "trial", "publish-sample": "publish_sample", "spool": "spool",
    "topology": "topology", "db": "db", "gateway": "gateway", "mlflow-server": "mlflow_server", "dlq": "dlq",
    "up": "up",
}


def command_module(name: str) -> ModuleType:
    """The module of the command `name` (a key of COMMANDS)."""
    return import_module(f"sntrack.commands.{COMMANDS[name]}")
