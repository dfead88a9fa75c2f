"""A killed worker loses nothing it reported: real worker processes, real Optuna storage, broker and consumers.

- SIGKILL right after Optuna recorded a trial as finished: the trial's stop is already in the spool.
- SIGKILL mid-trial: another worker on the study reports the trial failed (`worker_lost`), never left running.
- Two Ctrl-C: the second one skips the wait for the broker, and what was in memory is in the spool.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
from asyncio.subprocess import PIPE
from contextlib import contextmanager

import asyncpg
import optuna
from optuna.trial import TrialState

from consumers.service import running_consumers
from producer.study import rdb_storage
from tests.conftest import wait_until
from tests.test_worker_pipeline import FAST, storage, worker_command  # noqa: F401


@contextmanager
def silent_broker():
    """An AMQP URL whose server accepts the TCP connection and never answers: events stay in memory until
    the publisher's connect timeout spools them."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/sntrack"
    finally:
        server.close()


def spooled_events(spool_dir) -> list[dict]:
    return [json.loads(line) for path in sorted(spool_dir.glob("*.jsonl"))
            for line in path.read_bytes().splitlines() if line.strip()]


def optuna_trials(storage_url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=rdb_storage(storage_url)).get_trials(deepcopy=False)


async def _intermediate_values(storage_url: str, study: str) -> int:
    """The epochs Optuna holds for the study, read with plain SQL: opening an RDBStorage would create Optuna's tables,
    racing the worker's own creation of them (UniqueViolation on the enum type, seen in a full run)."""
    try:
        conn = await asyncpg.connect(storage_url)
    except (OSError, asyncpg.PostgresError):  # the worker has not created the database yet
        return 0
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM trial_intermediate_values v JOIN trials t USING (trial_id) "
            "JOIN studies s USING (study_id) WHERE s.study_name = $1", study)
    except asyncpg.UndefinedTableError:  # nor its tables
        return 0
    finally:
        await conn.close()


_KILLED_AFTER_TELL = textwrap.dedent("""
    import os, signal, sys
    from producer.emitter import producer_info
    from producer.publisher import EventPublisher
    from producer.search_space import SearchSpace
    from producer.study import Worker, WorkerPlan, open_study
    from producer.tracking import Tracker
    from sntrack.settings import Settings

    storage, overrides = sys.argv[1], dict(arg.split("=") for arg in sys.argv[2:])
    study = open_study(storage, "killed", dataset="wine", split_seed=0)
    space = SearchSpace.load(overrides=overrides)
    publisher = EventPublisher(Settings.from_env().publisher()).start()
    tracker = Tracker(publisher, producer_info("doomed"))
    kill = lambda result: os.kill(os.getpid(), signal.SIGKILL)  # the moment after Optuna's tell
    Worker(study, space, WorkerPlan(3), lambda trial_id: tracker.trial(trial_id, "killed"), on_trial=kill).run()
""")


async def test_sigkill_right_after_optuna_records_the_trial_finds_its_stop_spooled(env, storage):  # noqa: F811
    with silent_broker() as url:
        environ = {**os.environ, **env.settings.to_env(), "SNTRACK_AMQP_URL": url,
                   "SNTRACK_PUBLISH_CONFIRM_TIMEOUT_S": "5", "PYTHONPATH": os.getcwd()}
        overrides = [f"{k}={v}" for k, v in FAST.items()]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _KILLED_AFTER_TELL, storage, *overrides,
                                                    env=environ, stderr=PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    (trial,) = optuna_trials(storage, "killed")
    assert trial.state == TrialState.COMPLETE
    events = [e for e in spooled_events(env.settings.spool_dir) if e["trial_id"] == trial.user_attrs["trial_id"]]
    assert [e["seq"] for e in events] == list(range(5)), "start, 3 metrics and the stop, all in the spool"
    assert events[-1]["event_type"] == "ml.run.stop" and events[-1]["payload"]["status"] == "completed"


async def test_a_trial_whose_worker_was_killed_is_reported_lost_by_another_worker(env, storage):  # noqa: F811
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        command, environ = worker_command(env, storage, "lost", "--no-mlflow")
        environ["SNTRACK_WORKER_HEARTBEAT_S"] = "1"
        doomed = await asyncio.create_subprocess_exec(*command, "--n-trials", "1", "--epochs", "2000",
                                                      env=environ, stderr=PIPE)
        await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM trial_metrics"), timeout=90,
                         what="the doomed worker's first epoch")
        doomed.kill()
        await doomed.wait()
        (running,) = optuna_trials(storage, "lost")
        assert running.state == TrialState.RUNNING
        await asyncio.sleep(3)  # past the grace period (2 heartbeats)

        # The study remembers --epochs 2000; the survivor takes it (a different flag would be refused).
        survivor_command = [arg for arg in command if not arg.startswith("--epochs=")]
        survivor = await asyncio.create_subprocess_exec(*survivor_command, "--n-trials", "1", env=environ,
                                                        stderr=PIPE)
        _, err = await asyncio.wait_for(survivor.communicate(), 180)
        assert survivor.returncode == 0, err.decode()[-2000:]
        lost_id = running.user_attrs["trial_id"]
        await wait_until(lambda: env.fetchval("SELECT status <> 'running' FROM trials WHERE id = $1", lost_id),
                         timeout=30, what="the lost trial's stop")
        row = (await env.fetch("SELECT status, error_type, error_message FROM trials WHERE id = $1", lost_id))[0]
        statuses = await env.fetch("SELECT status FROM trials WHERE model_run_id = 'lost' AND id <> $1", lost_id)
    assert (row["status"], row["error_type"]) == ("failed", "worker_lost"), dict(row)
    assert [r["status"] for r in statuses] == ["completed"]
    by_id = {t.user_attrs["trial_id"]: t.state for t in optuna_trials(storage, "lost")}
    assert by_id[lost_id] == TrialState.FAIL


async def test_second_ctrl_c_during_shutdown_still_spools_what_is_in_memory(env, storage):  # noqa: F811
    with silent_broker() as url:
        # The median pruner never prunes a study's first trial; it makes each epoch visible in Optuna (report()).
        command, environ = worker_command(env, storage, "twice", "--no-mlflow", "--n-trials", "1",
                                          "--pruner", "median")
        environ.update({"SNTRACK_AMQP_URL": url, "SNTRACK_PUBLISH_CONFIRM_TIMEOUT_S": "600"})
        proc = await asyncio.create_subprocess_exec(*command, env=environ, stderr=PIPE)

        async def training() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the worker exited early: {(await proc.stderr.read()).decode()[-2000:]}")
            return await _intermediate_values(storage, "twice") == 2
        await wait_until(training, timeout=120, what="two of the trial's three epochs")
        # The last epoch ends the trial; then the worker waits for the broker to take the trial's events.
        await asyncio.sleep(3)
        proc.send_signal(signal.SIGINT)  # first: stop after this trial
        await asyncio.sleep(1)
        proc.send_signal(signal.SIGINT)  # second: stop waiting for the broker
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, err.decode()[-2000:]
    events = spooled_events(env.settings.spool_dir)
    assert [e["seq"] for e in events] == list(range(5)), err.decode()[-3000:]
    assert events[-1]["event_type"] == "ml.run.stop" and events[-1]["payload"]["status"] == "completed"
