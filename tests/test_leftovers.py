"""Tests leave nothing behind: servers die with the session that started them; stale sandboxes are removed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from common.postgres import create_database, drop_database
from common.urls import with_path
from consumers.broker_admin import ROLES, ManagementApi, delete_vhost, user_name
from sntrack.mlflow_server import _alive, free_port
from sntrack.settings import Settings
from tests.conftest import TEST_PREFIX
from tests.sandbox import remove_stale, sandbox, session_id

STARTER = """
import sys
from pathlib import Path
from sntrack.mlflow_server import start
server = start(int(sys.argv[1]), f"sqlite:///{sys.argv[2]}/mlflow.db", Path(sys.argv[2]), die_with_parent=True)
print(server.pid, flush=True)
sys.stdin.read()
"""


def test_mlflow_server_dies_with_the_process_that_started_it(tmp_path):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(free_port()), str(tmp_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)
    finally:
        os.kill(starter.pid, signal.SIGKILL)  # as an interrupted session would end
        starter.wait()
    deadline = time.monotonic() + 60
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(server_pid), "the MLflow server outlived the process that started it"


async def test_stale_sandboxes_are_removed(env):
    prefix = f"sntrack-stale{session_id()}"  # this session's id: tests.broker_audit compares what it leaves
    old, fresh = "20000101000000-0123abcd", time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-0123abcd"
    names = {"old": (f"{prefix}-{old}", f"{prefix.replace('-', '_')}_{old.replace('-', '_')}"),
             "fresh": (f"{prefix}-{fresh}", f"{prefix.replace('-', '_')}_{fresh.replace('-', '_')}")}
    users = {age: f"{vhost}-worker" for age, (vhost, _) in names.items()}  # a sandbox's role user, as it names them
    for (vhost, database), user in zip(names.values(), users.values(), strict=True):
        env.api.request("PUT", f"vhosts/{vhost}", {})
        env.api.request("PUT", f"users/{user}", {"password_hash": "", "tags": ""})
        await asyncio.to_thread(create_database, with_path(env.settings.database_url, database))
    try:
        removed = await remove_stale(env.settings, prefix)
        assert sorted(removed) == sorted([*names["old"], users["old"]])
        vhosts = {v["name"] for v in env.api.request("GET", "vhosts")}
        assert names["fresh"][0] in vhosts and names["old"][0] not in vhosts
        databases = {r["datname"] for r in await env.fetch("SELECT datname FROM pg_database")}
        assert names["fresh"][1] in databases and names["old"][1] not in databases
        broker_users = {u["name"] for u in env.api.request("GET", "users")}
        assert users["fresh"] in broker_users and users["old"] not in broker_users
    finally:
        for (vhost, database), user in zip(names.values(), users.values(), strict=True):
            delete_vhost(env.api, vhost)
            env.api.request("DELETE", f"users/{user}")
            await asyncio.to_thread(drop_database, with_path(env.settings.database_url, database))


async def test_stale_roles_are_removed(env):
    prefix = f"sntrack-staleroles{os.getpid()}"
    old, fresh = (f"{prefix.replace('-', '_')}_{stamp}_0123abcd_writer"
                  for stamp in ("20000101000000", time.strftime("%Y%m%d%H%M%S", time.gmtime())))
    for role in (old, fresh):
        await env.fetch(f'CREATE ROLE "{role}" LOGIN')
    await env.fetch(f'GRANT CONNECT ON DATABASE "{env.database}" TO "{old}"')  # DROP ROLE alone would refuse
    try:
        assert await remove_stale(env.settings, prefix) == [old]
        assert {r["rolname"] for r in await env.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)",
                                                       [old, fresh])} == {fresh}
    finally:
        for role in (old, fresh):
            if await env.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role):
                await env.fetch(f'DROP OWNED BY "{role}"')
                await env.fetch(f'DROP ROLE "{role}"')


async def test_a_sandbox_creates_its_own_role_users_and_removes_them():
    base = Settings.from_env()
    api = ManagementApi(base.rabbitmq_admin_url)
    async with sandbox(base, prefix=TEST_PREFIX) as settings:
        vhost = settings.amqp_vhost
        users = {user_name(role, vhost) for role in ROLES}
        assert users <= {u["name"] for u in api.request("GET", "users")}
        for user in users:  # permissions on its own vhost only
            assert [p["vhost"] for p in api.request("GET", f"users/{user}/permissions")] == [vhost]
    assert not users & {u["name"] for u in api.request("GET", "users")}
    assert api.request("GET", f"vhosts/{vhost}") is None
