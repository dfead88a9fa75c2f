"""The durable floor the pipeline benchmark measures sntrack against: a consumer daemon that keeps what it acks and
does nothing else. Per queue, each batch of what has arrived (up to the batch size sntrack uses) is written in one
INSERT, its own transaction (one round trip, one durable commit), then acked. A trigger notifies the benchmark of
each row at commit, as the benchmark's trigger on applied_events does for sntrack.

    python -m bench.floor NAME...   (settings from the environment, as for `sntrack consume`)
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
import asyncpg

from sntrack.settings import Settings

EXCHANGE = "sntrack.bench-floor"
QUEUE_PREFIX = f"{EXCHANGE}."
STOPS = "ml.run.stop"  # the comparison consumer's queue takes only these, as sntrack's does
SETUP = """
CREATE TABLE IF NOT EXISTS bench_floor (consumer text, event_id text, PRIMARY KEY (consumer, event_id));
CREATE OR REPLACE FUNCTION bench_floor_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench', NEW.consumer || ' ' || NEW.event_id); RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER bench_floor_notify AFTER INSERT ON bench_floor FOR EACH ROW
EXECUTE FUNCTION bench_floor_notify();
"""
INSERT = "INSERT INTO bench_floor SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING"


async def _apply(pool: asyncpg.Pool, name: str, inbox: asyncio.Queue, batch_size: int) -> None:
    while True:
        batch = [await inbox.get()]
        while len(batch) < batch_size and not inbox.empty():
            batch.append(inbox.get_nowait())
        await pool.execute(INSERT, name, [message.message_id for message in batch])
        await batch[-1].ack(multiple=True)


async def consume(settings: Settings, names: list[str]) -> None:
    """Consume `names`' queues until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    for each in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(each, stop.set)
    pool = await asyncpg.create_pool(settings.database_url, min_size=len(names), max_size=len(names))
    connection = await aio_pika.connect(settings.amqp_url)
    workers = []
    try:
        await pool.execute(SETUP)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        for name in names:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=settings.prefetch)
            queue = await channel.declare_queue(QUEUE_PREFIX + name, durable=True,
                                                arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, routing_key=STOPS if name == "comparison" else "ml.run.#")
            inbox: asyncio.Queue = asyncio.Queue()

            async def put(message, inbox=inbox):
                inbox.put_nowait(message)
            workers.append(asyncio.ensure_future(_apply(pool, name, inbox, settings.batch_size)))
            await queue.consume(put)
        await stop.wait()
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await connection.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help="a consumer's name: its queue is "
                        f"{QUEUE_PREFIX}NAME, bound as sntrack's queue of that name")
    args = parser.parse_args()
    asyncio.run(consume(Settings.from_env(), args.names))


if __name__ == "__main__":
    main()
