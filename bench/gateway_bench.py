"""Gateway benchmark: HTTP ingest latency (POST → 202) and batched NDJSON throughput, each beside its baseline.

- Latency at a steady 500 events/s, one event per request, against direct AMQP publish-with-confirm latency of
  the same events in the same run (aio-pika, one publish awaited per event). Target: p95 ≤ direct p95 + 2 ms.
- Throughput of NDJSON requests of 500 events (4 in flight), against the direct publisher's rate
  (producer.publisher.EventPublisher: publish all, then flush until every one is confirmed). Target: ≥ 80 %.

The gateway runs as its own process (`sntrack gateway`), as deployed; consumer queues are purged between phases so
each phase routes into equally empty queues.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiohttp
import asyncpg

from bench.timing import percentiles
from consumers.broker_admin import ManagementApi
from consumers.registry import QUEUES
from gateway.broker import message_for
from gateway.tokens import add_token
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from schemas import EXCHANGE, Event
from sntrack.mlflow_server import free_port
from sntrack.settings import Settings
from tests.sandbox import sandbox

RATE = 500
BATCH = 500
IN_FLIGHT = 4


def _events(count: int, seed: int) -> list[Event]:
    study = synthetic_study(count // 10 + 1, 20, seed=seed, producer=producer_info("bench"))
    return [e for trial in study for e in trial][:count]


async def _paced(events: list[Event], rate: float, send) -> list[float]:
    """Start `send(event)` for each event at a steady `rate`, open loop; each one's latency in ms."""
    latencies: list[float] = []

    async def timed(event: Event) -> None:
        started = time.perf_counter()
        await send(event)
        latencies.append((time.perf_counter() - started) * 1000)

    tasks, began = [], time.perf_counter()
    for i, event in enumerate(events):
        if (delay := began + i / rate - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(event)))
    await asyncio.gather(*tasks)
    return latencies


async def _direct_latency(exchange: aio_pika.abc.AbstractExchange, events: list[Event]) -> list[float]:
    async def send(event: Event) -> None:
        await exchange.publish(message_for(event), routing_key=event.event_type, mandatory=True)

    return await _paced(events, RATE, send)


def _accepted(status: int, body: bytes) -> None:
    if status != 202:
        raise RuntimeError(f"gateway answered {status}: {body[:300]!r}")


async def _gateway_latency(session: aiohttp.ClientSession, url: str, events: list[Event]) -> list[float]:
    async def send(event: Event) -> None:
        async with session.post(f"{url}/v1/events", data=event.to_json()) as response:
            _accepted(response.status, await response.read())  # read: an unread body closes the connection

    return await _paced(events, RATE, send)


async def _stages(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The gateway's own time summaries from /metrics: {"gate_sum": s, "gate_count": n, "confirm_sum": …}."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return {name.removeprefix("sntrack_gateway_").replace("_seconds", ""): float(value)
            for name, value in (line.split() for line in text.splitlines() if "_seconds_" in line
                                and not line.startswith("#"))}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile(before: dict[str, float], after: dict[str, float], latencies_ms: list[float]) -> dict[str, float]:
    """Where the mean POST → 202 goes: the gateway's gate and confirm stages; the rest is HTTP, framework, client."""
    mean = {stage: 1000 * (after[f"{stage}_sum"] - before[f"{stage}_sum"])
            / max(1.0, after[f"{stage}_count"] - before[f"{stage}_count"]) for stage in ("gate", "confirm")}
    total = statistics.fmean(latencies_ms)
    return {"mean_ms": round(total, 2), "gate_ms": round(mean["gate"], 3), "confirm_ms": round(mean["confirm"], 2),
            "http_framework_client_ms": round(total - mean["gate"] - mean["confirm"], 2)}


async def _gateway_throughput(session: aiohttp.ClientSession, url: str, events: list[Event]) -> float:
    bodies = [b"\n".join(e.to_json() for e in events[i:i + BATCH]) for i in range(0, len(events), BATCH)]
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def send(body: bytes) -> None:
        async with slots, session.post(f"{url}/v1/events", data=body,
                                       headers={"Content-Type": "application/x-ndjson"}) as response:
            _accepted(response.status, await response.read())

    started = time.perf_counter()
    await asyncio.gather(*(send(body) for body in bodies))
    return len(events) / (time.perf_counter() - started)


def _publisher_throughput(settings: Settings, events: list[Event]) -> float:
    with EventPublisher(settings.publisher()) as publisher:
        if publisher.first_contact() or not publisher.stats.connected:
            raise RuntimeError(f"the direct publisher did not connect: {publisher.stats}")
        started = time.perf_counter()
        for event in events:
            publisher.publish(event)
        if not publisher.flush(120) or publisher.stats.spooled:
            raise RuntimeError(f"the direct publisher did not confirm everything directly: {publisher.stats}")
        return len(events) / (time.perf_counter() - started)


async def _purge(settings: Settings) -> None:
    api = ManagementApi(settings.rabbitmq_admin_url)
    vhost = quote(settings.amqp_vhost, safe="")
    for spec in QUEUES:
        await asyncio.to_thread(api.request, "DELETE", f"queues/{vhost}/{quote(spec.name, safe='')}/contents")


def _spawn_gateway(settings: Settings, port: int) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true",
           "SNTRACK_GATEWAY_RATE_PER_S": "1000000", "SNTRACK_GATEWAY_BURST": "1000000"}
    return subprocess.Popen([sys.executable, "-m", "sntrack", "gateway", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _start_gateway(settings: Settings, port: int) -> subprocess.Popen:
    process = _spawn_gateway(settings, port)
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    process.kill()
    raise RuntimeError(f"sntrack gateway did not become healthy (exit code {process.poll()})")


async def run(base: Settings, *, duration_s: float = 8.0, throughput_events: int = 20_000, log=print) -> dict:
    async with sandbox(base, prefix="sntrack-bench-gateway") as settings:
        conn = await asyncpg.connect(settings.database_url)
        try:
            _, token = await add_token(conn, "bench")
        finally:
            await conn.close()
        port = free_port()
        gateway = await _start_gateway(settings, port)
        url = f"http://127.0.0.1:{port}"
        connection = None
        try:
            connection = await aio_pika.connect(settings.amqp_url)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
                await _gateway_latency(session, url, _events(200, seed=1))  # warm-up, both paths
                await _direct_latency(exchange, _events(200, seed=2))
                rounds = max(1, round(duration_s))
                log(f"latency at {RATE} events/s: {rounds} rounds of one second each, direct AMQP then gateway")
                direct_ms, gateway_ms, before = [], [], await _stages(session, url)
                cpu_s = _cpu_s(gateway.pid)
                for i in range(rounds):  # alternating, so both see the same broker and machine conditions
                    direct_ms += await _direct_latency(exchange, _events(RATE, seed=10 + i))
                    gateway_ms += await _gateway_latency(session, url, _events(RATE, seed=100 + i))
                cpu_s = _cpu_s(gateway.pid) - cpu_s
                latency = {"rate": RATE, "direct_ms": percentiles(direct_ms), "gateway_ms": percentiles(gateway_ms),
                           "direct_mean_ms": round(statistics.fmean(direct_ms), 2),
                           "gateway_profile": _profile(before, await _stages(session, url), gateway_ms)}
                # The gateway's own CPU per request (every request of the rounds): what 500 requests/s cost it.
                latency["gateway_profile"]["cpu_ms_per_request"] = round(1000 * cpu_s / len(gateway_ms), 3)
                latency["p95_delta_ms"] = round(latency["gateway_ms"]["p95"] - latency["direct_ms"]["p95"], 2)
                latency["target_met"] = latency["p95_delta_ms"] <= 2.0
                log(f"  direct {latency['direct_ms']}\n  gateway {latency['gateway_ms']}\n"
                    f"  gateway mean split {latency['gateway_profile']}")
                log(f"throughput: {throughput_events} events, NDJSON {BATCH}/request vs the direct publisher")
                await _purge(settings)
                publisher_rate = await asyncio.to_thread(
                    _publisher_throughput,
                    settings.model_copy(update={"worker_id": "bench", "publish_buffer": throughput_events + 1}),
                    _events(throughput_events, seed=5))
                await _purge(settings)
                gateway_rate = await _gateway_throughput(session, url, _events(throughput_events, seed=6))
                await _purge(settings)
        finally:
            if connection is not None:
                await connection.close()
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
        throughput = {"events": throughput_events, "batch": BATCH, "in_flight": IN_FLIGHT,
                      "gateway_events_per_s": round(gateway_rate), "publisher_events_per_s": round(publisher_rate),
                      "ratio": round(gateway_rate / publisher_rate, 2)}
        throughput["target_met"] = throughput["ratio"] >= 0.8
        log(f"  publisher {publisher_rate:,.0f}/s  gateway {gateway_rate:,.0f}/s")
    return {"latency": latency, "throughput": throughput}


if __name__ == "__main__":
    print(asyncio.run(run(Settings.from_env())))
