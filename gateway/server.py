"""Running the gateway: its resources (token pool, broker channel) and uvicorn, in the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import asyncpg
import uvicorn

from gateway.app import create_app
from gateway.broker import ConfirmingPublisher
from gateway.config import GatewayConfig
from gateway.tokens import TokenVerifier


def _server(config: GatewayConfig, pool: asyncpg.Pool, publisher: ConfirmingPublisher,
            host: str, port: int) -> uvicorn.Server:
    app = create_app(config, TokenVerifier(pool, config.token_cache_s), publisher)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                         lifespan="off", server_header=False))


async def serve(config: GatewayConfig, pool: asyncpg.Pool, listening: socket.socket) -> None:
    """Serve on the listening socket until SIGINT/SIGTERM (uvicorn's handlers), then close the broker connection."""
    publisher = ConfirmingPublisher(config.amqp_url, config.confirm_timeout_s)
    await publisher.check()  # connect now when the broker is there; requests retry otherwise
    host, port = listening.getsockname()[:2]
    try:
        await _server(config, pool, publisher, host, port).serve(sockets=[listening])
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A gateway served in this event loop on a free port, for tests and benchmarks; yields its base URL."""
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=2)
    publisher = ConfirmingPublisher(config.amqp_url, config.confirm_timeout_s)
    listening = socket.create_server((host, 0))
    port = listening.getsockname()[1]
    server = _server(config, pool, publisher, host, port)
    task = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        await publisher.close()
        await pool.close()
        listening.close()
