"""sntrack dlq list|show|requeue|purge [QUEUE] — the dead letters: why each died, send them back, or drop them."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from urllib.parse import quote

import aio_pika

from common.amqp import amqp_refusal
from common.errors import ConfigurationError
from common.urls import redact
from consumers import dead_letters as dl
from consumers.broker_admin import UNROUTED, ManagementApi
from consumers.lag import consumer_queues
from consumers.registry import QUEUES
from sntrack.settings import Settings

DEFAULT_SHOWN = 20


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1: {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "dlq", help="dead letters: list, show, requeue or purge them",
        description="Dead letters wait in <queue>.dlq for each consumer queue (sntrack.journal.dlq, ...), in "
        "sntrack.sub.NAME.dlq for each subscriber, and in ml.events.unrouted (events no queue was bound for). QUEUE "
        "is a consumer name (trials), its queue or its dead-letter queue; without it, every dead-letter queue. "
        "Reading leaves the messages in place.",
        epilog="example:\n  sntrack dlq list trials --reason handler_error")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "list": ("one line per dead letter: its place, reason, event type, event id and detail",
                 f"List dead letters (at most --limit per queue, default {DEFAULT_SHOWN}) with the reason the "
                 "runtime gave (x-sntrack-reason) or the broker's (x-death: delivery_limit, maxlen), and the detail."),
        "show": ("each dead letter in full: reason, detail, x-death, requeues, ids and body",
                 f"Print each selected dead letter in full (at most --limit per queue, default {DEFAULT_SHOWN})."),
        "requeue": ("send dead letters back to the queue they died in, through the consumer's gate again",
                    "Publish each selected dead letter back to the queue it died in (ml.events.unrouted: to "
                    "ml.events with its routing key), confirmed, and only then remove it from the dead-letter queue. "
                    "A message whose cause was fixed is applied; one still bad comes back with its reason. A requeue "
                    "cut half-way loses nothing: what was not confirmed stays; a copy confirmed but not yet removed "
                    "is delivered twice, and consumers apply an event id once. Needs write access to the default "
                    "exchange (an administrator's SNTRACK_AMQP_URL)."),
        "purge": ("delete dead letters for good, after confirmation",
                  "Count the selected dead letters, ask for confirmation on the terminal (unless --yes), and delete "
                  "exactly those counted."),
    }
    for action, (short, description) in helps.items():
        each = actions.add_parser(action, help=short, description=description,
                                  epilog=f"example:\n  sntrack dlq {action} trials --reason invalid_json")
        each.add_argument("queue", nargs="?", metavar="QUEUE", help="consumer, queue or dead-letter queue "
                          "(default: all)")
        each.add_argument("--reason", metavar="R", help="only dead letters with this reason (e.g. handler_error)")
        each.add_argument("--id", action="append", metavar="ID", dest="ids",
                          help="only this event id or message id (repeatable)")
        each.add_argument("--limit", type=_positive, metavar="N",
                          help=f"at most N per queue (default {DEFAULT_SHOWN} for list and show, all otherwise)")
        if action == "purge":
            each.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        each.set_defaults(run=_ACTIONS[action])


@contextlib.asynccontextmanager
async def _connection(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10,
                                            client_properties={"connection_name": "sntrack-dlq"})
    except Exception as exc:
        if refusal := amqp_refusal(exc, settings.amqp_url):
            raise ConfigurationError(refusal) from None
        raise ConfigurationError(f"cannot reach RabbitMQ at {redact(settings.amqp_url)} "
                                 f"({exc or type(exc).__name__})") from None
    try:
        yield connection
    except Exception as exc:
        # aiormq fails a write cut short by the lost socket with a bare Exception: the closed connection says why.
        lost = (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, OSError, TimeoutError)
        if not isinstance(exc, lost) and not connection.is_closed:
            raise
        raise ConfigurationError(f"lost the connection to RabbitMQ ({exc or type(exc).__name__}); dead letters not "
                                 "yet acted on are still where they were") from None
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


def _every_dlq(settings: Settings) -> list[str]:
    """Consumer queues' dead-letter queues, subscribers' (from the management API), and ml.events.unrouted."""
    listed = ManagementApi(settings.rabbitmq_admin_url).request(
        "GET", f"queues/{quote(settings.amqp_vhost, safe='')}?columns=name") or []
    subscribers = sorted(q["name"] for q in listed
                         if q["name"].startswith("sntrack.sub.") and q["name"].endswith(dl.DLQ_SUFFIX))
    return [spec.dead_letter_queue for spec in QUEUES] + subscribers + [UNROUTED]


def _queues(args: argparse.Namespace, settings: Settings) -> list[str]:
    if not args.queue:
        return _every_dlq(settings)
    return [dl.dead_letter_queue(args.queue, {name: spec.name for name, spec in consumer_queues()})]


def _selection(args: argparse.Namespace, default_limit: int | None) -> dl.Selection:
    return dl.Selection(args.reason, frozenset(args.ids or ()), args.limit or default_limit)


def _line(info: dl.DeadLetterInfo) -> str:
    detail = (info.detail or "").replace("\n", " ")
    return (f"  {info.index:>5}  {info.reason or '?':22} {info.event_type or info.routing_key or '?':14} "
            f"{info.key:36}  {detail[:100]}")


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    selection = _selection(args, DEFAULT_SHOWN)
    shown = 0
    async with _connection(settings) as connection:
        for queue in _queues(args, settings):
            available = await dl.depth(connection, queue)
            if available is None or (available == 0 and not args.queue):
                if args.queue:
                    raise ConfigurationError(f"no dead-letter queue {queue} in this vhost")
                continue
            shown += 1
            infos = await dl.peek(connection, queue, selection)
            print(f"{queue}: {available} dead letters" + (f", {len(infos)} shown" if len(infos) < available else ""))
            for info in infos:
                print(_line(info))
    if not shown:
        print("no dead letters")
    return 0


def _body(info: dl.DeadLetterInfo) -> str:
    try:
        return json.dumps(json.loads(info.body), indent=2, sort_keys=True)[:4000]
    except (ValueError, UnicodeDecodeError, RecursionError):
        return repr(info.body[:1000]) + (f" … ({len(info.body)} bytes)" if len(info.body) > 1000 else "")


def _describe(info: dl.DeadLetterInfo) -> list[str]:
    lines = [f"{info.queue} #{info.index}",
             f"  reason:      {info.reason or '?'}" + (f" (consumer {info.consumer})" if info.consumer else ""),
             f"  detail:      {info.detail or '-'}"]
    lines += [f"  x-death:     {d.reason} from {d.queue}, {d.count} time(s), first at {d.time}"
              + (f", routing key {', '.join(d.routing_keys)}" if d.routing_keys else "") for d in info.deaths]
    if info.requeued:
        lines.append(f"  requeued:    {info.requeued} time(s), last with reason {info.previous_reason or '?'}")
    lines += [f"  event:       {info.event_id or '-'} ({info.event_type or '?'})",
              f"  message id:  {info.message_id or '-'}   routing key: {info.routing_key or '-'}   "
              f"reads: {info.delivery_count}",
              "  body:", *("    " + line for line in _body(info).splitlines())]
    return lines


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    selection = _selection(args, DEFAULT_SHOWN)
    async with _connection(settings) as connection:
        for queue in _queues(args, settings):
            if not args.queue and not await dl.depth(connection, queue):
                continue
            for info in await dl.peek(connection, queue, selection):
                print("\n".join(_describe(info)))
    return 0


async def _requeue(args: argparse.Namespace, settings: Settings) -> int:
    selection = _selection(args, None)
    failed = False
    async with _connection(settings) as connection:
        for queue in _queues(args, settings):
            if not args.queue and not await dl.depth(connection, queue):
                continue
            result = await dl.requeue(connection, queue, selection)
            print(f"{queue}: requeued {len(result.requeued)} to {result.target}")
            if result.error:
                print(f"sntrack: {result.error}; the dead letters not requeued are still in {queue}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


def _ask(counts: dict[str, int]) -> bool:
    listed = ", ".join(f"{n} from {queue}" for queue, n in counts.items())
    print(f"delete {sum(counts.values())} dead letters for good ({listed})? [y/N] ", end="", file=sys.stderr,
          flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    selection = _selection(args, None)
    async with _connection(settings) as connection:
        queues = [q for q in _queues(args, settings) if args.queue or await dl.depth(connection, q)]
        purged = await dl.purge(connection, queues, selection, (lambda _: True) if args.yes else _ask)
    if purged is None:
        print("purge cancelled: nothing deleted", file=sys.stderr)
        return 1
    if not purged:
        print("no dead letters to purge")
    for queue, n in purged.items():
        print(f"{queue}: purged {n}")
    return 0


_ACTIONS = {"list": _list, "show": _show, "requeue": _requeue, "purge": _purge}
