"""sntrack consume NAME… — run consumers as a long-lived daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from consumers.metrics import ConsumerMetrics
from consumers.plugins import require_migrated
from consumers.registry import CONSUMER_NAMES, PROJECTIONS
from consumers.service import resolve_names, serve
from sntrack.ops import add_metrics_port, on_loop, ops_server
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "consume", help="run consumers (daemon)",
        description="Consume ml.run.* events from each consumer's own quorum queue and apply them. "
        "SIGTERM finishes the batch in hand, acks it and exits; the mlflow consumer finishes only its MLflow calls "
        "in flight and leaves the rest of its batch unacked for the next run.")
    names = ", ".join(CONSUMER_NAMES)
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"consumers to run: {names} or all (installed projection plugins included)")
    add_metrics_port(parser)
    parser.set_defaults(run=_consume)


async def _consume(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    chosen = [PROJECTIONS[n] for n in resolve_names(args.names) if n in PROJECTIONS]
    await require_migrated(settings.database_url, chosen)
    metrics = ConsumerMetrics()
    with ops_server(args, settings, metrics.registry, on_loop(metrics.health, loop), on_loop(metrics.sample, loop)):
        return await serve(settings.consumer(), args.names, stop, metrics)
