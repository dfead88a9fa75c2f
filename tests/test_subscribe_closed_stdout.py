"""`sntrack subscribe NAME >&-`: started with its standard output closed, the subscriber used to take every event,
fail each on `None.write`, dead-letter them all and exit with a traceback; the next run then had nothing (found by
attack19). It is refused in one line before it takes anything."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from consumers.service import running_consumers
from tests.conftest import wait_until
from tests.test_dlq import _depth
from tests.test_end_to_end import cli_env
from tests.test_subscribe_catchup import read_to_the_tail, study_events


async def test_a_subscriber_started_with_stdout_closed_refuses_and_takes_nothing(env, tmp_path):
    events = [e for e in study_events(2, 3, seed=21) if e.event_type == "ml.run.metric"]
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="the journal")
        closed = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", 'exec "$0" -m sntrack subscribe closed --bind ml.run.metric --from-start >&-',
            sys.executable, env=cli_env(env), stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(closed.communicate(), 60)
        text = err.decode()
        assert closed.returncode == 2 and "standard output is closed" in text, text[-3000:]
        assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
        assert await _depth(env, "sntrack.sub.closed.dlq") in (None, 0)  # None: refused before declaring it
        delivered, order = await read_to_the_tail(env, "closed", tmp_path / "rest.jsonl", "--bind", "ml.run.metric",
                                                  "--from-start")
    assert delivered == order


@pytest.mark.xfail(strict=True, reason="attack19: JsonLinesSink writes stdout synchronously on the event loop; a full "
                                       "pipe blocks the loop, so the SIGTERM handler never runs until the reader reads")
async def test_sigterm_stops_a_subscriber_whose_reader_stalls(env):
    """`sntrack subscribe NAME | slow-reader`: with the pipe full, SIGTERM must still stop the subscriber."""
    events = study_events(30, 10, seed=22)  # more than a pipe's 64 KiB of JSON lines
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="the journal",
                         timeout=120)
        reader, writer = os.pipe()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "stall", "--from-start", env=cli_env(env), stdout=writer,
            stderr=asyncio.subprocess.DEVNULL)
        os.close(writer)
        try:
            await wait_until(lambda: _pipe_full(reader), what="the pipe to fill")
            process.send_signal(signal.SIGTERM)
            stopped = await _exits_within(process, 30)
        finally:
            os.close(reader)  # the reader goes: the write fails and the subscriber ends either way
            await asyncio.wait_for(process.wait(), 60)
        assert stopped, "SIGTERM did not stop the subscriber while its reader stalled"


def _pipe_full(fd: int) -> bool:
    import fcntl
    import termios
    pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(pending, sys.byteorder) >= 60_000


async def _exits_within(process, seconds: float) -> bool:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True
