"""sntrack dashboard — the live page: verdict, trials by constraint, learning curves, recent activity."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from urllib.parse import quote

from common.errors import ConfigurationError
from common.urls import redact
from consumers.broker_admin import ManagementApi
from consumers.persistence import create_pool
from sntrack.settings import Settings

EXAMPLES = """examples:
  sntrack dashboard                      # http://127.0.0.1:8050/
  SNTRACK_DASHBOARD_DATABASE_URL=postgresql://sntrack_reader@127.0.0.1/sntrack sntrack dashboard
  SNTRACK_DASHBOARD_TOKEN=s3cret sntrack dashboard --host 0.0.0.0   # then open /?token=s3cret
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "dashboard", help="the live web page: verdict, trials by constraint, curves, activity",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Serve the dashboard (Starlette under uvicorn). Updates are pushed with Server-Sent Events after\n"
        "the projections commit (PostgreSQL LISTEN/NOTIFY). It reads with SNTRACK_DASHBOARD_DATABASE_URL (a\n"
        "read-only role; default SNTRACK_DATABASE_URL) in read-only transactions, and never writes. With\n"
        "SNTRACK_DASHBOARD_TOKEN set, every request needs the token. See docs/dashboard.md.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8050, help="port (default: %(default)s)")
    parser.set_defaults(run=_dashboard)


def queue_reader(settings: Settings) -> Callable[[], list[dict]]:
    """The depth and consumers of each sntrack queue of the vhost, from the management API (one request)."""
    api, vhost = ManagementApi(settings.rabbitmq_admin_url), quote(settings.amqp_vhost, safe="")

    def read() -> list[dict]:
        found = api.request("GET", f"queues/{vhost}?columns=name,messages,consumers") or []
        return sorted(({"name": q["name"], "messages": q.get("messages", 0), "consumers": q.get("consumers", 0)}
                       for q in found if q["name"].startswith("sntrack.")), key=lambda q: q["name"])

    return read


def _check_port(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigurationError(f"cannot listen on {host}:{port} ({why}); choose another --port") from None


async def _dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.dashboard.app import DashboardConfig, make_server

    database_url = settings.dashboard_database_url or settings.read_url
    variable = "SNTRACK_DASHBOARD_DATABASE_URL" if settings.dashboard_database_url else "SNTRACK_READ_DATABASE_URL"
    # A clear error now, not a traceback in uvicorn.
    await (await create_pool(database_url, max_size=1, variable=variable)).close()
    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.dashboard_token:
        print(f"sntrack: warning: serving on {args.host} without SNTRACK_DASHBOARD_TOKEN", file=sys.stderr)
    config = DashboardConfig(database_url, settings.mlflow_tracking_uri if settings.mlflow_enabled else None,
                             settings.dashboard_token, queue_reader(settings))
    print(f"dashboard on http://{args.host}:{args.port}/ reading {redact(database_url)}", file=sys.stderr)
    await make_server(config, args.host, args.port).serve()
    return 0
