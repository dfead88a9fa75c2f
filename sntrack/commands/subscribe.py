"""sntrack subscribe NAME --bind P… [--from-start | --from TIME] [--handler M:F | --exec CMD | --jsonl FILE|-]:
a catch-up subscriber (consumers/catchup.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from contextlib import AsyncExitStack

import structlog

from common.errors import ConfigurationError
from consumers.attempts import AttemptLedger
from consumers.catchup import LOAD, CatchUpSubscriber, Start, SubscriberRuntime, run_subscriber, sole_copy
from consumers.persistence import create_pool
from consumers.runtime import connect
from consumers.subscriber import EX_TEMPFAIL, ExecSink, JsonLinesSink, check_name, load_handler
from schemas import ROUTING_PATTERN_ALL
from sntrack.argtypes import seconds
from sntrack.commands.replay import _timestamp
from sntrack.settings import Settings

log = structlog.get_logger("sntrack.subscribe")

EXAMPLES = """examples:
  sntrack subscribe stops --bind ml.run.stop --from-start                 # history, then live, as JSON lines
  sntrack subscribe best --bind ml.run.stop --from-start --handler examples.best_trial_per_arm:handle
  sntrack subscribe failed --bind ml.run.stop --exec 'jq -e ".payload.status != \\"failed\\"" >/dev/null'
  sntrack subscribe archive --bind 'ml.run.#' --from 2026-11-25T00:00:00Z --jsonl events.jsonl
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "subscribe", help="an extra subscriber: the journal's history, then live events",
        description="Declare the durable quorum queue sntrack.sub.NAME bound to ml.events with the patterns, then "
        "deliver the matching events from the journal (table events) in order, then from the queue, with no gap "
        "and no duplicate at the switch. Its position is stored (table subscriber_positions, migration 007): "
        "run again, it resumes where it stopped. Delivery is AT LEAST ONCE: after a crash the events in hand come "
        "again, so deduplicate by event_id. A handler that fails is tried 3 times in all, then the event goes to "
        "sntrack.sub.NAME.dlq (reason handler_error); a handler raising consumers.handler.RetryLater, or an "
        f"--exec command exiting {EX_TEMPFAIL} (EX_TEMPFAIL), is retried without limit. The queue keeps "
        "collecting while the subscriber is stopped, up to 1,000,000 messages or 1 GiB; beyond that its oldest "
        "are dropped (x-death reason maxlen) and the subscriber fills that gap from the journal. A catch-up "
        "(and every restart) needs `sntrack consume journal` running.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="subscriber name (a-z, 0-9, _ and -)")
    parser.add_argument("--bind", "--pattern", dest="bind", action="extend", nargs="+", metavar="PATTERN",
                        help=f"routing patterns (topic syntax; default: the stored ones, else {ROUTING_PATTERN_ALL})")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from-start", action="store_true",
                       help="a new subscriber begins with the whole journal (default: with events from now on)")
    start.add_argument("--from", dest="since", type=_timestamp, metavar="TIME",
                       help="a new subscriber begins at the first journal event that occurred at or after TIME "
                       "(ISO 8601; UTC without an offset). Both are ignored once a position is stored")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--handler", metavar="MODULE:FUNCTION",
                        help="call FUNCTION(event) with each schemas.Event (sync or async) from the current folder "
                        "or the installed packages")
    output.add_argument("--exec", dest="command", metavar="CMD",
                        help="run CMD (by the shell) for each event with its JSON on stdin; exit 0 = delivered")
    output.add_argument("--jsonl", metavar="FILE|-",
                        help="append each event as a JSON line to FILE (- = stdout, the default), flushed before "
                        "the event counts as delivered")
    parser.add_argument("--journal-wait", type=seconds, default=30.0, metavar="SECONDS",
                        help="after a catch-up, how long the first live event may take to reach the journal "
                        "before the subscriber exits 2, acking nothing (default: 30)")
    parser.set_defaults(run=_subscribe)


def _sink(args: argparse.Namespace, files: AsyncExitStack):
    if args.handler:
        return load_handler(args.handler)
    if args.command:
        return ExecSink(args.command)
    if args.jsonl and args.jsonl != "-":
        try:
            return JsonLinesSink(files.enter_context(open(args.jsonl, "a", encoding="utf-8")))  # noqa: SIM115
        except OSError as exc:
            raise ConfigurationError(f"--jsonl {args.jsonl}: {exc.strerror}") from None
    if sys.stdout is None:  # started with its standard output closed (`>&-`): nothing could be delivered
        raise ConfigurationError("the standard output is closed: give --jsonl FILE, --exec CMD or --handler")
    return JsonLinesSink(sys.stdout)


async def _subscribe(args: argparse.Namespace, settings: Settings) -> int:
    try:
        check_name(args.name)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    pool = await create_pool(settings.database_url, max_size=4)  # one holds the name (sole_copy)
    try:
        async with sole_copy(pool, args.name), AsyncExitStack() as files:
            try:
                stored = await pool.fetchrow(LOAD, args.name)
                bindings = args.bind or (stored and stored["bindings"]) or [ROUTING_PATTERN_ALL]
                sink = _sink(args, files)
                subscriber = CatchUpSubscriber(args.name, bindings, sink, pool, journal_wait_s=args.journal_wait)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            await subscriber.load(Start(from_start=args.from_start, since=args.since))
            connection = await connect(settings.consumer())
            try:
                runtime = SubscriberRuntime(subscriber, settings.consumer(), AttemptLedger(pool, subscriber.name))
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, subscriber.stop)
                if isinstance(sink, JsonLinesSink):
                    sink.on_closed = subscriber.stop
                await run_subscriber(subscriber, runtime, connection)
            finally:
                await connection.close()
    finally:
        await pool.close()
    if isinstance(sink, JsonLinesSink) and sink.closed:
        log.info("the output was closed: stopped; what was not written stays for the next run")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no BrokenPipeError again at exit
    return 0
