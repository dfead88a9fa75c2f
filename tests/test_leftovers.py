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
from consumers.broker_admin import delete_vhost
from sntrack.mlflow_server import _alive, free_port
from tests.sandbox import remove_stale

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
    prefix = f"sntrack-stale{os.getpid()}"
    old, fresh = "20000101000000-0123abcd", time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-0123abcd"
    names = {"old": (f"{prefix}-{old}", f"{prefix.replace('-', '_')}_{old.replace('-', '_')}"),
             "fresh": (f"{prefix}-{fresh}", f"{prefix.replace('-', '_')}_{fresh.replace('-', '_')}")}
    for vhost, database in names.values():
        env.api.request("PUT", f"vhosts/{vhost}", {})
        await asyncio.to_thread(create_database, with_path(env.settings.database_url, database))
    try:
        removed = await remove_stale(env.settings, prefix)
        assert sorted(removed) == sorted(names["old"])
        vhosts = {v["name"] for v in env.api.request("GET", "vhosts")}
        assert names["fresh"][0] in vhosts and names["old"][0] not in vhosts
        databases = {r["datname"] for r in await env.fetch("SELECT datname FROM pg_database")}
        assert names["fresh"][1] in databases and names["old"][1] not in databases
    finally:
        for vhost, database in names.values():
            if env.api.request("GET", f"vhosts/{vhost}") is not None:
                delete_vhost(env.api, vhost)
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
