"""`sntrack status`: the daemons' own logins, the table even when waiting times out, idle queues and lag."""

from __future__ import annotations

import secrets
import subprocess
import sys

from common.urls import with_login
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.test_end_to_end import cli_env
from tests.test_studies import _record, sntrack


async def test_wrong_amqp_password_is_not_healthy(env):
    url = env.settings.amqp_url.replace("guest:guest", "guest:wrong-pass")
    run = _status(env, {"SNTRACK_AMQP_URL": url})
    assert run.returncode == 2 and "refused the credentials" in run.stderr and "wrong-pass" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and run.stdout == ""


async def test_timeout_still_shows_the_table_and_says_why(env):
    events = [e for t in synthetic_study(2, 2, producer=producer_info(), model_run_id="idle") for e in t]
    await env.publish_events(events)  # no consumer is running
    run = sntrack(env, "status", "--wait-idle", "2")
    assert run.returncode == 1
    assert run.stderr.strip() == "consumers did not catch up within 2 s"
    assert run.stdout.startswith("journal: 0 events")
    assert "warning: no consumer on sntrack.trials" in run.stdout


async def test_read_model_behind_the_journal_is_said(env):
    trials = synthetic_study(3, 2, producer=producer_info(), model_run_id="lag")
    await _record(env, [e for t in trials for e in t])
    conn = await env.db()
    try:
        await conn.execute("DELETE FROM trials WHERE id = $1", trials[0][0].trial_id)  # as if not applied yet
    finally:
        await conn.close()
    run = sntrack(env, "status")
    assert run.returncode == 0, run.stderr
    assert "warning: the read model is behind the journal by 1 trials" in run.stdout


async def test_a_superuser_database_login_is_warned_about(env):
    """The sandbox logs in as PostgreSQL's `postgres`; the writer role's login gets no such line
    (tests/test_db_roles.py::test_daemons_run_as_the_writer_reports_as_the_reader_and_a_replay_keeps_both_working)."""
    run = sntrack(env, "status")
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stdout.splitlines() if "superuser" in line]
    user = env.settings.database_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[0]
    assert said == [f"warning: SNTRACK_DATABASE_URL logs in as {user}, a PostgreSQL superuser; give the daemons the "
                    "writer role (`sntrack db migrate --roles`, README: Production set-up and security)"]


async def test_status_warns_when_a_daemon_logs_in_as_a_broker_administrator(env):
    as_admin = sntrack(env, "status")  # the sandbox's SNTRACK_AMQP_URL logs in as the administrator guest
    assert as_admin.returncode == 0, as_admin.stderr
    assert "warning: SNTRACK_AMQP_URL logs in as 'guest', a broker administrator" in as_admin.stdout
    roles = {"SNTRACK_AMQP_URL": env.roles["consumer"], "SNTRACK_GATEWAY_AMQP_URL": env.roles["gateway"]}
    as_roles = _status(env, roles)
    assert as_roles.returncode == 0, as_roles.stderr
    assert "administrator" not in as_roles.stdout + as_roles.stderr
    gateway_as_admin = _status(env, {**roles, "SNTRACK_GATEWAY_AMQP_URL": env.settings.amqp_url})
    assert "warning: SNTRACK_GATEWAY_AMQP_URL logs in as 'guest', a broker administrator" in gateway_as_admin.stdout
    assert "warning: SNTRACK_AMQP_URL" not in gateway_as_admin.stdout


async def test_status_says_when_it_cannot_check_for_an_administrator(env):
    # A management API user that may list the vhost's queues but not users (the monitoring tag), created here and
    # removed.
    monitor, password = f"{env.vhost}-monitor", secrets.token_urlsafe(12)
    env.api.request("PUT", f"users/{monitor}", {"password": password, "tags": "monitoring"})
    env.api.request("PUT", f"permissions/{env.vhost}/{monitor}", {"configure": "^$", "write": "^$", "read": "^$"})
    try:
        admin_url = with_login(env.settings.rabbitmq_admin_url, monitor, password)
        run = _status(env, {"SNTRACK_RABBITMQ_ADMIN_URL": admin_url})
    finally:
        env.api.request("DELETE", f"users/{monitor}")
    assert run.returncode == 0, run.stderr
    assert "note: could not check whether SNTRACK_AMQP_URL's user 'guest' is a broker administrator" in run.stdout
    assert password not in run.stdout + run.stderr


def _status(env, extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", "status"], env={**cli_env(env), **extra},
                          capture_output=True, text=True, timeout=60)
