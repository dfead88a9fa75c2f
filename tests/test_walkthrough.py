"""README's by-hand walkthrough, command by command, through the real command line on a tiny study.

The commands are read from README.md (between the `walkthrough` markers), so README and test cannot drift apart;
each output line the README quotes is checked."""

from __future__ import annotations

import asyncio
import csv
import io
import shlex
import signal
import subprocess
import sys

import pytest

from common.postgres import drop_database
from tests.test_end_to_end import cli_env
from tests.test_readme import readme_block


@pytest.fixture
async def optuna_storage(env):
    url = env.settings.database_url + "_optuna"
    yield url
    await asyncio.to_thread(drop_database, url)


def readme_commands() -> list[str]:
    block = readme_block("walkthrough").split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


async def test_readme_walkthrough(env, optuna_storage, tmp_path):
    environ = {**cli_env(env), "SNTRACK_OPTUNA_STORAGE": optuna_storage, "SNTRACK_LOG_JSON": "true"}
    consumers: subprocess.Popen | None = None
    outputs: dict[str, subprocess.CompletedProcess] = {}
    try:
        for line in readme_commands():
            if line == "kill %1":
                consumers.send_signal(signal.SIGTERM)
                assert consumers.wait(timeout=60) == 0
                continue
            if "TRIAL_ID" in line:
                first = next(csv.DictReader(io.StringIO((tmp_path / "first.csv").read_text())))
                line = line.replace("TRIAL_ID", first["trial_id"])
            words = shlex.split(line.removesuffix("&"))
            assert words[0] == "sntrack", line
            command = [sys.executable, "-m", "sntrack", *words[1:]]
            if line.endswith("&"):
                consumers = subprocess.Popen(  # noqa: ASYNC220 (a daemon for the rest of the test)
                    command, env=environ, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                continue
            run = subprocess.run(command, env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, (line, run.stderr[-2000:])
            outputs[" ".join(words[1:3])] = run
    finally:
        if consumers is not None and consumers.poll() is None:
            consumers.kill()
            consumers.wait()

    migrate = outputs["db migrate"].stdout.strip()
    assert migrate == "schema is up to date" or migrate.startswith("applied "), migrate
    assert outputs["worker --study"].stderr.strip().splitlines()[-1] == "first: 4 trials (4 completed)"
    status = outputs["status --wait-idle"].stdout.splitlines()
    assert status[0].startswith("journal: ") and "  spectral_norm=true   completed 2" in status
    assert "  spectral_norm=false  completed 2" in status
    # The local defaults log in as PostgreSQL's superuser and the broker's administrator: the only warnings (README:
    # Production set-up and security).
    assert all("a PostgreSQL superuser" in s or "a broker administrator" in s for s in status if "warning" in s)
    listed = outputs["studies list"].stdout.splitlines()
    assert listed[1].split()[:2] == ["first", "wine"]
    assert listed[1].endswith("sn: 2 completed  baseline: 2 completed"), listed
    shown = outputs["studies show"].stdout.splitlines()
    assert shown[0] == "study first" and "  dataset    wine   split seed 0" in shown
    assert "    --epochs           3" in shown and "    --spectral-norm    true,false" in shown
    assert outputs["report --run"].stdout.strip()
    assert outputs["export --run"].stderr.strip() == "wrote 4 rows to first.csv"
    shown = outputs["trial show"].stdout.splitlines()
    assert shown[0].startswith("trial first-") and " study first " in shown[0]
    assert any(s.strip().startswith("val_accuracy") for s in shown)
