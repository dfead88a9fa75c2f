"""sntrack up — the whole local stack in the foreground for development: consumers, dashboard, optionally a worker."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys

from common.errors import ConfigurationError
from consumers.persistence import create_pool
from consumers.registry import CONSUMER_NAMES
from sntrack.argtypes import seconds
from sntrack.commands.dashboard import _check_port
from sntrack.settings import Settings
from sntrack.supervisor import Child, Supervisor, child_env

EXAMPLES = """examples:
  sntrack up                                            # every consumer and the dashboard on :8050
  sntrack up --worker "--study demo --n-trials 20"      # and one worker
  sntrack up --consumers journal trials --no-dashboard
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "up", help="run the local stack in the foreground (development)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Start each consumer (`sntrack consume NAME`, one process each), the dashboard and optionally one\n"
        "worker as child processes, and print their output prefixed by name. Ctrl-C or SIGTERM sends SIGTERM to\n"
        "every child, waits for them and exits 0 when each stopped cleanly. A child that exits unasked (a worker\n"
        "that finished its trials excepted) stops the others, and `up` exits 1. For production use the systemd\n"
        "units in infra/systemd/ instead (README, \"Running sntrack as a service\").")
    parser.add_argument("--consumers", nargs="+", choices=CONSUMER_NAMES, metavar="NAME",
                        help=f"consumers to run ({', '.join(CONSUMER_NAMES)}; default: all, mlflow only when "
                        "SNTRACK_MLFLOW_ENABLED)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    parser.add_argument("--dashboard-port", type=int, default=8050, metavar="PORT",
                        help="the dashboard's port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--worker", metavar="ARGS", type=shlex.split,
                        help='also run one `sntrack worker ARGS`, e.g. --worker "--study demo --n-trials 20"')
    parser.add_argument("--stop-timeout", type=seconds, default=60.0, metavar="SECONDS",
                        help="how long a child may take to stop after SIGTERM before it is killed (default: 60)")
    parser.set_defaults(run=_up)


def children(args: argparse.Namespace, settings: Settings) -> list[Child]:
    sntrack = [sys.executable, "-m", "sntrack"]
    names = args.consumers or [n for n in CONSUMER_NAMES if n != "mlflow" or settings.mlflow_enabled]
    found = [Child(name, [*sntrack, "consume", name]) for name in dict.fromkeys(names)]
    if not args.no_dashboard:
        found.append(Child("dashboard", [*sntrack, "dashboard", "--port", str(args.dashboard_port)]))
    if args.worker is not None:
        if not any(a == "--study" or a.startswith("--study=") for a in args.worker):
            raise ConfigurationError('--worker needs --study among its arguments, e.g. --worker "--study demo"')
        found.append(Child("worker", [*sntrack, "worker", *args.worker], may_finish=True))
    return found


async def _up(args: argparse.Namespace, settings: Settings) -> int:
    found = children(args, settings)
    if not args.no_dashboard:
        _check_port("127.0.0.1", args.dashboard_port)
    await (await create_pool(settings.database_url, max_size=1)).close()  # a clear error now, not in five children
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await Supervisor(found, sys.stdout, args.stop_timeout, child_env(settings.to_env())).run(stop)
