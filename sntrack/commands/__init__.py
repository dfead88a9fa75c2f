"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`."""

from sntrack.commands import (
    consume,
    db,
    publish_sample,
    reconcile,
    replay,
    report,
    spool,
    status,
    topology,
    worker,
)

COMMAND_MODULES = (topology, db, consume, replay, status, report, publish_sample, spool, worker, reconcile)
