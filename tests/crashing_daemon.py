"""A consumer daemon, for tests only, whose journal dies (os._exit) when it handles one chosen event.

    python -m tests.crashing_daemon EVENT_ID      # settings from SNTRACK_* as `sntrack consume journal`

It is the real runtime and supervisor (consumers.service.serve_handlers) around the real journal projection; only
`project` is wrapped, so the process dies in the middle of a batch exactly as a segfault or an OOM kill would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from consumers.handler import ProjectionHandler
from consumers.projections.journal import JournalProjection
from consumers.service import serve_handlers
from sntrack.logging import configure_logging
from sntrack.settings import Settings

CRASH_EXIT = 70


class CrashingJournal(JournalProjection):
    def __init__(self, crash_on: str):
        self.crash_on = crash_on

    def project(self, event):
        if str(event.event_id) == self.crash_on:
            os._exit(CRASH_EXIT)
        return super().project(event)


async def main(crash_on: str) -> int:
    settings = Settings.from_env()
    configure_logging(True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handlers = lambda store: [ProjectionHandler(CrashingJournal(crash_on), store)]  # noqa: E731
    return await serve_handlers(settings.consumer(), handlers, stop)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
