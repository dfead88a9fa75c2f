"""sntrack consume NAME… — run consumers as a long-lived daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from consumers.registry import CONSUMER_NAMES
from consumers.service import serve
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "consume", help="run consumers (daemon)",
        description="Consume ml.run.* events from each consumer's own quorum queue and apply them. "
        "SIGTERM finishes the batch in hand, acks it and exits.")
    names = ", ".join(CONSUMER_NAMES)
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"consumers to run: {names} or all")
    parser.set_defaults(run=_consume)


async def _consume(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings.consumer(), args.names, stop)
