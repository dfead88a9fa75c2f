"""sntrack replay NAME [--until TIME] — rebuild a projection from the journal."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from consumers.persistence import create_pool
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from sntrack.progress import Progress
from sntrack.settings import ConfigurationError, Settings


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
        description="Drop a projection's rows and rebuild them from the events journal, in journal order, "
        "with the same code the live consumer runs. Atomic: readers see the old rows until it commits.")
    parser.add_argument("name", choices=replayable, help="projection to rebuild")
    parser.add_argument("--until", type=_timestamp, metavar="TIME",
                        help="only events that occurred at or before TIME (ISO 8601; UTC when no offset)")
    parser.set_defaults(run=_replay)


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    projection = PROJECTIONS[args.name]
    pool = await create_pool(settings.database_url, min_size=2, max_size=2)
    try:
        with Progress(f"replay {args.name}", unit="events") as progress:
            result = await replay(pool, projection, until=args.until, progress=progress.update)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    finally:
        await pool.close()
    print(f"replayed {result.events} events into {args.name} in {result.seconds:.2f}s "
          f"({result.events_per_s:,.0f} events/s)", file=sys.stderr)
    return 0
