"""Gateway benchmark: HTTP ingest latency (POST → 202) and batched NDJSON throughput, each beside its baseline.

- Latency at a steady 500 events/s, one event per request, against direct AMQP publish-with-confirm latency at
  500 events/s in the same run (aio-pika, one publish awaited per event, as producer/publisher.py publishes).
  Target: p95 ≤ direct p95 + 2 ms. The two paths take turns of 50 events (100 ms) on one open-loop clock at
  500 events/s, each from its own client process (two producers), so the broker sees 500 events/s as in the
  target, and a broker stall (a slow fsync of the quorum queues' log holds confirms back for 50 to 300 ms on this
  shared machine) or a burst of other load spans turns of both paths; in turns of a second, each stall landed on
  whichever path's second it was. Running both at once instead would double the broker's rate.
- Throughput of NDJSON requests of 500 events (4 in flight), against the direct publisher's rate
  (producer.publisher.EventPublisher: publish all, then flush until every one is confirmed). Target: ≥ 80 %.

The gateway runs as its own process (`sntrack gateway`) in its own session, as deployed (a daemon, like the broker
it is compared with), and so does each client: with the kernel's autogroup scheduling, processes of one session
share one CPU share, and a gateway or client sharing it with the benchmark falls behind whenever the machine is
busy, which measures the benchmark rather than the gateway. Consumer queues are purged between phases so each phase
routes into equally empty queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
TURN = 50  # events a path sends in a row before the other path's turn, in the latency phase
BATCH = 500
IN_FLIGHT = 4


def _events(count: int, seed: int) -> list[Event]:
    study = synthetic_study(count // 10 + 1, 20, seed=seed, producer=producer_info("bench"))
    return [e for trial in study for e in trial][:count]


def _turns(count: int, began: float, second: bool) -> list[float]:
    """The time.monotonic() of each of `count` sends of one path at RATE, taking turns of TURN sends with the other
    path from `began` on; the `second` path starts one turn later."""
    return [began + ((2 * (i // TURN) + second) * TURN + i % TURN) / RATE for i in range(count)]


async def _paced(events: list[Event], times: list[float], send) -> list[list[float]]:
    """Start `send(events[i])` at time.monotonic() `times[i]`, open loop: for each send, its latency in ms followed
    by the ms that `send` returns (the gateway's Server-Timing; none for a direct publish)."""
    latencies: list[list[float]] = []

    async def timed(event: Event) -> None:
        started = time.perf_counter()
        server_ms = await send(event)
        latencies.append([(time.perf_counter() - started) * 1000, *server_ms])

    tasks = []
    for i, event in enumerate(events):
        if (delay := times[i] - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(event)))
    await asyncio.gather(*tasks)
    return latencies


async def _stream(path: str, target: str, count: int, seed: int) -> list[list[float]]:
    """One client's latencies: `count` events in its turns (_turns), published to `target` (an AMQP URL) with
    confirms when `path` is "direct", else POSTed to `target` (the gateway's URL) with $SNTRACK_BENCH_TOKEN, whose
    turns come second. The same warm-up first, 200 events at RATE; then it says "ready" on stdout and starts at the
    time.monotonic() it reads from stdin."""
    async with contextlib.AsyncExitStack() as stack:
        if path == "direct":
            connection = await aio_pika.connect(target)
            stack.push_async_callback(connection.close)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            send = _publisher(await channel.get_exchange(EXCHANGE, ensure=False))
        else:
            # Idle connections are closed by the client (4 s) before uvicorn closes them (5 s): reusing one the
            # server is closing at that moment fails the request with a reset.
            session = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=4),
                headers={"Authorization": f"Bearer {os.environ['SNTRACK_BENCH_TOKEN']}"}))
            send = _poster(session, target)
        now = time.monotonic()
        await _paced(_events(200, seed=seed + 1), [now + i / RATE for i in range(200)], send)
        print("ready", flush=True)
        began = float(await asyncio.to_thread(sys.stdin.readline))
        return await _paced(_events(count, seed=seed), _turns(count, began, second=path != "direct"), send)


async def _streams(settings: Settings, url: str, token: str, count: int, gateway_pid: int) -> tuple[list, list, float]:
    """Direct and gateway latencies from two client processes, each in its own session, taking turns on one clock
    once both are warmed up. Also the CPU seconds the gateway process used from the start on (not in the clients'
    warm-up)."""
    env = {**os.environ, "SNTRACK_BENCH_TOKEN": token}
    clients = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.gateway_bench", path, target, str(count), str(seed), env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        for path, target, seed in (("direct", settings.amqp_url, 10), ("gateway", url, 100))]
    try:
        for client in clients:
            if await asyncio.wait_for(client.stdout.readline(), 60) != b"ready\n":
                raise RuntimeError(f"a benchmark client failed before the start (exit code {await client.wait()})")
        began = time.monotonic() + 0.1
        for client in clients:
            client.stdin.write(f"{began!r}\n".encode())
            await client.stdin.drain()
        await asyncio.sleep(began - time.monotonic())
        cpu_s = _cpu_s(gateway_pid)
        outputs = [await asyncio.wait_for(client.communicate(), 120) for client in clients]
        cpu_s = _cpu_s(gateway_pid) - cpu_s
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
    if any(client.returncode != 0 for client in clients):
        raise RuntimeError(f"a benchmark client failed (exit codes {[c.returncode for c in clients]})")
    direct_ms, gateway_ms = (json.loads(out) for out, _ in outputs)
    return direct_ms, gateway_ms, cpu_s


def _publisher(exchange: aio_pika.abc.AbstractExchange):
    async def publish(event: Event) -> tuple[float, ...]:
        await exchange.publish(message_for(event), routing_key=event.event_type, mandatory=True)
        return ()
    return publish


def _accepted(status: int, body: bytes) -> None:
    if status != 202:
        raise RuntimeError(f"gateway answered {status}: {body[:300]!r}")


def _poster(session: aiohttp.ClientSession, url: str):
    async def post(event: Event) -> tuple[float, ...]:
        """POST one event; the gateway's own ms from its Server-Timing header: (gate, confirm)."""
        async with session.post(f"{url}/v1/events", data=event.to_json()) as response:
            _accepted(response.status, await response.read())  # read: an unread body closes the connection
            timing = response.headers.get("Server-Timing", "")
        return tuple(float(part.partition("dur=")[2]) for part in timing.split(","))
    return post


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _split(direct: list[list[float]], gateway: list[list[float]]) -> dict[str, dict[str, float]]:
    """Where POST → 202 goes, from each request's Server-Timing: the gate and the broker's confirm inside the
    gateway, and the rest (HTTP both ways, uvicorn, Starlette, the token check, the client, waits for a CPU);
    the direct publish beside it. Mean and percentiles of each part (the means add up, the percentiles do not)."""
    parts = {"post_to_202": [r[0] for r in gateway], "gate": [r[1] for r in gateway],
             "confirm": [r[2] for r in gateway], "rest": [r[0] - r[1] - r[2] for r in gateway],
             "direct": [r[0] for r in direct]}
    return {name: {"mean": round(statistics.fmean(ms), 3), **percentiles(ms)} for name, ms in parts.items()}


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
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


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
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
                count = RATE * max(1, round(duration_s))
                log(f"latency at {RATE} events/s: {count} direct publishes and {count} POSTs in turns of {TURN}, "
                    "from two client processes")
                load = [os.getloadavg()[0]]
                direct, via_gateway, cpu_s = await _streams(settings, url, token, count, gateway.pid)
                load.append(os.getloadavg()[0])
                latency = {"rate": RATE, "turn": TURN, "direct_ms": percentiles([r[0] for r in direct]),
                           "gateway_ms": percentiles([r[0] for r in via_gateway]),
                           "split_ms": _split(direct, via_gateway),
                           # The gateway's own CPU per request: what 500 requests/s cost it.
                           "gateway_cpu_ms_per_request": round(1000 * cpu_s / len(via_gateway), 3),
                           "load_avg_1m": [round(x, 2) for x in load], "cpus": os.cpu_count()}
                latency["p95_delta_ms"] = round(latency["gateway_ms"]["p95"] - latency["direct_ms"]["p95"], 2)
                latency["target_met"] = latency["p95_delta_ms"] <= 2.0
                log(f"  direct {latency['direct_ms']}\n  gateway {latency['gateway_ms']}\n"
                    f"  split {latency['split_ms']}\n  gateway CPU {latency['gateway_cpu_ms_per_request']} ms a "
                    f"request; 1-minute load average before / after {latency['load_avg_1m']}")
                log(f"throughput: {throughput_events} events, NDJSON {BATCH}/request vs the direct publisher")
                await _purge(settings)
                publisher_rate = await asyncio.to_thread(
                    _publisher_throughput,
                    settings.replace(worker_id="bench", publish_buffer=throughput_events + 1),
                    _events(throughput_events, seed=5))
                await _purge(settings)
                gateway_rate = await _gateway_throughput(session, url, _events(throughput_events, seed=6))
                await _purge(settings)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
        throughput = {"events": throughput_events, "batch": BATCH, "in_flight": IN_FLIGHT,
                      "gateway_events_per_s": round(gateway_rate), "publisher_events_per_s": round(publisher_rate),
                      "ratio": round(gateway_rate / publisher_rate, 2)}
        throughput["target_met"] = throughput["ratio"] >= 0.8
        log(f"  publisher {publisher_rate:,.0f}/s  gateway {gateway_rate:,.0f}/s")
    return {"latency": latency, "throughput": throughput}


if __name__ == "__main__":
    if sys.argv[1:2] in (["direct"], ["gateway"]):  # one client of the latency phase (_streams): its JSON latencies
        path, target, count, seed = sys.argv[1:]
        print(json.dumps(asyncio.run(_stream(path, target, int(count), int(seed)))))
    else:
        print(asyncio.run(run(Settings.from_env())))
