"""Sub-commands of `sntrack`. Each module has `register(subparsers)` setting `run(args, settings)`."""

from sntrack.commands import (
    consume,
    dashboard,
    db,
    dlq,
    export,
    gateway,
    mlflow_server,
    publish_sample,
    reconcile,
    replay,
    report,
    spool,
    status,
    studies,
    subscribe,
    topology,
    trial,
    up,
    worker,
)

COMMAND_MODULES = (
    worker, consume, dashboard, report, reconcile, replay, subscribe, status, studies, export, trial, publish_sample,
    spool, topology, db, gateway, mlflow_server, dlq, up,
)
