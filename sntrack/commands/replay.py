"""sntrack replay NAME [--until TIME [--into SCHEMA]] — rebuild a projection from the journal."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime

from common.errors import ConfigurationError
from consumers.plugins import require_migrated
from consumers.registry import PROJECTIONS
from consumers.replay import ReplayAborted, default_schema, replay
from sntrack.pools import admin_pool
from sntrack.progress import Progress
from sntrack.settings import Settings

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
RESERVED = re.compile(r"public|information_schema|pg_.*|sntrack_.*")

EXAMPLES = """examples:
  sntrack replay trials                                   # rebuild beside the live consumers, swap in
  sntrack replay trials --until 2026-11-25T12:00:00Z      # state at noon into schema asof_20261125_120000
  sntrack report --schema asof_20261125_120000              # the report as it was then
  psql -c 'SELECT status, count(*) FROM asof_20261125_120000.trials GROUP BY 1'
"""


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25T12:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def register(sub: argparse._SubParsersAction) -> None:
    replayable = [n for n, p in PROJECTIONS.items() if p.replayable]
    parser = sub.add_parser(
        "replay", help="rebuild a projection from the journal",
        description="Rebuild a projection from the events journal, in journal order, with the same code the live "
        "consumer runs, into shadow tables; then swap them in within one short transaction. Safe beside the live "
        "consumers: nothing they applied is lost, readers wait only for the swap (docs/replay.md). With --until, "
        "the state as of that time is written into another schema and the live tables are not touched.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=replayable, help="projection to rebuild (installed plugins included)")
    parser.add_argument("--until", type=_timestamp, metavar="TIME",
                        help="only events that occurred at or before TIME (ISO 8601; UTC when no offset), "
                        "written into another schema")
    parser.add_argument("--into", metavar="SCHEMA",
                        help="schema for --until (default asof_YYYYMMDD_HHMMSS of TIME in UTC); must not exist")
    parser.add_argument("--journal-wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long the swap waits for the journal to hold every event the live projection "
                        "applied before giving up (default: 30)")
    parser.set_defaults(run=_replay)


def _target(args: argparse.Namespace) -> str | None:
    if args.until is None:
        if args.into is not None:
            raise ConfigurationError("--into needs --until: a full rebuild replaces the live tables")
        return None
    into = args.into or default_schema(args.until)
    if not SCHEMA_NAME.fullmatch(into) or RESERVED.fullmatch(into):
        raise ConfigurationError(f"--into {into!r} is not a schema name to write to (lower case letters, digits, "
                                 "_; not public, pg_* or sntrack_*)")
    return into


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    projection = PROJECTIONS[args.name]
    into = _target(args)
    await require_migrated(settings.database_url, [projection])
    pool = await admin_pool(settings, min_size=2, max_size=2)
    try:
        with Progress(f"replay {args.name}", unit="events") as progress:
            result = await replay(pool, projection, until=args.until, into=into, journal_wait_s=args.journal_wait,
                                  progress=progress.update)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    except ReplayAborted as exc:
        print(f"replay {args.name} aborted: {exc}", file=sys.stderr)
        return 1
    finally:
        await pool.close()
    where = (f"swapped in (locks held {result.swap_seconds * 1000:.0f} ms)" if into is None
             else f"written to schema {into}, live tables untouched")
    how = "set-based" if result.set_based else "event by event"
    print(f"replayed {result.events} events into {args.name} ({how}) in {result.seconds:.2f}s "
          f"({result.events_per_s:,.0f} events/s); {where}", file=sys.stderr)
    return 0
