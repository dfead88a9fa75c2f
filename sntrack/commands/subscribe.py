"""sntrack subscribe NAME [--pattern P …] — an extra subscriber printing events as JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from common.errors import ConfigurationError
from consumers.attempts import AttemptLedger
from consumers.persistence import create_pool
from consumers.runtime import ConsumerRuntime, connect
from consumers.subscriber import JsonLinesSubscriber
from schemas import ROUTING_PATTERN_ALL
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "subscribe", help="an extra subscriber: matching events as JSON lines on stdout",
        description="Declare the durable quorum queue sntrack.sub.NAME (with a delivery limit and a .dlq), bind it "
        "to ml.events with the routing patterns, and print every valid event as one JSON line, acking after it is "
        "written. The queue keeps collecting while the subscriber is stopped, up to 1,000,000 messages or 1 GiB; "
        "beyond that its oldest messages are dropped (to sntrack.sub.NAME.dlq, x-death reason maxlen); the "
        "journal (table events) still holds every one of them. Example: sntrack subscribe stops --pattern ml.run.stop")
    parser.add_argument("name", help="subscriber name (a-z, 0-9, _ and -)")
    parser.add_argument("--pattern", action="append", metavar="P",
                        help=f"routing pattern, repeatable (default {ROUTING_PATTERN_ALL}; e.g. ml.run.stop)")
    parser.set_defaults(run=_subscribe)


async def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    try:
        handler = JsonLinesSubscriber(args.name, args.pattern or [ROUTING_PATTERN_ALL], sys.stdout)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    # The database holds the attempt ledger that tells a crash loop from restarts.
    pool = await create_pool(settings.database_url, max_size=2)
    try:
        connection = await connect(settings)
        runtime = ConsumerRuntime(handler, settings.consumer(), AttemptLedger(pool, handler.name))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop)
        try:
            await runtime.run(connection)
        finally:
            await connection.close()
    finally:
        await pool.close()
    return 0
