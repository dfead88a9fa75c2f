"""Run a set of consumers in one process until told to stop (the `sntrack consume` daemon)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import aio_pika
import structlog

from common.errors import ConfigurationError
from consumers.attempts import AttemptLedger
from consumers.config import ConsumerConfig
from consumers.handler import Handler, ProjectionHandler
from consumers.metrics import ConsumerMetrics
from consumers.persistence import Store, create_pool
from consumers.pruning import keep_pruning
from consumers.registry import CONSUMER_NAMES, PLUGINS, PROJECTIONS, SIDE_EFFECTS
from consumers.runtime import ConsumerRuntime, connect

log = structlog.get_logger("sntrack.consumer")


def resolve_names(names: Sequence[str]) -> list[str]:
    """The consumer names meant (`all` expanded, duplicates dropped); a one-line error for unknown ones."""
    if "all" in names:
        names = list(CONSUMER_NAMES)
    for plugin in PLUGINS:
        if plugin.problem and plugin.name in names:
            raise ConfigurationError(f"projection plugin {plugin.name} ({plugin.distribution}) {plugin.problem}")
    unknown = [n for n in names if n not in CONSUMER_NAMES]
    if unknown:
        choices = ", ".join(CONSUMER_NAMES)
        raise ConfigurationError(f"unknown consumer(s) {', '.join(unknown)}; choose from {choices}, all")
    return list(dict.fromkeys(names))


def build_handlers(names: Sequence[str], store: Store, config: ConsumerConfig) -> list[Handler]:
    return [
        ProjectionHandler(PROJECTIONS[name], store) if name in PROJECTIONS else SIDE_EFFECTS[name](store, config)
        for name in resolve_names(names)
    ]


RESTART_LIMIT = 8  # failures in a row (no batch applied in between) before the daemon gives up with exit 1
RESTART_MAX_BACKOFF_S = 5.0


async def supervise(runtime: ConsumerRuntime, connection: aio_pika.abc.AbstractRobustConnection) -> None:
    """Run `runtime` until stopped. When it fails, log it loudly and start it again after a backoff, so its
    siblings in the daemon keep running; after RESTART_LIMIT failures without progress, raise the last error
    (tests/test_consumer_restart.py)."""
    failures, backoff = 0, 0.5
    while True:
        progress = runtime.stats.batches
        try:
            await runtime.run(connection)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of one consumer must spare its siblings
            if isinstance(exc, ConfigurationError) and not runtime.ready.is_set():
                # At its first start, a missing queue or a refused permission is a configuration mistake, which the
                # command line says in one line (exit 2). Later (its queue deleted) it is restarted like any failure.
                runtime.gave_up.set()
                raise
            if runtime.stopping:
                return
            if runtime.stats.batches > progress:
                failures, backoff = 0, 0.5
            failures += 1
            if failures >= RESTART_LIMIT:
                log.error("consumer keeps failing; giving up", consumer=runtime.handler.name, error=repr(exc),
                          failures=failures)
                runtime.gave_up.set()
                raise
            log.error("consumer failed; restarting it", consumer=runtime.handler.name, error=repr(exc),
                      failures=failures, restart_in_s=backoff)
            await runtime.pause(backoff)
            if runtime.stopping:
                return
            backoff = min(backoff * 2, RESTART_MAX_BACKOFF_S)


HandlerFactory = Callable[[Store], Sequence[Handler]]
# A cancelled consumer failed in nothing; a ConfigurationError is said by the command line or by `supervise`.
NOT_LOGGED = (asyncio.CancelledError, ConfigurationError)


@contextlib.asynccontextmanager
async def running_consumers(config: ConsumerConfig, names: Sequence[str]) -> AsyncIterator[list[ConsumerRuntime]]:
    """Start the named consumers; on exit stop them gracefully (finish the batch in hand, ack, close)."""
    resolve_names(names)  # unknown names fail before any connection is made
    async with running_handlers(config, lambda store: build_handlers(names, store, config)) as runtimes:
        yield runtimes


@contextlib.asynccontextmanager
async def running_handlers(config: ConsumerConfig, make_handlers: HandlerFactory,
                           metrics: ConsumerMetrics | None = None) -> AsyncIterator[list[ConsumerRuntime]]:
    """Start a consumer runtime, supervised, for each handler `make_handlers(store)` returns; `metrics`, when
    given, counts what they do and checks their connection and pool."""
    pool = await create_pool(config.database_url, max_size=8)
    try:
        connection = await connect(config)
        try:
            handlers = make_handlers(Store(pool))
            runtimes = [ConsumerRuntime(h, config, AttemptLedger(pool, h.name)) for h in handlers]
            if metrics is not None:
                metrics.attach(connection, pool, runtimes)
            pruners = [asyncio.create_task(keep_pruning(pool, h.projection, config.prune_every_s),
                                           name=f"pruning-{h.name}")
                       for h in handlers if isinstance(h, ProjectionHandler) and h.projection.idempotent_types]
            tasks = [asyncio.create_task(supervise(r, connection), name=f"consumer-{r.handler.name}")
                     for r in runtimes]
            ready = asyncio.gather(*(r.ready.wait() for r in runtimes))
            ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # cancelled below: not an error
            try:
                done, _ = await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task in done:
                        ready.cancel()
                        task.result()  # a consumer that could not start after its restarts raises here
                yield runtimes
            finally:
                for pruner in pruners:
                    pruner.cancel()
                for runtime in runtimes:
                    runtime.stop()
                for runtime, outcome in zip(runtimes, await asyncio.gather(*tasks, return_exceptions=True),
                                            strict=True):
                    if isinstance(outcome, BaseException) and not isinstance(outcome, NOT_LOGGED):
                        log.error("consumer failed", consumer=runtime.handler.name, error=repr(outcome))
                # Side-effect handlers may hold clients (e.g. MLflow's HTTP session); they close them here.
                await asyncio.gather(*(r.handler.aclose() for r in runtimes if hasattr(r.handler, "aclose")),
                                     *pruners, return_exceptions=True)
        finally:
            await connection.close()
    finally:
        await pool.close()


async def serve(config: ConsumerConfig, names: Sequence[str], stop: asyncio.Event,
                metrics: ConsumerMetrics | None = None) -> int:
    """Run the named consumers until `stop` is set (0)."""
    resolve_names(names)
    return await serve_handlers(config, lambda store: build_handlers(names, store, config), stop, metrics)


async def serve_handlers(config: ConsumerConfig, make_handlers: HandlerFactory, stop: asyncio.Event,
                         metrics: ConsumerMetrics | None = None) -> int:
    """Run until `stop` is set (0), or until a consumer keeps failing after restarts (1: let a supervisor
    restart us). A consumer that fails is restarted in-process; its siblings keep running."""
    async with running_handlers(config, make_handlers, metrics) as runtimes:
        log.info("consumers running", consumers=[r.handler.name for r in runtimes])
        waits = [asyncio.ensure_future(stop.wait()), *(asyncio.ensure_future(r.gave_up.wait()) for r in runtimes)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        failed = [r.handler.name for r in runtimes if r.gave_up.is_set()]
        if failed and not stop.is_set():
            log.error("consumer keeps failing; exiting so that the supervisor restarts us", consumers=failed)
            return 1
    return 0
