"""sntrack spool status|flush — what the local publisher spool holds, and delivering it now."""

from __future__ import annotations

import argparse
import sys

from common.urls import redact
from producer.publisher import EventPublisher
from producer.spool import REJECTED_DIR, inspect
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "spool", help="the publisher's local spool of undelivered events",
        description="Events a worker could not deliver (broker unreachable) wait in JSON-lines segments under "
        "SNTRACK_SPOOL_DIR. Segments held by a running publisher are its own to deliver; orphaned ones (their "
        "process is gone) are delivered by the next publisher that starts, or by `spool flush`. Events the broker "
        "returned as unroutable are quarantined, with the reason, in rejected/ under the spool dir. "
        "Example: sntrack spool status")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="list spooled segments and event counts",
                                description="List the spool's segments: events, bytes, live or orphaned.")
    status.set_defaults(run=_status)
    flush = actions.add_parser("flush", help="deliver orphaned spooled events to the broker now",
                               description="Adopt the orphaned segments and publish them in order with confirms, "
                               "deleting each once confirmed. Exits 1 when the broker did not take them in time.")
    flush.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="give up after this long (default 60)")
    flush.set_defaults(run=_flush)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    segments = inspect(settings.spool_dir)
    quarantine = settings.spool_dir / REJECTED_DIR
    rejected = sum(path.read_bytes().count(b"\n") for path in quarantine.glob("*.jsonl"))
    if rejected:
        print(f"quarantined: {rejected} unroutable events in {quarantine} (each line has the broker's reason)")
    if not segments:
        print(f"spool {settings.spool_dir}: empty")
        return 0
    print(f"spool {settings.spool_dir}:")
    for segment in segments:
        state = "live (a running publisher holds it)" if segment.live else "orphaned"
        print(f"  {segment.path.name}  {segment.events:>8} events  {segment.bytes:>11,} bytes  {state}")
    orphaned = sum(s.events for s in segments if not s.live)
    print(f"total: {sum(s.events for s in segments)} events in {len(segments)} segments ({orphaned} orphaned)")
    return 0


def _flush(args: argparse.Namespace, settings: Settings) -> int:
    orphaned = [s for s in inspect(settings.spool_dir) if not s.live]
    if not orphaned:
        print(f"spool {settings.spool_dir}: no orphaned segments to deliver")
        return 0
    publisher = EventPublisher(settings.publisher()).start()
    drained = publisher.drain(args.timeout)
    publisher.close(timeout=0)
    print(f"delivered {publisher.stats.flushed_from_spool} spooled events")
    if not drained:
        left = sum(s.events for s in inspect(settings.spool_dir) if not s.live)
        print(f"sntrack: the broker at {redact(settings.amqp_url)} did not take the spool within {args.timeout:g}s; "
              f"{left} events remain spooled", file=sys.stderr)
        return 1
    return 0
