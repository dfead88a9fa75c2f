"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`."""

from sntrack.commands import (
    consume,
    db,
    gateway,
    publish_sample,
    reconcile,
    replay,
    report,
    spool,
    status,
    subscribe,
    topology,
    worker,
)

COMMAND_MODULES = (
    worker, consume, report, reconcile, replay, subscribe, status, publish_sample, spool, topology, db, gateway,
)
