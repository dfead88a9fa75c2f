"""What an extra subscriber does with each event (a sink), and which event types its routing patterns match.

Sinks take one event at a time and return once its effect is done; the caller records it as delivered only then
(consumers/catchup.py). They signal trouble as every handler does (consumers/handler.py): `RetryLater` keeps the
event and tries again later, any other exception is a failure, retried a few times, then dead-lettered to
sntrack.sub.NAME.dlq with reason handler_error.

Its queue is bounded (consumers.topology.subscriber_queue): beyond that the oldest messages are dropped to
sntrack.sub.NAME.dlq (x-death reason maxlen); the subscriber fills such a gap from the journal."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO, get_args

from consumers.handler import RetryLater
from schemas import Event, EventType

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
EX_TEMPFAIL = 75  # sysexits.h: an --exec command exiting with it asks for a retry later, without limit
STDERR_TAIL = 500

Sink = Callable[[Event], Awaitable[None]]


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"subscriber name {name!r}: use 1-64 of a-z, 0-9, _ and -, starting with a letter/digit")
    return name


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    words, keys = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


def matching_types(patterns: Sequence[str]) -> list[str]:
    """The event types the broker routes to a queue bound with `patterns` (routing key = event type)."""
    types = [t for t in EVENT_TYPES if any(topic_matches(p, t) for p in patterns)]
    if not types:
        raise ValueError(f"--bind {' '.join(patterns)} matches no event type ({', '.join(EVENT_TYPES)})")
    return types


class JsonLinesSink:
    """Each event as one JSON line, written through the stream's unbuffered layer before it counts as delivered.
    A reader that went away (`| head`) calls `on_closed` (the subscriber stops); a failed write (a full disk) is
    retried later, with nothing of it left in a buffer and a torn line cut from a regular file: either way the event
    is not delivered, so it stays for the next run, and is written once."""

    def __init__(self, stream: TextIO):
        stream.flush()
        self.stream = stream  # held: a wrapper that is collected closes the layer below it
        buffer = getattr(stream, "buffer", stream)
        self.raw = getattr(buffer, "raw", buffer)
        self.regular_file = _is_regular_file(self.raw)  # a torn line can be cut from it
        self.closed = False
        self.on_closed: Callable[[], None] = lambda: None

    async def __call__(self, event: Event) -> None:
        if self.closed:
            raise RetryLater("the output was closed")
        data = memoryview((event.model_dump_json() + "\n").encode())
        start = os.fstat(self.raw.fileno()).st_size if self.regular_file else None
        try:
            while data:
                data = data[self.raw.write(data) or 0:]
        except BrokenPipeError:
            self.closed = True
            self.on_closed()
            raise RetryLater("the output was closed") from None
        except OSError as exc:
            if start is not None:
                os.ftruncate(self.raw.fileno(), start)  # no torn line before the retry's copy
            raise RetryLater(f"cannot write the output: {exc.strerror or exc}") from None


def _is_regular_file(raw) -> bool:
    try:
        return stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # no descriptor (an in-memory stream)
        return False


class ExecSink:
    """`--exec CMD`: the command (run by the shell) gets the event's JSON on stdin. Exit 0: delivered; exit 75
    (EX_TEMPFAIL): retried later without limit; any other exit: a failure, retried and then dead-lettered."""

    def __init__(self, command: str):
        self.command = command

    async def __call__(self, event: Event) -> None:
        process = await asyncio.create_subprocess_shell(self.command, stdin=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        _, stderr = await process.communicate(event.model_dump_json().encode() + b"\n")
        if process.returncode == 0:
            return
        detail = f"--exec exited with {process.returncode}: {stderr.decode(errors='replace')[-STDERR_TAIL:]}"
        if process.returncode == EX_TEMPFAIL:
            raise RetryLater(detail)
        raise RuntimeError(detail)


def load_handler(spec: str) -> Sink:
    """`module:function` (importable from the current folder too), called with each Event; sync or async."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--handler {spec!r}: expected module:function (e.g. examples.best_trial_per_arm:handle)")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--handler {spec!r}: {exc}") from None
    if not callable(function):
        raise ValueError(f"--handler {spec!r} is not callable")

    async def sink(event: Event) -> None:
        result = function(event)
        if inspect.isawaitable(result):
            await result

    return sink
