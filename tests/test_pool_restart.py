"""A daemon started while PostgreSQL restarts waits for it instead of dying with a traceback.

The chaos suite once started `sntrack consume journal` the moment PostgreSQL was shutting down: the new pool got
"the database system is shutting down" (SQLSTATE 57P03), the daemon exited, and the journal stopped. Here a small
TCP front plays the restart in front of the real server: it answers one connection with that error, refuses
connections for a while (nothing listens), then forwards to the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import struct
import time
from urllib.parse import urlsplit

import pytest

from common.errors import ConfigurationError
from consumers.persistence import create_pool
from sntrack.mlflow_server import free_port
from tests.tls import pump


def _error_response(message: str) -> bytes:
    fields = b"".join(code + text.encode() + b"\0" for code, text in (
        (b"S", "FATAL"), (b"V", "FATAL"), (b"C", "57P03"), (b"M", message)))
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


async def _refuse_as_restarting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the client's opening (an SSLRequest, answered "no", then the startup message), answer 57P03."""
    length = struct.unpack("!I", await reader.readexactly(4))[0]
    opening = await reader.readexactly(length - 4)
    if opening[:4] == struct.pack("!I", 80877103):  # SSLRequest
        writer.write(b"N")
        length = struct.unpack("!I", await reader.readexactly(4))[0]
        await reader.readexactly(length - 4)
    writer.write(_error_response("the database system is shutting down"))
    await writer.drain()
    writer.close()


def _forward_to(host: str, port: int):
    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    return forward


async def test_a_pool_waits_for_a_server_that_is_restarting(env):
    real = urlsplit(env.settings.database_url)
    port = free_port()
    front_url = env.settings.database_url.replace(real.netloc.split("@")[-1], f"127.0.0.1:{port}")
    answered = asyncio.Event()

    async def shutting_down(reader, writer):
        await _refuse_as_restarting(reader, writer)
        answered.set()

    front = await asyncio.start_server(shutting_down, "127.0.0.1", port)
    started = time.monotonic()
    pool_task = asyncio.create_task(create_pool(front_url, min_size=1, max_size=1))
    await asyncio.wait_for(answered.wait(), 10)
    front.close()
    await front.wait_closed()
    await asyncio.sleep(1.5)  # the restart: nothing listens, connections are refused
    assert not pool_task.done()
    front = await asyncio.start_server(_forward_to(real.hostname, real.port or 5432), "127.0.0.1", port)
    try:
        pool = await asyncio.wait_for(pool_task, 30)
        try:
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await pool.close()
        assert time.monotonic() - started >= 1.5
    finally:
        front.close()


async def test_a_refused_connection_without_a_restart_is_one_line_at_once():
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="cannot reach PostgreSQL"):
        await create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    assert time.monotonic() - started < 5
