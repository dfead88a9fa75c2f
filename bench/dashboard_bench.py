"""Dashboard update lag: metric event published → visible in the page's DOM, measured in headless Chromium.

A MutationObserver in the page stamps (wall clock) every change of a trial row's epoch; an event's lag is the first
stamp at which its trial shows its epoch or a later one (a coalesced push may skip an epoch: the newer one
supersedes it). Beside it, in the same run at the same rate: raw aio-pika publish → consume of the same bodies (the
pipeline benchmark's baseline), and where the time goes: publish → the projection's NOTIFY heard (commit), and
publish → the push received by a second, plain SSE client (the server's share ends there; the rest is the page's).
Consumers (journal, trials, comparison) and the dashboard run as their own processes, as deployed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import aio_pika
import aiohttp
import asyncpg

from bench import pipeline
from bench.browser import chromium
from bench.timing import percentiles
from consumers.persistence import READ_MODEL_CHANNEL, apply_events, run_statements, unapplied
from consumers.registry import PROJECTIONS
from producer.emitter import producer_info
from producer.sample import synthetic_trial
from schemas import EXCHANGE
from sntrack.mlflow_server import free_port
from sntrack.settings import Settings
from tests.sandbox import sandbox

TARGET_P95_MS = 100.0
OBSERVER = """
window.__stamps = [];
new MutationObserver((records) => {
  const t = performance.timeOrigin + performance.now();
  for (const r of records) {
    const tr = r.target.closest ? r.target.closest('tr[data-trial]') : null;
    if (tr && tr.dataset.epoch !== '') window.__stamps.push([tr.dataset.trial, Number(tr.dataset.epoch), t]);
  }
}).observe(document.getElementById('arms'), {subtree: true, childList: true, attributes: true,
                                               attributeFilter: ['data-epoch']});
"""


def _study(trials: int, epochs: int, seed: int) -> tuple[list, list]:
    """Start events, then metric events round-robin over the trials (epoch by epoch)."""
    rng = random.Random(seed)
    made = [synthetic_trial(rng, f"bench-dash-{seed}", producer_info("bench"), epochs, n) for n in range(trials)]
    metrics = sorted((e for t in made for e in t if e.event_type == "ml.run.metric"), key=lambda e: (e.seq, e.trial_id))
    return [t[0] for t in made], metrics


async def publish_paced(settings: Settings, events: list, rate: float) -> dict[tuple[str, int], float]:
    """Publish with confirms at `rate` events/s; the wall-clock publish time (ms) of each (trial, epoch)."""
    sent: dict[tuple[str, int], float] = {}
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        started, pending = time.perf_counter(), []
        for i, event in enumerate(events):
            if (delay := started + i / rate - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            sent[(event.trial_id, getattr(event.payload, "epoch", -1))] = time.time() * 1000
            pending.append(asyncio.ensure_future(exchange.publish(
                aio_pika.Message(event.to_json(), message_id=str(event.event_id), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=event.event_type)))
        await asyncio.gather(*pending)
    finally:
        await connection.close()
    return sent


def _first_at_or_after(stamps: list[tuple[str, int, float]], sent: dict[tuple[str, int], float]) -> list[float]:
    """Per published (trial, epoch): ms until the page first showed that epoch or a later one."""
    by_trial: dict[str, list[tuple[float, int]]] = {}
    for trial, epoch, at in stamps:
        by_trial.setdefault(trial, []).append((at, epoch))
    lags = []
    for (trial, epoch), published in sent.items():
        seen = [at for at, shown in sorted(by_trial.get(trial, [])) if shown >= epoch and at >= published]
        if seen:
            lags.append(seen[0] - published)
    return lags


async def _commits(settings: Settings, heard: list[tuple[str, float]]) -> asyncpg.Connection:
    listener = await asyncpg.connect(settings.database_url)

    def notified(_c, _p, _ch, payload: str) -> None:
        change = json.loads(payload)
        if change["projection"] == "trials":
            now = time.time() * 1000
            heard.extend((trial, now) for trial in change["trials"] or [])

    await listener.add_listener(READ_MODEL_CHANNEL, notified)
    return listener


async def _pushes(url: str, stamps: list[tuple[str, int, float]]) -> None:
    """Read the dashboard's event stream as a browser would; stamp each trial row's epoch on arrival."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}events") as stream:
        event = b""
        async for line in stream.content:
            if line.startswith(b"event: "):
                event = line[7:].strip()
            elif event == b"trials" and line.startswith(b"data: "):
                now = time.time() * 1000
                stamps.extend((row["id"], row["last_epoch"], now) for row in json.loads(line[6:])
                              if row["last_epoch"] is not None)


def _commit_lags(sent: dict[tuple[str, int], float], heard: list[tuple[str, float]]) -> list[float]:
    """Per published event: ms until the first NOTIFY of its trial after its publish (its batch's commit)."""
    by_trial: dict[str, list[float]] = {}
    for trial, at in heard:
        by_trial.setdefault(trial, []).append(at)
    lags = []
    for (trial, _), published in sent.items():
        after = [at for at in by_trial.get(trial, []) if at >= published]
        if after:
            lags.append(min(after) - published)
    return lags


async def _wait(predicate, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def run(base: Settings, *, rate: float = 200.0, duration_s: float = 8.0, trials: int = 40, log=print) -> dict:
    epochs = int(rate * duration_s / trials)
    load_before = os.getloadavg()[0]
    async with sandbox(base, prefix="sntrack-bench-dash", mlflow_enabled=False) as settings:
        await pipeline._declare_raw(settings)
        port = free_port()
        daemons = _start(settings, port)
        heard: list[tuple[str, float]] = []
        listener = await _commits(settings, heard)
        try:
            await pipeline._wait_for_consumers(settings)  # journal and trials; comparison only feeds the verdict
            raw_messages = [(str(e.event_id), e.to_json(), e.event_type) for e in _study(trials, epochs, 7)[1]]
            log(f"raw baseline: {len(raw_messages)} events at {rate:.0f} events/s")
            raw_ms, _ = await pipeline._measure(settings, raw_messages, rate, pipeline.RAW_EXCHANGE,
                                                pipeline.raw_listener(settings))
            with chromium() as driver:
                url = f"http://127.0.0.1:{port}/"
                await _wait(lambda: _loads(driver, url), 30, "the dashboard")
                starts, metrics = _study(trials, epochs, 8)
                await publish_paced(settings, starts, rate)
                await _wait(lambda: driver.execute_script(
                    "return document.querySelectorAll('tr[data-trial]').length") == trials, 30, "the trials' rows")
                driver.execute_script(OBSERVER)
                pushed: list[tuple[str, int, float]] = []
                reader = asyncio.create_task(_pushes(url, pushed))
                log(f"dashboard: {len(metrics)} metric events at {rate:.0f} events/s over {trials} trials")
                heard.clear()
                sent = await publish_paced(settings, metrics, rate)
                last = {e.trial_id: e.payload.epoch for e in metrics}
                await _wait(lambda: _shows(driver, last), 30, "the page to show every last epoch")
                reader.cancel()
                stamps = driver.execute_script("return window.__stamps")
                errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
                version = driver.capabilities.get("browserVersion")
        finally:
            await listener.close()
            for daemon in daemons:
                daemon.send_signal(signal.SIGTERM)
            for daemon in daemons:
                daemon.wait(timeout=30)
        cost = await notify_cost(settings)
    dom = _first_at_or_after(stamps, sent)
    result = {"rate": rate, "events": len(sent), "trials": trials, "observed": len(dom),
              "dom_lag_ms": percentiles(dom), "commit_ms": percentiles(_commit_lags(sent, heard)),
              "pushed_ms": percentiles(_first_at_or_after(pushed, sent)),
              "raw_ms": percentiles(raw_ms), "target_p95_ms": TARGET_P95_MS, "chromium": version,
              "console_errors": errors, "notify_cost": cost,
              "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count()}
    result["p95_ratio"] = round(result["dom_lag_ms"]["p95"] / result["raw_ms"]["p95"], 2)
    log(f"  DOM {result['dom_lag_ms']}\n  commit {result['commit_ms']}\n  raw {result['raw_ms']}")
    return result


async def notify_cost(settings: Settings, batches: int = 200, batch: int = 50) -> dict:
    """The NOTIFY's cost on the consumer path: `trials` batches applied as the runtime does (one transaction, the
    NOTIFY sent by the bookkeeping statement), interleaved with the same transaction whose bookkeeping statement
    sends none; the difference of the medians is what the NOTIFY adds to a batch."""
    _, metrics = _study(batches * batch // 20, 20, 9)
    chunks = [metrics[i:i + batch] for i in range(0, batches * batch, batch)]
    trials = PROJECTIONS["trials"]
    conn = await asyncpg.connect(settings.database_url)
    shipped, silent = [], []
    try:
        for i, events in enumerate(chunks):
            started = time.perf_counter()
            async with conn.transaction():
                if i % 2:
                    fresh = await unapplied(conn, trials.name, events, record=True)
                    await run_statements(conn, (s for e in fresh for s in trials.project(e)))
                else:
                    await apply_events(conn, trials, events)
            (silent if i % 2 else shipped).append((time.perf_counter() - started) * 1000)
    finally:
        await conn.close()
    one, none = percentiles(shipped), percentiles(silent)
    return {"batch": batch, "batch_ms": one, "batch_without_notify_ms": none,
            "notify_ms_p50": round(one["p50"] - none["p50"], 3)}


def _start(settings: Settings, port: int) -> list[subprocess.Popen]:
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    consumers = (["consume", name] for name in ("journal", "trials", "comparison"))
    commands = (*consumers, ["dashboard", "--port", str(port)])
    return [subprocess.Popen([sys.executable, "-m", "sntrack", *command], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for command in commands]


def _loads(driver, url: str) -> bool:
    try:
        driver.get(url)
    except Exception:  # noqa: BLE001 - the server may still be starting
        return False
    return driver.execute_script("return document.getElementById('live').textContent === 'live'") or \
        _wait_live(driver)


def _wait_live(driver) -> bool:
    time.sleep(1)
    return driver.execute_script("return document.getElementById('live').textContent === 'live'")


def _shows(driver, last: dict[str, int]) -> bool:
    shown = dict(driver.execute_script(
        "return [...document.querySelectorAll('tr[data-trial]')].map(tr => [tr.dataset.trial, tr.dataset.epoch])"))
    return all(shown.get(trial) == str(epoch) for trial, epoch in last.items())
