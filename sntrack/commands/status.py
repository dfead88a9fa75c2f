"""sntrack status — what the journal and read model hold, and how far behind each queue is."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import quote

from common.errors import ConfigurationError
from common.urls import login_name
from consumers.broker_admin import UNROUTED, ManagementApi, user_tags
from consumers.persistence import create_pool
from consumers.registry import QUEUES
from consumers.roles import is_superuser
from sntrack.argtypes import seconds
from sntrack.health import check_amqp_login, warnings
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="journal, read model and queue depths at a glance",
                            description="Counts of journal events, trials by status, and each consumer queue's "
                            "ready/unacked messages and dead letters, and ml.events.unrouted (events no queue was "
                            "bound for).")
    parser.add_argument("--wait-idle", type=seconds, metavar="SECONDS",
                        help="first wait (up to SECONDS) until every consumer queue is empty: consumers caught up")
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


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    api = ManagementApi(settings.rabbitmq_admin_url)
    vhost = quote(settings.amqp_vhost, safe="")
    await check_amqp_login(settings)
    pool = await create_pool(settings.database_url, max_size=1)  # the daemons' database login, checked first too
    try:
        caught_up = args.wait_idle is None or await _wait_idle(api, vhost, args.wait_idle)
        async with pool.acquire() as conn:
            events = await conn.fetchval("SELECT count(*) FROM events")
            started = await conn.fetchval("SELECT count(*) FROM events WHERE event_type = 'ml.run.start'")
            trials = await conn.fetch(
                "SELECT spectral_norm, status, count(*) AS n FROM trials GROUP BY 1, 2 ORDER BY 1, 2")
            role, superuser = await is_superuser(conn)
    finally:
        await pool.close()
    print(f"journal: {events} events")
    print("trials:" if trials else "trials: none")
    for row in trials:
        print(f"  spectral_norm={str(row['spectral_norm']).lower():5}  {row['status']:9} {row['n']}")
    print(f"queues (vhost {settings.amqp_vhost}):")
    consumed = {}
    for spec in QUEUES:
        for name in (spec.name, spec.dead_letter_queue):
            info = api.request("GET", f"queues/{vhost}/{quote(name, safe='')}") or {}
            if name == spec.name:
                consumed[name] = info
            print(f"  {name:28} ready={info.get('messages_ready', '?'):<7} "
                  f"unacked={info.get('messages_unacknowledged', '?'):<7} consumers={info.get('consumers', '?')}")
    unrouted = api.request("GET", f"queues/{vhost}/{quote(UNROUTED, safe='')}") or {}
    print(f"  {UNROUTED:28} ready={unrouted.get('messages_ready', '?'):<7} (events no queue was bound for)")
    for line in [*warnings(consumed, started, sum(r["n"] for r in trials), role if superuser else None),
                 *administrator_warnings(settings, api)]:
        print(line)
    if not caught_up:
        print(f"consumers did not catch up within {args.wait_idle:.0f} s", file=sys.stderr)
        return 1
    return 0
