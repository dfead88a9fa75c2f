"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`."""

from sntrack.commands import consume, db, replay, report, status, topology

COMMAND_MODULES = (topology, db, consume, replay, status, report)
