"""Chaos: a flood of synthetic trials from several publishers while every kind of fault happens, then exact counts.

During the flood: 10 kill -9s spread over the four consumer daemons (journal, trials, comparison, mlflow), a real
RabbitMQ restart (the publishers spool, then flush), a real PostgreSQL restart (the consumers reconnect and resume),
the MLflow server stopped for 20 s, a rebuild of `trials` while the consumers are live, and a few poison messages.
Afterwards: the journal holds exactly the confirmed-or-spooled publishes; every projection equals a fresh replay;
nothing was applied twice; MLflow reconciles clean; every dead-letter queue holds only the injected poison.

It restarts the machine's shared RabbitMQ and PostgreSQL, so `make test` runs it with the `restarts` tests, alone.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.mlflow_server import mlflow_settings, own_mlflow_server  # noqa: F401
from tests.test_real_restarts import _control, _postgres_cluster

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.restarts,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("rabbitmqctl") is None or not _postgres_cluster(),
                       reason="restarts the local RabbitMQ and PostgreSQL: needs root and their control commands"),
]

CONSUMERS = ("journal", "trials", "comparison", "mlflow")
PUBLISHERS = 3
TRIALS_PER_PUBLISHER = 80
EPOCHS = 8
KILLS = 10
POISON = [b"{not json", b'{"event_type": "ml.run.stop", "schema_version": 1}', b"[" * 1000 + b"]" * 1000]


class Daemons:
    """One `sntrack consume NAME` process per consumer type, restartable, counted."""

    def __init__(self, environ: dict[str, str], log_dir):
        self.environ = environ
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts = dict.fromkeys(CONSUMERS, 0)

    def start(self, name: str) -> None:
        self.starts[name] += 1
        log = open(self.log_dir / f"{name}-{self.starts[name]}.log", "w")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "sntrack", "consume", name], env=self.environ,
                                                stdout=subprocess.DEVNULL, stderr=log)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.start(name)

    def revive_unreachable(self) -> list[str]:
        """Restart, as the systemd unit's Restart=on-failure does, each daemon that exited because a server was down
        when it started (exit 2, one line "sntrack: cannot reach ..."). A daemon that died any other way stays dead
        for the final check."""
        revived = []
        for name, process in list(self.processes.items()):
            log = self.log_dir / f"{name}-{self.starts[name]}.log"
            if process.poll() == 2 and log.read_text().strip().startswith("sntrack: cannot reach"):
                self.start(name)
                revived.append(name)
        return revived

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}

    def last_words(self) -> str:
        """The end of the current log of every daemon that is not running (for the failure message)."""
        return "\n".join(f"{name} exited {p.returncode}: "
                         + (self.log_dir / f"{name}-{self.starts[name]}.log").read_text()[-1500:]
                         for name, p in self.processes.items() if p.poll() is not None)

    def stop(self) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return {name: p.wait(timeout=60) for name, p in self.processes.items()}


def _publish(publisher: EventPublisher, trials: list[list], pace_s: float, stop: threading.Event) -> None:
    """Interleave trials a few at a time (as concurrent workers would), each trial's events in order."""
    queue = [list(trial) for trial in trials]
    while queue and not stop.is_set():
        for trial in queue[:4]:
            publisher.publish(trial.pop(0))
        queue = [t for t in queue if t]
        time.sleep(pace_s)


async def test_chaos_flood_with_kills_restarts_outages_and_a_live_rebuild(env, own_mlflow_server, tmp_path):  # noqa: F811
    settings = mlflow_settings(env.settings, own_mlflow_server.url)
    environ = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    rng = random.Random(8)
    studies = [synthetic_study(TRIALS_PER_PUBLISHER, EPOCHS, producer=producer_info(), seed=70 + i,
                               model_run_id=f"chaos-{i}", paired=i == 0) for i in range(PUBLISHERS)]
    events = [e for study in studies for trial in study for e in trial]
    stops = [trial[-1] for study in studies for trial in study]

    daemons = Daemons(environ, tmp_path)
    for name in CONSUMERS:
        daemons.start(name)
    publishers = [EventPublisher(settings.replace(spool_dir=tmp_path / f"spool-{i}").publisher()).start()
                  for i in range(PUBLISHERS)]
    halt = threading.Event()
    threads = [threading.Thread(target=_publish, args=(p, s, 0.25, halt)) for p, s in zip(publishers, studies,
                                                                                          strict=True)]
    for thread in threads:
        thread.start()
    faults: list[str] = []

    async def supervise() -> None:
        while True:
            await asyncio.sleep(1)  # the unit's RestartSec, shortened
            faults.extend(f"{name} exited at start (a server was down) and was restarted"
                          for name in daemons.revive_unreachable())  # in the loop, never beside a kill

    supervisor = asyncio.create_task(supervise())
    try:
        async def kill_some(count: int) -> None:
            for _ in range(count):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                name = rng.choice(CONSUMERS)
                daemons.kill(name)
                faults.append(f"kill -9 {name}")

        await kill_some(3)
        await env.publish_raw(POISON, routing_key="ml.run.stop")
        faults.append(f"{len(POISON)} poison messages")

        await asyncio.to_thread(_control, "rabbitmqctl", "stop_app")
        await asyncio.sleep(2)  # publishers spool meanwhile
        await asyncio.to_thread(_control, "rabbitmqctl", "start_app")
        await asyncio.to_thread(_control, "rabbitmqctl", "await_startup")
        faults.append("RabbitMQ restarted")
        await kill_some(3)

        await asyncio.to_thread(_control, "pg_ctlcluster", "--skip-systemctl-redirect", *_postgres_cluster(),
                                "restart")
        faults.append("PostgreSQL restarted")

        own_mlflow_server.kill()
        mlflow_down = time.monotonic()
        await kill_some(2)
        rebuild = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", "replay", "trials",
                                                       env=environ, stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.PIPE)
        _, rebuild_err = await rebuild.communicate()
        assert rebuild.returncode == 0, rebuild_err.decode()[-2000:]
        faults.append("trials rebuilt with the consumers live")
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - mlflow_down)))
        await asyncio.to_thread(own_mlflow_server.start)
        faults.append("MLflow stopped for 20 s")
        await kill_some(KILLS - 8)
        assert sum(f.startswith("kill") for f in faults) == KILLS, faults

        for thread in threads:
            await asyncio.to_thread(thread.join, 300)
        for publisher in publishers:
            assert await asyncio.to_thread(publisher.drain, 120), "a publisher could not deliver its spool"
        published = sum(p.stats.published for p in publishers)
        confirmed = sum(p.stats.confirmed for p in publishers)
        spooled = sum(p.stats.spooled for p in publishers)
        assert published == len(events)

        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), timeout=180,
                         what="the journal to hold every event")
        for name, expected in (("trials", len(events)), ("comparison", len(stops))):
            await wait_until(lambda n=name, x=expected: env.fetchval(
                "SELECT count(*) = $2 FROM applied_events WHERE projection = $1", n, x), timeout=180,
                what=f"{name} to catch up")
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM mlflow_runs WHERE status <> 'running'", len(stops)), timeout=240,
            what="every trial's MLflow run to be final")
        assert all(daemons.alive().values()), daemons.last_words()
    finally:
        supervisor.cancel()
        halt.set()
        for publisher in publishers:
            await asyncio.to_thread(publisher.close, 30)
        exits = daemons.stop()
    assert all(code == 0 for code in exits.values()), exits

    journal_ids = {str(r["event_id"]) for r in await env.fetch("SELECT event_id FROM events")}
    assert journal_ids == {str(e.event_id) for e in events}
    metric_events = sum(e.event_type == "ml.run.metric" for e in events)
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == metric_events
    # sn_comparison only adds: a stop applied twice would show in these counts.
    assert await env.fetchval("SELECT sum(trials) FROM sn_comparison WHERE model_run_id = '*'") == len(stops)

    live = await env.snapshot("trials", "trial_metrics", "sn_comparison")
    await env.replay("trials")
    await env.replay("comparison")
    assert await env.snapshot("trials", "trial_metrics", "sn_comparison") == live

    reconcile = subprocess.run([sys.executable, "-m", "sntrack", "reconcile"], env=environ, capture_output=True,
                               text=True, timeout=300)
    assert reconcile.returncode == 0, reconcile.stdout[-3000:] + reconcile.stderr[-2000:]

    # Only the poison, each at least once: a dead letter whose channel died between its confirm and its ack is
    # sent again for the redelivery (the runtime no longer sends one for a delivery whose channel is already gone).
    dead = {name: [m.body for m in await env.dead_letters(f"sntrack.{name}")] for name in CONSUMERS}
    assert all(set(bodies) == set(POISON) for bodies in dead.values()), dead
    print("dead letters per consumer:", {name: len(bodies) for name, bodies in dead.items()})

    print(f"\nchaos: {len(events)} events from {PUBLISHERS} publishers ({confirmed} confirmed directly, "
          f"{spooled} spooled and flushed); faults: {'; '.join(faults)}; daemon starts: {daemons.starts}; "
          f"journal {len(journal_ids)}, trial_metrics {metric_events}, stops counted once {len(stops)}; "
          f"replay equals live; reconcile clean; dead letters per queue {dead}")
