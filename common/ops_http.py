"""`/healthz` and Prometheus `/metrics` for a daemon (`sntrack consume`, `sntrack worker`), served from a thread.

A thread, not the daemon's event loop: the worker is a synchronous training process, and a thread keeps answering
while a consumer's loop is busy; the consumer daemon hands its checks to its loop (run_coroutine_threadsafe).
wsgiref plus prometheus_client's WSGI app: no other server to depend on for two small endpoints.

- GET /healthz: 200 and `{"ready": true, ...}` while every check passes, else 503 with the failing ones false;
- GET /metrics: `refresh()` updates the sampled gauges (queue depths, lag), then the registry in text format.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from common.errors import ConfigurationError

log = structlog.get_logger("sntrack.ops")

Health = Callable[[], dict[str, bool]]  # named checks: broker, database, ...; ready when all are true


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class OpsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health,
                 refresh: Callable[[], None] | None = None):
        self.host, self.port = host, port
        self.health = health
        self.refresh = refresh
        self._metrics = make_wsgi_app(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def checks(self) -> dict[str, bool]:
        try:
            checks = dict(self.health())
        except Exception as exc:  # noqa: BLE001 - a failing check means not ready, never a dead endpoint
            log.warning("health check failed", error=repr(exc))
            checks = {"checks": False}
        return {"ready": bool(checks) and all(checks.values()), **checks}

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            checks = self.checks()
            start_response("200 OK" if checks["ready"] else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(checks).encode()]
        if path == "/metrics":
            if self.refresh is not None:
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - sampled gauges keep their last values
                    log.warning("could not refresh the sampled metrics", error=repr(exc))
            return self._metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    def start(self) -> OpsServer:
        try:
            self._server = make_server(self.host, self.port, self._app, server_class=_Server,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ConfigurationError(f"cannot serve /healthz and /metrics on {self.host}:{self.port} ({why}); choose "
                                     "another --metrics-port, or 0 to turn them off") from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="sntrack-ops-http", daemon=True)
        self._thread.start()
        log.info("serving /healthz and /metrics", host=self.host, port=self.port)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
