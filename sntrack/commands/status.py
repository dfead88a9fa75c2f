"""sntrack status — what the journal and read model hold, and how far behind each queue is."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import quote

from common.errors import ConfigurationError
from common.urls import login_name
from consumers import lag
from consumers.broker_admin import UNROUTED, ManagementApi, user_tags
from consumers.persistence import create_pool
from consumers.plugins import plugin_line, plugin_status
from consumers.registry import PLUGINS, QUEUES
from consumers.roles import is_superuser
from sntrack.argtypes import seconds
from sntrack.health import check_amqp_login, warnings
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="journal, read model and queue depths at a glance",
                            description="Counts of journal events, trials by status, and each consumer queue's "
                            "ready/unacked messages, lag (journal events after the newest one the consumer applied) "
                            "and dead letters, and ml.events.unrouted (events no queue was bound for).")
    parser.add_argument("--wait-idle", type=seconds, metavar="SECONDS",
                        help="first wait (up to SECONDS) until every consumer queue is empty: consumers caught up")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (default) or one JSON document with the same figures, for scripts")
    parser.set_defaults(run=_status)


async def _wait_idle(api: ManagementApi, vhost: str, timeout_s: float) -> bool:
    """True once every consumer queue has shown no ready or unacked message for six polls in a row."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        depths = [(await asyncio.to_thread(api.request, "GET", f"queues/{vhost}/{quote(s.name, safe='')}") or {})
                  .get("messages", 1) for s in QUEUES]
        quiet = quiet + 1 if not any(depths) else 0
        if quiet >= 6:  # the management API refreshes queue figures every 5 s
            return True
        await asyncio.sleep(1.0)
    return False


def administrator_warnings(settings: Settings, api: ManagementApi) -> list[str]:
    """A line for each daemon broker URL (SNTRACK_AMQP_URL, SNTRACK_GATEWAY_AMQP_URL) whose user is an administrator:
    a daemon needs only its role's permissions (tests/test_status.py)."""
    out = []
    for variable, url in (("SNTRACK_AMQP_URL", settings.amqp_url),
                          ("SNTRACK_GATEWAY_AMQP_URL", settings.gateway_amqp_url)):
        if url is None:
            continue
        user = login_name(url) or "guest"  # the AMQP default
        try:
            info = api.request("GET", f"users/{quote(user, safe='')}") or {}
        except ConfigurationError:
            out.append(f"note: could not check whether {variable}'s user {user!r} is a broker administrator (the "
                       "management API user of SNTRACK_RABBITMQ_ADMIN_URL may not read users)")
            continue
        if "administrator" in user_tags(info):
            out.append(f"warning: {variable} logs in as {user!r}, a broker administrator; in production each daemon "
                       "logs in as its role's user (sntrack topology apply creates them)")
    return out


def _figure(info: dict, key: str) -> int | None:
    value = info.get(key)
    return value if isinstance(value, int) else None


async def _gather(args: argparse.Namespace, settings: Settings) -> dict:
    """Every figure `status` shows, as the JSON document `--format json` prints."""
    api = ManagementApi(settings.rabbitmq_admin_url)
    vhost = quote(settings.amqp_vhost, safe="")
    await check_amqp_login(settings)
    pool = await create_pool(settings.database_url, max_size=1)  # the daemons' database login, checked first too
    consumers = lag.consumer_queues()
    try:
        caught_up = args.wait_idle is None or await _wait_idle(api, vhost, args.wait_idle)
        async with pool.acquire() as conn:
            events = await conn.fetchval("SELECT count(*) FROM events")
            started = await conn.fetchval("SELECT count(*) FROM events WHERE event_type = 'ml.run.start'")
            trials = await conn.fetch(
                "SELECT spectral_norm, status, count(*) AS n FROM trials GROUP BY 1, 2 ORDER BY 1, 2")
            role, superuser = await is_superuser(conn)
            head = await lag.journal_head(conn)
            lags = await lag.lags(conn, [(name, spec.bindings) for name, spec in consumers])
            plugins = await plugin_status(conn, PLUGINS)
    finally:
        await pool.close()
    queues, consumed = [], {}
    for (name, spec), behind in zip(consumers, lags, strict=True):
        info = api.request("GET", f"queues/{vhost}/{quote(spec.name, safe='')}") or {}
        dead = api.request("GET", f"queues/{vhost}/{quote(spec.dead_letter_queue, safe='')}") or {}
        consumed[spec.name] = info
        queues.append({"consumer": name, "queue": spec.name, "ready": _figure(info, "messages_ready"),
                       "unacked": _figure(info, "messages_unacknowledged"), "consumers": _figure(info, "consumers"),
                       "position": behind.position, "lag_events": behind.events,
                       "dead_letter_queue": spec.dead_letter_queue, "dead_letters": _figure(dead, "messages")})
    unrouted = api.request("GET", f"queues/{vhost}/{quote(UNROUTED, safe='')}") or {}
    return {
        "journal": {"events": events, "head_position": head},
        "trials": [{"spectral_norm": r["spectral_norm"], "status": r["status"], "count": r["n"]} for r in trials],
        "plugins": plugins,
        "vhost": settings.amqp_vhost,
        "queues": queues,
        "unrouted": {"queue": UNROUTED, "ready": _figure(unrouted, "messages_ready")},
        "warnings": [*warnings(consumed, started, sum(r["n"] for r in trials), role if superuser else None),
                     *administrator_warnings(settings, api)],
        "caught_up": caught_up,
    }


def _show(value: int | None) -> str:
    return "?" if value is None else str(value)


def _print_table(doc: dict) -> None:
    print(f"journal: {doc['journal']['events']} events")
    print("trials:" if doc["trials"] else "trials: none")
    for row in doc["trials"]:
        print(f"  spectral_norm={str(row['spectral_norm']).lower():5}  {row['status']:9} {row['count']}")
    print("projection plugins:" if doc["plugins"] else "projection plugins: none installed")
    for plugin in doc["plugins"]:
        print(f"  {plugin_line(plugin)}")
    print(f"queues (vhost {doc['vhost']}; lag: journal events after the consumer's position; dlq: dead letters):")
    for q in doc["queues"]:
        print(f"  {q['queue']:28} ready={_show(q['ready']):<7} unacked={_show(q['unacked']):<7} "
              f"consumers={_show(q['consumers']):<3} lag={q['lag_events']:<7} dlq={_show(q['dead_letters'])}")
    print(f"  {UNROUTED:28} ready={_show(doc['unrouted']['ready']):<7} (events no queue was bound for)")
    for line in doc["warnings"]:
        print(line)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    doc = await _gather(args, settings)
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)
    if not doc["caught_up"]:
        print(f"consumers did not catch up within {args.wait_idle:.0f} s", file=sys.stderr)
        return 1
    return 0
