"""Every configuration mistake a new user makes is one line on stderr and exit 2, before any work starts (issue 16).

Each case runs the real command line in a subprocess against the real servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from common.postgres import create_database, drop_database
from common.urls import with_path
from consumers.persistence import apply_events
from consumers.registry import PROJECTIONS
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.test_end_to_end import cli_env


@pytest.fixture
async def bare_database(env):
    """A database that exists but was never migrated."""
    url = env.settings.database_url + "_bare"
    await asyncio.to_thread(create_database, url)
    yield url
    await asyncio.to_thread(drop_database, url)
    await asyncio.to_thread(drop_database, url + "_optuna")  # the worker case's Optuna storage


def _as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}").geturl()


# (case, extra environment built from (env, bare database url), arguments, words the line must contain)
CASES = [
    ("status as a missing role", lambda e, b: {"SNTRACK_DATABASE_URL": _as_role(e.settings.database_url, "nobody")},
     ["status"], ['role "nobody" does not exist']),
    ("report as a missing role", lambda e, b: {"SNTRACK_DATABASE_URL": _as_role(e.settings.database_url, "nobody")},
     ["report"], ['role "nobody" does not exist']),
    ("reconcile as a missing role", lambda e, b: {"SNTRACK_DATABASE_URL": _as_role(e.settings.database_url, "nobody"),
                                                  "SNTRACK_MLFLOW_ENABLED": "true"},
     ["reconcile"], ['role "nobody" does not exist']),
    ("replay as a missing role", lambda e, b: {"SNTRACK_DATABASE_URL": _as_role(e.settings.database_url, "nobody")},
     ["replay", "trials"], ['role "nobody" does not exist']),
    ("status on a database without schema", lambda e, b: {"SNTRACK_DATABASE_URL": b},
     ["status"], ["sntrack db migrate"]),
    ("replay on a database without schema", lambda e, b: {"SNTRACK_DATABASE_URL": b},
     ["replay", "trials"], ["sntrack db migrate"]),
    ("consume with a wrong vhost", lambda e, b: {"SNTRACK_AMQP_URL": with_path(e.settings.amqp_url, "no-such-vhost")},
     ["consume", "journal"], ["refused vhost 'no-such-vhost'"]),
    ("worker with a wrong vhost", lambda e, b: {"SNTRACK_AMQP_URL": with_path(e.settings.amqp_url, "no-such-vhost"),
                                                "SNTRACK_OPTUNA_STORAGE": b + "_optuna"},
     ["worker", "--study", "s", "--n-trials", "1", "--epochs", "1", "--no-mlflow"], ["refused vhost 'no-such-vhost'"]),
    ("worker --spectral-norm yes", lambda e, b: {}, ["worker", "--study", "s", "--spectral-norm", "yes"],
     ["--spectral-norm", "yes is not true or false"]),
    ("worker --lr abc", lambda e, b: {}, ["worker", "--study", "s", "--lr", "abc"], ["--lr", "abc is not a number"]),
    ("worker --epochs 0", lambda e, b: {}, ["worker", "--study", "s", "--epochs", "0"], ["0 is below 1"]),
    ("status --wait-idle -3", lambda e, b: {}, ["status", "--wait-idle", "-3"], ["--wait-idle", "'-3'"]),
    ("topology apply --user-prefix ''", lambda e, b: {}, ["topology", "apply", "--user-prefix", ""],
     ["--user-prefix", "must be 1-64 of letters"]),
    ("export to a missing folder", lambda e, b: {}, ["export", "--run", "s", "--output", "/nonexistent/dir/x.csv"],
     ["folder '/nonexistent/dir' does not exist"]),
    ("export of an unknown study", lambda e, b: {}, ["export", "--run", "no-such-study"],
     ["no study named 'no-such-study'"]),
    ("trial show of an unknown trial", lambda e, b: {}, ["trial", "show", "no-such-trial"],
     ["no trial 'no-such-trial'"]),
    ("an unknown command", lambda e, b: {}, ["stauts"], ["invalid choice: 'stauts'"]),
]


@pytest.mark.parametrize("case, extra, args, words", CASES, ids=[c[0] for c in CASES])
async def test_configuration_mistake_is_one_line_and_exit_2(env, bare_database, case, extra, args, words):
    environ = {**cli_env(env), "SNTRACK_LOG_JSON": "true", **extra(env, bare_database)}
    run = subprocess.run([sys.executable, "-m", "sntrack", *args], env=environ, capture_output=True, text=True,
                         timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (case, run.returncode, run.stderr)
    assert len(lines) == 1, (case, run.stderr)
    assert lines[0].startswith("sntrack"), lines[0]
    assert "Traceback" not in run.stderr and run.stdout == ""
    for word in words:
        assert word in lines[0], (case, lines[0])
    if case == "worker with a wrong vhost":  # refused before anything was created
        assert not await env.fetchval("SELECT 1 FROM pg_database WHERE datname = $1",
                                      urlsplit(bare_database).path[1:] + "_optuna")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_export_to_a_full_device_is_one_line_and_exit_2(env, fmt):
    study = synthetic_study(4, 2, seed=1, producer=producer_info(), model_run_id="full")
    conn = await env.db()
    try:
        await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
    finally:
        await conn.close()
    run = subprocess.run([sys.executable, "-m", "sntrack", "export", "--run", "full", "--format", fmt,
                          "--output", "/dev/full"], env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == ["sntrack: cannot write /dev/full: No space left on device"]


async def _record(env, study) -> None:
    """The study applied by the journal, trials and comparison projections, as the consumers would."""
    conn = await env.db()
    try:
        for name in ("journal", "trials", "comparison"):
            await apply_events(conn, PROJECTIONS[name], [e for trial in study for e in trial])
    finally:
        await conn.close()


def _report_into_a_full_device(env) -> subprocess.CompletedProcess:
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-m", "sntrack", "report", "--run", "full"], env=cli_env(env),
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)


async def test_a_report_to_a_full_standard_output_is_one_line_and_exit_2(env):
    study = synthetic_study(40, 3, seed=2, producer=producer_info(), model_run_id="full", paired=True)
    await _record(env, study)
    run = await asyncio.to_thread(_report_into_a_full_device, env)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == ["sntrack: cannot write the output: No space left on device"]


async def test_a_small_study_reports_without_numerical_warnings(env):
    study = synthetic_study(6, 2, seed=2, producer=producer_info(), model_run_id="small")
    await _record(env, study)
    run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sntrack", "report", "--run", "small"],
                                  env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "verdict:" in run.stdout, run.stderr[-2000:]
    assert "Warning" not in run.stderr, run.stderr


async def test_a_report_on_a_schema_older_than_sntrack_says_to_migrate(env):
    """A database last migrated by an older sntrack (here: without migration 014's columns) is one line."""
    await _record(env, synthetic_study(4, 2, seed=2, producer=producer_info(), model_run_id="older"))
    conn = await env.db()
    try:
        await conn.execute("ALTER TABLE trials DROP COLUMN final_val_accuracy, DROP COLUMN final_train_accuracy, "
                           "DROP COLUMN final_duration_ms, DROP COLUMN hyperparams_text, DROP COLUMN last_sigmas_text")
    finally:
        await conn.close()
    run = subprocess.run([sys.executable, "-m", "sntrack", "report", "--run", "older"], env=cli_env(env),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1
    assert "older than this sntrack" in run.stderr and "run `sntrack db migrate`" in run.stderr
    assert "final_val_accuracy" in run.stderr


def test_a_report_started_with_its_standard_output_closed_is_one_line_and_exit_2():
    """`sntrack report >&-` says so before it reads anything (it used to fail with a traceback after the read)."""
    run = subprocess.run(["/bin/sh", "-c", 'exec "$0" -m sntrack report >&-', sys.executable], capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "SNTRACK_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "sntrack: the standard output is closed: redirect it, e.g. sntrack report > report.txt"]
