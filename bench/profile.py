"""Where a daemon's CPU goes: py-spy samples it while a benchmark runs, and the samples are summed by the library
that was running (the innermost frame's) and by sntrack's own steps (any frame on the stack)."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

RATE_HZ = 200
# The innermost frame's file, by its start, names the part of the daemon that was running; the first match wins.
PARTS = (
    ("asyncio: event loop, transports and their socket system calls", ("asyncio/",)),
    ("asyncpg: the PostgreSQL protocol", ("asyncpg/",)),
    ("aio-pika, aiormq, pamqp: the AMQP protocol", ("aio_pika/", "aiormq/", "pamqp/")),
    ("pydantic: the gate's validation", ("pydantic/", "pydantic_core/")),
    ("sntrack's own code", ("consumers/", "schemas/", "sntrack/", "common/")),
)
OTHER = "other (structlog, json, the interpreter's own)"
# sntrack's steps: the share of samples with this function anywhere on the stack (they nest, so they do not add up).
STEPS = (
    ("a batch's transaction (Store.apply: BEGIN, bookkeeping, projection, COMMIT)", "Store.apply "),
    ("the gate (parse_event)", "parse_event "),
    ("acks (ConsumerRuntime._ack_batch)", "ConsumerRuntime._ack_batch "),
)


@contextmanager
def sampled(pid: int, into: dict):
    """py-spy samples process `pid` while the block runs; then `into` gets the summary (summarize)."""
    with tempfile.TemporaryDirectory(prefix="sntrack-profile-") as folder:
        raw = Path(folder) / "raw.txt"
        command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
                   "--rate", str(RATE_HZ), "--nonblocking", "--output", str(raw)]
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        into.update(summarize(raw.read_text() if raw.exists() else ""))


def summarize(raw: str, top: int = 8) -> dict:
    """Shares of py-spy's raw samples ("frame;frame;… count" lines, innermost frame last): by part (PARTS, by the
    innermost frame), by sntrack step (STEPS, anywhere on the stack) and the `top` innermost functions."""
    parts: collections.Counter = collections.Counter()
    steps: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        leaf = frames[-1]
        where = leaf.rpartition("(")[2]
        parts[next((name for name, starts in PARTS if where.startswith(starts)), OTHER)] += n
        leaves[leaf] += n
        for name, function in STEPS:
            if any(frame.startswith(function) for frame in frames):
                steps[name] += n
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {"samples": total, "rate_hz": RATE_HZ,
            "parts_pct": {name: share(parts[name]) for name, _ in (*PARTS, (OTHER, ()))},
            "steps_pct": {name: share(steps[name]) for name, _ in STEPS},
            "top_pct": [[leaf, share(n)] for leaf, n in leaves.most_common(top)]}
