"""Studies as objects: list, show, archive/restore, hard delete with a tombstone and an audit, stored settings."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aio_pika
import asyncpg
import optuna
import pytest

from common.postgres import drop_database
from consumers.persistence import HOLD_AND_NOTIFY, apply_events
from consumers.registry import PROJECTIONS as REGISTRY
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from producer.search_space import SearchSpace
from producer.study import adopt_space, open_study
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env

PROJECTIONS = ["journal", "trials", "comparison"]


@pytest.fixture
async def storage(env):
    url = env.settings.database_url + "_optuna"
    yield url
    await asyncio.to_thread(drop_database, url)


def sntrack(env, *args: str, storage: str | None = None) -> subprocess.CompletedProcess:
    environ = {**cli_env(env), "SNTRACK_LOG_JSON": "true"}
    if storage:
        environ["SNTRACK_OPTUNA_STORAGE"] = storage
    return subprocess.run([sys.executable, "-m", "sntrack", *args], env=environ, capture_output=True, text=True,
                          timeout=300)


async def _record(env, events) -> None:
    """Publish and wait until every projection handled every event: applied it (recorded as applied; the journal
    records nothing), or ignored it as a removed study's (not recorded)."""
    removed = {r["model_run_id"] for r in await env.fetch("SELECT model_run_id FROM deleted_studies")}
    async with running_consumers(env.settings.consumer(), PROJECTIONS) as runtimes:
        await env.publish_events(events)
        for runtime in runtimes:
            name = runtime.handler.name
            received = [e for e in events if name != "comparison" or e.event_type == "ml.run.stop"]  # stops only
            expected = len(received)
            await wait_until(lambda r=runtime, n=expected: _handled(r, n), what=f"{name} handled", timeout=90)
            if not REGISTRY[name].dedupes_itself:
                ids = [e.event_id for e in received]
                applied = sum(e.model_run_id not in removed for e in received)
                assert await env.has_applied(name, applied, ids), name


async def _handled(runtime, expected: int) -> bool:
    return runtime.stats.handled >= expected


async def _two_studies(env) -> tuple[list, list]:
    doomed = [e for t in synthetic_study(6, 3, producer=producer_info(), model_run_id="doomed", seed=1) for e in t]
    kept = [e for t in synthetic_study(5, 3, producer=producer_info(), model_run_id="kept", seed=2) for e in t]
    await _record(env, doomed + kept)
    return doomed, kept


async def test_hard_delete_removes_everything(env, storage):
    doomed, kept = await _two_studies(env)
    open_study(storage, "doomed", dataset="wine", split_seed=0)
    before_kept = await env.fetchval("SELECT count(*) FROM trials WHERE model_run_id = 'kept'")

    run = sntrack(env, "studies", "delete", "doomed", "--hard", storage=storage)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("removed doomed for good: ") and "Optuna study deleted" in run.stdout, run.stdout

    assert await env.fetchval("SELECT count(*) FROM events WHERE model_run_id = 'doomed'") == 0
    assert await env.fetchval("SELECT count(*) FROM trials WHERE model_run_id = 'doomed'") == 0
    assert await env.fetchval("SELECT count(*) FROM trial_metrics WHERE trial_id LIKE 'doomed%'") == 0
    assert await env.fetchval("SELECT count(*) FROM sn_comparison WHERE model_run_id = 'doomed'") == 0
    assert await env.fetchval("SELECT count(*) FROM applied_events WHERE event_id = ANY($1::uuid[])",
                              [e.event_id for e in doomed]) == 0
    assert await env.fetchval("SELECT count(*) FROM events") == len(kept)
    assert await env.fetchval("SELECT count(*) FROM trials WHERE model_run_id = 'kept'") == before_kept == 5
    audit = (await env.fetch("SELECT * FROM study_audit WHERE model_run_id = 'doomed'"))[0]
    assert audit["action"] == "delete" and "as " in audit["actor"]
    counts = json.loads(audit["counts"])
    assert counts["events"] == len(doomed) and counts["trials"] == 6 and counts["mlflow_runs_deleted"] == 0
    with pytest.raises(KeyError):
        optuna.load_study(study_name="doomed", storage=storage.replace("postgresql://", "postgresql+psycopg2://"))

    # the all-studies comparison rows now equal what a replay of the remaining journal builds
    live = await env.snapshot("sn_comparison", "trials", "trial_metrics")
    for name in ("comparison", "trials"):
        await env.replay(name)
    assert await env.snapshot("sn_comparison", "trials", "trial_metrics") == live

    conn = await env.db()
    try:
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM events WHERE model_run_id = 'kept'")
    finally:
        await conn.close()


async def test_late_events_of_a_deleted_study_are_ignored(env, storage):
    doomed, _ = await _two_studies(env)
    assert sntrack(env, "studies", "delete", "doomed", "--hard", storage=storage).returncode == 0
    await _record(env, doomed)  # the same events arrive again, late: not applied, and not recorded as applied
    for table, column in (("events", "model_run_id"), ("trials", "model_run_id"), ("sn_comparison", "model_run_id")):
        assert await env.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = 'doomed'") == 0, table
    # Had they been recorded, the replay's swap would wait for the journal to hold them, then give up.
    assert (await env.replay("trials")).events == await env.fetchval("SELECT count(*) FROM events")
    listed = sntrack(env, "studies", "list")
    assert "doomed" not in listed.stdout and "kept" in listed.stdout


async def test_the_journal_records_nothing_but_waits_for_a_hard_delete_and_sees_its_tombstone(env):
    """The journal keeps no applied_events rows, so its batch must still take the lock a recording INSERT takes (the
    hard delete's EXCLUSIVE lock orders them) and a transaction id before its first write (the replay fence)."""
    study = [e for t in synthetic_study(1, 2, producer=producer_info(), model_run_id="doomed", seed=4) for e in t]
    deleter, journal = await env.db(), await env.db()
    try:
        async with journal.transaction():  # the statement alone, before the journal's own INSERT would take one
            await journal.fetch(HOLD_AND_NOTIFY, "journal", [e.event_id for e in study],
                                [e.model_run_id for e in study], [e.trial_id for e in study])
            assert await journal.fetchval("SELECT pg_current_xact_id_if_assigned()") is not None
        holding = deleter.transaction()
        await holding.start()
        await deleter.execute("LOCK TABLE applied_events IN EXCLUSIVE MODE")  # as studies.hard_delete does
        async with journal.transaction():
            waiting = asyncio.create_task(apply_events(journal, REGISTRY["journal"], study))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "the journal's batch must wait for the hard delete"
            await deleter.execute("INSERT INTO deleted_studies (model_run_id) VALUES ('doomed')")
            await holding.commit()
            assert await waiting == 0  # its snapshot, taken after the lock, sees the tombstone
        assert await env.fetchval("SELECT count(*) FROM applied_events") == 0
    finally:
        await deleter.close()
        await journal.close()


async def test_soft_delete_archives_and_restores(env):
    await _two_studies(env)
    listed = sntrack(env, "studies", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:2] == ["study", "dataset"] and len(rows) == 2
    assert rows[0].startswith("doomed") and ("sn: " in rows[0] or "baseline: " in rows[0]), rows

    run = sntrack(env, "studies", "delete", "doomed")
    assert run.returncode == 0 and run.stdout.startswith("archived doomed"), run.stderr
    assert "doomed" not in sntrack(env, "studies", "list").stdout
    assert "doomed (archived)" in sntrack(env, "studies", "list", "--all").stdout
    assert await env.fetchval("SELECT count(*) FROM trials WHERE model_run_id = 'doomed'") == 6  # nothing removed

    run = sntrack(env, "studies", "restore", "doomed")
    assert run.returncode == 0 and run.stdout.startswith("restored doomed"), run.stderr
    assert [r["action"] for r in await env.fetch("SELECT action FROM study_audit ORDER BY id")] == [
        "archive", "restore"]


async def test_unknown_study_lists_close_matches(env):
    await _two_studies(env)
    for args in (("studies", "show", "doomd"), ("studies", "delete", "doomd", "--hard")):
        run = sntrack(env, *args)
        assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
        assert "no study named 'doomd'; did you mean doomed?" in run.stderr
    assert await env.fetchval("SELECT count(*) FROM events WHERE model_run_id = 'doomed'") > 0


async def test_study_remembers_its_settings(env, storage):
    space = SearchSpace.load(overrides={"epochs": "5"})
    study = open_study(storage, "remember", dataset="wine", split_seed=0)
    adopt_space(study, space, {"epochs"})

    again = open_study(storage, "remember", dataset=None, split_seed=0)  # no --dataset: the study's own
    assert again.user_attrs["dataset"] == "wine"
    assert adopt_space(again, SearchSpace.load(), set()).dimensions["epochs"].value == 5

    run = sntrack(env, "worker", "--study", "remember", "--epochs", "8", "--no-mlflow", storage=storage)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "was created with --epochs 5, not 8" in run.stderr

    shown = sntrack(env, "studies", "show", "remember", storage=storage)
    assert shown.returncode == 2 and "no study named 'remember'" in shown.stderr  # not in the read model yet


async def test_hard_delete_while_consumers_apply_leaves_nothing(env, storage):
    """Events of the study keep arriving while it is removed: whatever was applied before goes with it, whatever
    comes after meets the tombstone; nothing of it remains once the queues are drained."""
    doomed = [e for t in synthetic_study(1000, 5, producer=producer_info(), model_run_id="busy", seed=4) for e in t]
    deleted = asyncio.Event()
    after_delete = 0

    async def publish() -> None:
        """Chunks until three have gone out after the delete returned (however slow the command starts)."""
        nonlocal after_delete
        for start in range(0, len(doomed), 40):
            await env.publish_events(doomed[start:start + 40])
            after_delete += deleted.is_set()
            if after_delete >= 3:
                return
            await asyncio.sleep(0.05)

    async with running_consumers(env.settings.consumer(), PROJECTIONS):
        publishing = asyncio.create_task(publish())
        await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM trials WHERE model_run_id = 'busy'"),
                         what="first trials applied")
        run = await asyncio.to_thread(sntrack, env, "studies", "delete", "busy", "--hard", storage=storage)
        deleted.set()
        assert run.returncode == 0, run.stderr
        await publishing
        assert after_delete > 0, "the study's events all arrived before the delete: nothing raced it"
        for queue in ("sntrack.journal", "sntrack.trials", "sntrack.comparison"):
            await wait_until(lambda q=queue: _drained(env, q), timeout=120, interval=1, what=f"{queue} drained")
    for table in ("events", "trials", "sn_comparison"):
        assert await env.fetchval(f"SELECT count(*) FROM {table} WHERE model_run_id = 'busy'") == 0, table
    assert await env.fetchval("SELECT count(*) FROM trial_metrics WHERE trial_id LIKE 'busy-%'") == 0
    assert await env.fetchval("SELECT count(*) FROM sn_comparison") == 0  # the '*' rows held only this study


async def _drained(env, queue: str) -> bool:
    """No message ready, asked of the broker itself (a passive declare), not the lagging management API."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return declared.declaration_result.message_count == 0
    finally:
        await connection.close()


async def test_an_archived_study_is_left_out_of_a_report_over_every_study(env):
    doomed, kept = await _two_studies(env)
    assert sntrack(env, "studies", "delete", "doomed").returncode == 0

    def reported(*args: str) -> int:
        run = sntrack(env, "report", "--format", "json", *args)
        assert run.returncode == 0, run.stderr
        arms = json.loads(run.stdout)["arms"]
        return sum(arm["trials"]["total"] for arm in arms.values())

    assert reported() == 5  # kept only
    assert reported("--run", "doomed") == 6  # naming an archived study still reports it
    assert sntrack(env, "studies", "restore", "doomed").returncode == 0
    assert reported() == 11
