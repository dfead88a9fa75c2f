"""Run a set of consumers in one process until told to stop (the `sntrack consume` daemon)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import structlog

from consumers.handler import Handler, ProjectionHandler
from consumers.persistence import Store, create_pool
from consumers.registry import CONSUMER_NAMES, PROJECTIONS, SIDE_EFFECTS
from consumers.runtime import ConsumerRuntime, connect
from sntrack.settings import ConfigurationError, Settings

log = structlog.get_logger("sntrack.consumer")


def build_handlers(names: Sequence[str], store: Store, settings: Settings) -> list[Handler]:
    if "all" in names:
        names = list(CONSUMER_NAMES)
    unknown = [n for n in names if n not in CONSUMER_NAMES]
    if unknown:
        choices = ", ".join(CONSUMER_NAMES)
        raise ConfigurationError(f"unknown consumer(s) {', '.join(unknown)}; choose from {choices}, all")
    return [
        ProjectionHandler(PROJECTIONS[name], store) if name in PROJECTIONS else SIDE_EFFECTS[name](store, settings)
        for name in dict.fromkeys(names)
    ]


@contextlib.asynccontextmanager
async def running_consumers(settings: Settings, names: Sequence[str]) -> AsyncIterator[list[ConsumerRuntime]]:
    """Start the named consumers; on exit stop them gracefully (finish the batch in hand, ack, close)."""
    pool = await create_pool(settings.database_url, max_size=max(2, len(names) + 1))
    try:
        connection = await connect(settings)
        try:
            runtimes = [ConsumerRuntime(h, settings) for h in build_handlers(names, Store(pool), settings)]
            tasks = [asyncio.create_task(r.run(connection), name=f"consumer-{r.handler.name}") for r in runtimes]
            ready = asyncio.gather(*(r.ready.wait() for r in runtimes))
            done, _ = await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done:
                    ready.cancel()
                    task.result()  # a consumer that failed to start raises here
            try:
                yield runtimes
            finally:
                for runtime in runtimes:
                    runtime.stop()
                for runtime, outcome in zip(runtimes, await asyncio.gather(*tasks, return_exceptions=True),
                                            strict=True):
                    if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                        log.error("consumer failed", consumer=runtime.handler.name, error=repr(outcome))
                # Side-effect handlers may hold clients (e.g. MLflow's HTTP session); they close them here.
                await asyncio.gather(*(r.handler.aclose() for r in runtimes if hasattr(r.handler, "aclose")),
                                     return_exceptions=True)
        finally:
            await connection.close()
    finally:
        await pool.close()


async def serve(settings: Settings, names: Sequence[str], stop: asyncio.Event) -> int:
    """Run until `stop` is set (0), or until a consumer dies unexpectedly (1: let a supervisor restart us)."""
    async with running_consumers(settings, names) as runtimes:
        log.info("consumers running", consumers=[r.handler.name for r in runtimes])
        waits = [asyncio.ensure_future(stop.wait()), *(asyncio.ensure_future(r.finished.wait()) for r in runtimes)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        crashed = [r.handler.name for r in runtimes if r.finished.is_set()]
        if crashed and not stop.is_set():
            log.error("consumer stopped unexpectedly; exiting so that the supervisor restarts us", consumers=crashed)
            return 1
    return 0
