"""`sntrack up` (operations issue, item 8): the local stack in the foreground starts, applies events, and stops
cleanly on Ctrl-C or SIGTERM; a child that dies makes it stop the others and exit non-zero."""

import os
import signal
import socket
import subprocess
import sys
import threading

import aiohttp
import pytest

from producer.emitter import producer_info
from producer.sample import synthetic_study
from sntrack.mlflow_server import free_port
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env

CONSUMERS = ("journal", "trials", "comparison")


class Up:
    """`sntrack up` as a child of the test, its output collected line by line."""

    def __init__(self, env, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "sntrack", "up", *args], env=cli_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def pids(self) -> dict[str, int]:
        started = (line.split("started ", 1)[1] for line in list(self.lines) if line.startswith("up ") and
                   "| started " in line)
        return {name: int(pid.strip("()\n").split()[1]) for name, pid in (s.split(" ", 1) for s in started)}

    def finish(self, timeout: float = 90) -> int:
        returncode = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return returncode

    def output(self) -> str:
        return "".join(self.lines)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def dashboard_answers(port: int) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        try:
            return (await http.get(f"http://127.0.0.1:{port}/")).status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


async def start(env, port: int) -> Up:
    up = Up(env, "--consumers", *CONSUMERS, "--dashboard-port", str(port))
    for name in CONSUMERS:
        await wait_until(lambda q=f"sntrack.{name}": env.consumers(q) == 1, timeout=90, what=f"{name} to consume")
    await wait_until(lambda: dashboard_answers(port), timeout=60, what="the dashboard to answer")
    assert set(up.pids()) == {*CONSUMERS, "dashboard"}, up.output()
    return up


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_up_runs_the_stack_and_stops_cleanly(env, stop):
    port = free_port()
    up = await start(env, port)
    pids = up.pids()
    events = [e for trial in synthetic_study(5, 2, producer=producer_info(), seed=3) for e in trial]
    await env.publish_events(events)
    await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'",
                                          len(events)), timeout=60, what="the trials consumer to apply")
    up.proc.send_signal(stop)
    assert up.finish() == 0, up.output()
    output = up.output()
    assert all(gone(pid) for pid in pids.values()), output
    for name in CONSUMERS:  # each child's own lines, prefixed by its name
        assert any(line.startswith(f"{name:<10} | ") and "consumers running" in line for line in up.lines), output
    assert any(line.startswith("dashboard  | ") for line in up.lines), output
    assert "up         | stopped (cleanly)" in output
    await wait_until(lambda: env.consumers("sntrack.trials") == 0, what="no consumer left on sntrack.trials")


async def test_a_child_that_dies_stops_the_others_and_up_exits_non_zero(env):
    up = await start(env, free_port())
    pids = up.pids()
    os.kill(pids["trials"], signal.SIGKILL)
    assert up.finish() == 1, up.output()
    output = up.output()
    assert "trials exited unexpectedly (signal SIGKILL); stopping the others" in output
    assert all(gone(pid) for pid in pids.values()), output
    for name in ("journal", "comparison"):
        await wait_until(lambda q=f"sntrack.{name}": env.consumers(q) == 0, what=f"no consumer left on {name}")


def test_up_refuses_a_busy_dashboard_port_in_one_line(env):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "sntrack", "up", "--dashboard-port", str(port)],
                             env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in run.stderr


@pytest.mark.parametrize("command", [("up", "--dashboard-port"), ("dashboard", "--port")])
@pytest.mark.parametrize("port", ["99999", "-5"])
def test_a_dashboard_port_out_of_range_is_one_line(env, command, port):
    """socket.bind raises OverflowError, not OSError, for a port outside 0-65535: it was a traceback."""
    run = subprocess.run([sys.executable, "-m", "sntrack", *command, port], env=cli_env(env), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr[-1500:]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_a_stop_timeout_that_is_not_a_duration_is_refused_in_one_line(env, value):
    run = subprocess.run([sys.executable, "-m", "sntrack", "up", "--stop-timeout", value], env=cli_env(env),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--stop-timeout: must be a number of seconds" in run.stderr, run.stderr[-1500:]
