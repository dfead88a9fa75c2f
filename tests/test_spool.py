"""The spool's disk behaviour: partial writes on a full disk, and bounded descriptors at any number of segments."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from producer import spool as spool_module
from producer.emitter import producer_info
from producer.sample import synthetic_study
from producer.spool import Record, Spool, inspect


def _records(trials: int, epochs: int, seed: int = 0) -> list[Record]:
    study = synthetic_study(trials, epochs, seed=seed, producer=producer_info())
    return [Record.from_event(e) for trial in study for e in trial]


def _drain(spool: Spool) -> tuple[list[str], int]:
    ids, skipped = [], 0
    while (chunk := spool.next_chunk(1000)) is not None:
        ids.extend(r.event_id for r in chunk.records)
        skipped += chunk.skipped
        spool.commit(chunk)
    return ids, skipped


def test_short_write_then_enospc_is_truncated_to_the_last_good_record(tmp_path, monkeypatch):
    first, second, third = _records(1, 3, seed=1), _records(1, 3, seed=2), _records(1, 3, seed=3)
    spool = Spool(tmp_path)
    spool.append(first)
    (segment,) = tmp_path.glob("*.jsonl")
    good_size = segment.stat().st_size

    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:len(data) // 2]))  # the disk takes half, then is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", short_then_full)
    with pytest.raises(OSError) as failed:
        spool.append(second)
    assert failed.value.errno == errno.ENOSPC and len(calls) == 2
    assert segment.stat().st_size == good_size, "the fragment of the failed append must be cut off"

    monkeypatch.setattr(spool_module.os, "write", real_write)
    spool.append(third)  # the disk has room again
    ids, skipped = _drain(spool)
    assert skipped == 0
    assert ids == [r.event_id for r in first + third]
    spool.close()


_WRITER = textwrap.dedent("""
    import os, resource, sys
    from pathlib import Path
    from producer.emitter import producer_info
    from producer.sample import synthetic_study
    from producer.spool import Record, Spool
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    study = synthetic_study(300, 8, seed=9, producer=producer_info())
    records = [Record.from_event(e) for t in study for e in t][:2000]
    spool = Spool(Path(sys.argv[1]), max_segment_events=1)
    for start in range(0, len(records), 100):
        spool.append(records[start:start + 100])
    print(len(records), len(os.listdir("/proc/self/fd")), flush=True)
    os._exit(0)  # dies owning every segment: they are orphans now
""")

_ADOPTER = textwrap.dedent("""
    import os, resource, sys
    from pathlib import Path
    from producer.spool import Spool
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    spool = Spool(Path(sys.argv[1]), max_segment_events=1)
    adopted = spool.adopt_orphans()
    open_after_adopt = len(os.listdir("/proc/self/fd"))
    drained, most_open = 0, 0
    while (chunk := spool.next_chunk(7)) is not None:
        drained += len(chunk.records)
        spool.commit(chunk)
        most_open = max(most_open, len(os.listdir("/proc/self/fd")))
    assert spool.release_if_drained()
    spool.close()
    print(adopted, drained, open_after_adopt, most_open, flush=True)
""")


def test_two_thousand_segments_under_a_low_descriptor_limit(tmp_path):
    """2,000 one-event segments written, orphaned and adopted with RLIMIT_NOFILE = 64: descriptors stay few."""
    environ = {**os.environ, "PYTHONPATH": os.getcwd()}
    written = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], capture_output=True, text=True,
                             env=environ, timeout=120)
    assert written.returncode == 0, written.stderr[-2000:]
    events, writer_fds = map(int, written.stdout.split())
    assert events == 2000 and writer_fds < 10
    segments = inspect(tmp_path)
    assert len(segments) == 2000 and not any(s.live for s in segments)

    adopted = subprocess.run([sys.executable, "-c", _ADOPTER, str(tmp_path)], capture_output=True, text=True,
                             env=environ, timeout=120)
    assert adopted.returncode == 0, adopted.stderr[-2000:]
    count, drained, open_after_adopt, most_open = map(int, adopted.stdout.splitlines()[-1].split())
    assert (count, drained) == (2000, 2000)
    assert open_after_adopt < 10 and most_open < 10, (open_after_adopt, most_open)
    assert not list(tmp_path.glob("*.jsonl"))
