"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`."""

from sntrack.commands import (
    consume,
    dashboard,
    db,
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
    worker, consume, dashboard, report, reconcile, replay, subscribe, status, publish_sample, spool, topology, db,
)
