"""Run child processes in the foreground, their output prefixed by name, as one unit (`sntrack up`).

- Every line a child writes (stdout and stderr) is printed as `name | line`.
- `stop` set (SIGINT/SIGTERM to the supervisor): SIGTERM to every child, wait up to `stop_timeout` s, then SIGKILL
  what is left. 0 when every child stopped cleanly (exit 0, or the SIGTERM's own death).
- A child that exits unasked (a `may_finish` child exiting 0 is done, not dead) stops the others the same way: 1.

Children run in sessions of their own, so a Ctrl-C in the terminal reaches the supervisor alone and each child gets
exactly one SIGTERM; on Linux they also get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

LINE_LIMIT = 16 * 1024 * 1024  # a child's longest line (a JSON log line with a traceback)
PR_SET_PDEATHSIG = 1
# After the SIGTERM it was sent, a child stopped cleanly when it exited 0 or died of that SIGTERM, as systemd counts
# it (uvicorn, under `sntrack dashboard`, re-raises the signal once it has shut down).
CLEAN_STOP = (0, -signal.SIGTERM)


@dataclass(frozen=True)
class Child:
    name: str
    argv: Sequence[str]
    may_finish: bool = False  # exiting 0 means its work is done (a worker that ran its trials), not that it died


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


class Supervisor:
    def __init__(self, children: Sequence[Child], out: TextIO, stop_timeout: float, env: dict[str, str]):
        self.children = {c.name: c for c in children}
        self.out = out
        self.stop_timeout = stop_timeout
        self.env = env
        self.width = max(len(name) for name in (*self.children, "up"))
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def say(self, name: str, text: str) -> None:
        self.out.write(f"{name:<{self.width}} | {text}\n")
        self.out.flush()

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.say(name, line.decode(errors="replace").rstrip("\n"))

    async def run(self, stop: asyncio.Event) -> int:
        pumps = []
        for child in self.children.values():
            proc = await asyncio.create_subprocess_exec(
                *child.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
                env=self.env, limit=LINE_LIMIT)
            self.procs[child.name] = proc
            self.say("up", f"started {child.name} (pid {proc.pid})")
            pumps.append(asyncio.create_task(self._pump(child.name, proc.stdout)))
        exits = {asyncio.create_task(proc.wait()): name for name, proc in self.procs.items()}
        stopping = asyncio.create_task(stop.wait())
        code = await self._watch(exits, stopping)
        stopping.cancel()
        if not await self._stop_all(set(exits) - {t for t in exits if t.done()}, exits):
            code = 1
        await asyncio.gather(*pumps)
        self.say("up", f"stopped ({'cleanly' if code == 0 else 'a child failed'})")
        return code

    async def _watch(self, exits: dict[asyncio.Task, str], stopping: asyncio.Task) -> int:
        """Until `stop` or a child's death: 0 for a stop, 1 for a death."""
        running = set(exits)
        while True:
            done, _ = await asyncio.wait({*running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                self.say("up", "stopping: SIGTERM to every child")
                return 0
            for task in done:
                running.discard(task)
                name, returncode = exits[task], task.result()
                if returncode == 0 and self.children[name].may_finish:
                    self.say("up", f"{name} finished")
                    continue
                self.say("up", f"{name} exited unexpectedly ({describe(returncode)}); stopping the others")
                return 1
            if not running:
                return 0

    async def _stop_all(self, running: set[asyncio.Task], exits: dict[asyncio.Task, str]) -> bool:
        """SIGTERM to the children still running, SIGKILL after stop_timeout; True when each exited 0."""
        for task in running:
            self.procs[exits[task]].send_signal(signal.SIGTERM)
        clean = True
        if running:
            _, late = await asyncio.wait(running, timeout=self.stop_timeout)
            for task in late:
                self.say("up", f"{exits[task]} still running {self.stop_timeout:g} s after SIGTERM: SIGKILL")
                self.procs[exits[task]].kill()
                clean = False
            await asyncio.gather(*running)
        for task in running:
            if (returncode := task.result()) not in CLEAN_STOP:
                self.say("up", f"{exits[task]} stopped with {describe(returncode)}")
                clean = False
        return clean


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment for children: this one, unbuffered output, and unless SNTRACK_LOG_JSON says otherwise logs
    for a person when the supervisor's output is a terminal, JSON lines when it is not (sntrack.logging's rule)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **overrides}
    env.setdefault("SNTRACK_LOG_JSON", "false" if sys.stdout.isatty() else "true")
    return env
