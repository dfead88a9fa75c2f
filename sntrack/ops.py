"""The --metrics-port flag of the daemons (`consume`, `worker`) and the /healthz + /metrics server it starts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Coroutine

from prometheus_client import CollectorRegistry

from common.ops_http import Health, OpsServer
from sntrack.settings import Settings

LOOP_TIMEOUT_S = 5.0


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (0: off): {text!r}")
    return int(text)


def add_metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=port, metavar="PORT",
                        help="serve GET /healthz (200 ready, 503 not) and Prometheus GET /metrics on this port, on "
                        "SNTRACK_METRICS_HOST (default 127.0.0.1); 0 turns them off (default: SNTRACK_METRICS_PORT, "
                        "else 0). Give each daemon on a machine its own port.")


def ops_server(args: argparse.Namespace, settings: Settings, registry: CollectorRegistry, health: Health,
               refresh: Callable[[], None] | None = None) -> contextlib.AbstractContextManager:
    """The server for --metrics-port (or SNTRACK_METRICS_PORT), started by `with`; nothing when the port is 0."""
    chosen = settings.metrics_port if args.metrics_port is None else args.metrics_port
    if not chosen:
        return contextlib.nullcontext()
    return OpsServer(settings.metrics_host, chosen, registry, health, refresh)


def on_loop(make: Callable[[], Coroutine], loop: asyncio.AbstractEventLoop) -> Callable:
    """A function for the server's thread that runs `make()` on the daemon's event loop and returns its result,
    cancelled after LOOP_TIMEOUT_S (a broker away must not pile up waiting checks)."""
    def run():
        future = asyncio.run_coroutine_threadsafe(make(), loop)
        try:
            return future.result(timeout=LOOP_TIMEOUT_S)
        finally:
            future.cancel()
    return run
