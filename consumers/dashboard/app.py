"""The ASGI app: the server-rendered page, the Server-Sent Events stream, a trial's curve, static files."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from consumers.dashboard import queries
from consumers.dashboard.hub import READ_ONLY, Hub, Queues
from consumers.dashboard.page import render_page

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0  # an SSE comment this often, so a vanished browser is noticed
COOKIE = "sntrack_dashboard_token"


@dataclass(frozen=True)
class DashboardConfig:
    database_url: str
    mlflow_url: str | None = None
    token: str | None = None
    queues: Queues | None = None  # RabbitMQ queue depths (consumer lag, dead letters), when the broker is known


async def report_json(conn: asyncpg.Connection) -> dict:
    """The comparison report of every search, exactly as `sntrack report --format json` prints it."""
    from consumers.report.render import render_json
    from consumers.report.report import build_report
    from consumers.report.snapshot import load

    data = await load(conn)
    return json.loads(render_json(await asyncio.to_thread(build_report, data)))


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class TokenGate:
    """With a token configured, every request needs it: `?token=` (then kept in a cookie), the cookie, or
    `Authorization: Bearer`."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if self.token is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        offered = (request.query_params.get("token") or request.cookies.get(COOKIE)
                   or request.headers.get("authorization", "").removeprefix("Bearer "))
        if not hmac.compare_digest(offered.encode(), self.token.encode()):
            return await PlainTextResponse("a token is required: open the page with ?token=...", 401)(
                scope, receive, send)

        async def with_cookie(message):
            if message["type"] == "http.response.start" and "token" in request.query_params:
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
            await send(message)

        return await self.app(scope, receive, with_cookie)


def create_app(config: DashboardConfig) -> TokenGate:
    state: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4, server_settings=READ_ONLY)
        hub = Hub(pool, config.database_url, report_json, config.queues)
        await hub.start()
        state["hub"], state["pool"] = hub, pool
        try:
            yield
        finally:
            await hub.close()
            await pool.close()

    async def page(request: Request) -> Response:
        hub: Hub = state["hub"]
        filters = {k: request.query_params.get(k, "") for k in ("study", "dataset", "status")}
        rows = await hub.read_trials(None)
        return HTMLResponse(render_page(rows, hub.verdict, hub.queues, filters, config.mlflow_url))

    async def events(request: Request) -> Response:
        hub: Hub = state["hub"]

        async def stream() -> AsyncIterator[str]:
            async with hub.subscribe() as (client, snapshot):
                yield "retry: 1000\n" + sse("snapshot", {"trials": snapshot, "verdict": hub.verdict,
                                                         "queues": hub.queues, "mlflow_url": config.mlflow_url})
                while True:
                    try:
                        await asyncio.wait_for(client.wake.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if hub.closing:
                        return
                    trials, verdict, queues, reset = client.take()
                    if reset:
                        yield sse("snapshot", {"trials": await hub.snapshot(client), "verdict": hub.verdict,
                                               "queues": hub.queues, "mlflow_url": config.mlflow_url})
                    elif trials:
                        yield sse("trials", trials)
                    if verdict is not None:
                        yield sse("verdict", verdict)
                    if queues is not None:
                        yield sse("queues", queues)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def curve(request: Request) -> Response:
        trial_id = request.path_params["trial_id"]
        pool: asyncpg.Pool = state["pool"]
        async with pool.acquire() as conn:
            flag = await conn.fetchval(queries.TRIAL_EXISTS, trial_id)
            rows = await conn.fetch(queries.CURVE, trial_id)
        if flag is None:
            return JSONResponse({"error": f"unknown trial {trial_id}"}, 404)
        return JSONResponse({"trial_id": trial_id, "spectral_norm": flag, "epochs": [
            {**dict(r), "spectral_norms": json.loads(r["spectral_norms"]) if r["spectral_norms"] else None}
            for r in rows]})

    app = Starlette(lifespan=lifespan, routes=[
        Route("/", page), Route("/events", events), Route("/api/trials/{trial_id:path}/curve", curve),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    gate = TokenGate(app, config.token)
    gate.end_streams = lambda: state["hub"].end_streams() if "hub" in state else None
    return gate


def make_server(config: DashboardConfig, host: str, port: int):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.end_streams()  # open event streams end now, so shutdown does not wait for them
            await super().shutdown(sockets)

    app = create_app(config)
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                                 lifespan="on"))


@contextlib.asynccontextmanager
async def running_dashboard(config: DashboardConfig, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the dashboard in this event loop (tests, benchmarks); yields its base URL, stops on exit."""
    server = make_server(config, host, port)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the dashboard stopped while starting")
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/"
    finally:
        server.should_exit = True
        await task
