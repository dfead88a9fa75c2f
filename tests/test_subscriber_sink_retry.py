"""JsonLinesSink retries a failed write (a full disk); the retry must not leave the failed copy in the stream's
buffer as well, or the line is written twice once there is room (found by attack19)."""

from __future__ import annotations

import errno
import io
import json

import pytest

from consumers.handler import RetryLater
from consumers.subscriber import JsonLinesSink
from producer.emitter import producer_info
from producer.sample import synthetic_study


class _FullThenRoom(io.RawIOBase):
    """A file whose first `failures` writes fail with ENOSPC, as a disk that fills then frees (pure I/O logic)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += bytes(b)
        return len(b)


async def test_a_write_retried_after_a_full_disk_is_written_once():
    event = next(e for trial in synthetic_study(1, 1, producer=producer_info(), seed=3) for e in trial)
    raw = _FullThenRoom(failures=2)
    sink = JsonLinesSink(io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"))
    for _ in range(2):  # the disk is full: retried later
        with pytest.raises(RetryLater):
            await sink(event)
    await sink(event)  # room again: delivered
    written = raw.data.decode().splitlines()
    assert [json.loads(line)["event_id"] for line in written] == [str(event.event_id)], written


class _TornThenRoom(io.FileIO):
    """A real file whose first write stops half-way with ENOSPC, as a disk filling during the line."""

    torn = False

    def write(self, b) -> int:
        if not self.torn:
            self.torn = True
            super().write(bytes(b)[: len(b) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


async def test_a_line_torn_by_a_full_disk_is_cut_before_the_retry(tmp_path):
    events = [e for trial in synthetic_study(1, 2, producer=producer_info(), seed=4) for e in trial][:2]
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(io.TextIOWrapper(io.BufferedWriter(_TornThenRoom(path, "a")), encoding="utf-8"))
    with pytest.raises(RetryLater):
        await sink(events[0])  # torn half-way: cut, retried later
    await sink(events[0])
    await sink(events[1])
    assert [json.loads(line)["event_id"] for line in path.read_text().splitlines()] == [str(e.event_id)
                                                                                        for e in events]
