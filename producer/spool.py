"""A durable local spool for events the broker could not take: append-only JSON-lines segment files.

Layout: `<spool_dir>/<created_ns>-<pid>-<random>.jsonl`, one event per line, segments read in name order.
An event counts as spooled only once its line is written and fsync'ed.

Ownership between processes sharing a spool dir is an fcntl `flock` held on each segment for as long as a
process owns it: its writer from creation (the file is locked before it gets its `.jsonl` name, so nobody
can see it unlocked), or the process that adopted it. A segment nobody holds a lock on belongs to a process
that is gone, and any Spool adopts it with `adopt_orphans()`. A draining crash leaves the segment in place,
so its events may be published again: consumers dedupe by event_id (at-least-once).

Thread-safe: appends, reads and commits may come from different threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from schemas import Event

log = structlog.get_logger("sntrack.spool")

SEGMENT_SUFFIX = ".jsonl"
SEGMENT_MAX_EVENTS = 2000


@dataclass(frozen=True, slots=True)
class Record:
    """One event ready for the wire: its JSON body and the fields that become AMQP properties."""

    body: bytes
    event_id: str
    event_type: str
    occurred_at: datetime

    @classmethod
    def from_event(cls, event: Event) -> Record:
        return cls(event.to_json(), str(event.event_id), event.event_type, event.occurred_at)

    @classmethod
    def from_line(cls, line: bytes) -> Record:
        """Parse one spooled line; ValueError when it is not a complete event envelope."""
        try:
            document = json.loads(line)
            return cls(line, str(document["event_id"]), str(document["event_type"]),
                       datetime.fromisoformat(document["occurred_at"]))
        except (KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not an event envelope: {exc!r}") from None


@dataclass
class _Segment:
    path: Path
    fd: int
    offset: int = 0  # bytes already drained (in memory only: a restart drains the segment again)
    events: int = 0  # events appended by this process (rotation)


@dataclass(frozen=True)
class Chunk:
    """Records read from the head segment; `Spool.commit(chunk)` marks them drained."""

    segment: _Segment
    records: list[Record]
    end_offset: int
    skipped: int


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    events: int
    bytes: int
    live: bool  # locked by a running process (possibly this one)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """This process's share of a spool directory: the segments it writes and the orphans it adopted."""

    def __init__(self, directory: Path, max_segment_events: int = SEGMENT_MAX_EVENTS):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_segment_events = max_segment_events
        self._segments: list[_Segment] = []  # drain order; the last one may be the active writer segment
        self._writer: _Segment | None = None
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Write records behind everything already spooled; durable (fsync'ed) when this returns."""
        with self._lock:
            start = 0
            while start < len(records):
                segment = self._writable_segment()
                room = self.max_segment_events - segment.events
                batch = records[start:start + room]
                data = b"".join(record.body + b"\n" for record in batch)
                written = 0
                while written < len(data):
                    written += os.write(segment.fd, data[written:])
                os.fsync(segment.fd)
                segment.events += len(batch)
                start += len(batch)

    def _writable_segment(self) -> _Segment:
        if self._writer is not None and self._writer.events < self.max_segment_events:
            return self._writer
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary = self.directory / f".{name}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.directory / f"{name}{SEGMENT_SUFFIX}"
        os.rename(temporary, path)
        _fsync_dir(self.directory)
        self._writer = _Segment(path, fd)
        self._segments.append(self._writer)
        return self._writer

    def adopt_orphans(self) -> int:
        """Take over segments whose owner is gone; they are drained before this process's own. Returns events."""
        adopted = []
        with self._lock:
            held = {segment.path for segment in self._segments}
            for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
                if path in held:
                    continue
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # drained and deleted by another process meanwhile
                if not _try_lock(fd) or not _same_file(path, fd):
                    os.close(fd)
                    continue
                adopted.append(_Segment(path, fd))
            self._segments[:0] = adopted
        events = sum(_count_lines(segment.fd) for segment in adopted)
        if adopted:
            log.info("adopted orphaned spool segments", segments=len(adopted), events=events,
                     spool_dir=str(self.directory))
        return events

    def next_chunk(self, limit: int) -> Chunk | None:
        """Up to `limit` records from the head segment, not yet marked drained; None when nothing is unread."""
        with self._lock:
            for segment in self._segments:
                size = os.fstat(segment.fd).st_size
                if segment.offset < size:
                    return self._read(segment, size, limit)
            return None

    def _read(self, segment: _Segment, size: int, limit: int) -> Chunk:
        data = os.pread(segment.fd, size - segment.offset, segment.offset)
        records: list[Record] = []
        skipped = 0
        position = 0
        while position < len(data) and len(records) < limit:
            newline = data.find(b"\n", position)
            if newline < 0:
                # Only a crash leaves a line without its newline (appends write whole lines under the lock).
                log.warning("skipping truncated spool line", segment=str(segment.path), bytes=len(data) - position)
                skipped += 1
                position = len(data)
                break
            line = data[position:newline]
            position = newline + 1
            if not line.strip():
                continue
            try:
                records.append(Record.from_line(line))
            except ValueError as exc:
                log.warning("skipping corrupt spool line", segment=str(segment.path), error=str(exc)[:200])
                skipped += 1
        return Chunk(segment, records, segment.offset + position, skipped)

    def commit(self, chunk: Chunk) -> None:
        """Mark a chunk drained (its records are confirmed); delete its segment once nobody writes to it."""
        with self._lock:
            segment = chunk.segment
            segment.offset = chunk.end_offset
            if segment is not self._writer and segment.offset >= os.fstat(segment.fd).st_size:
                self._remove(segment)

    def release_if_drained(self) -> bool:
        """When every spooled event has been drained, delete what is left and return True."""
        with self._lock:
            if any(segment.offset < os.fstat(segment.fd).st_size for segment in self._segments):
                return False
            for segment in list(self._segments):
                self._remove(segment)
            return True

    def _remove(self, segment: _Segment) -> None:
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)
        self._segments.remove(segment)
        if segment is self._writer:
            self._writer = None

    def is_empty(self) -> bool:
        with self._lock:
            return not self._segments

    def close(self) -> None:
        """Release every segment (locks included); what is left is an orphan for the next publisher."""
        with self._lock:
            for segment in self._segments:
                if segment.offset >= os.fstat(segment.fd).st_size:
                    segment.path.unlink(missing_ok=True)
                os.close(segment.fd)
            self._segments.clear()
            self._writer = None


def _same_file(path: Path, fd: int) -> bool:
    """After locking: is `path` still this file? (Another process may have drained and deleted it.)"""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _count_lines(fd: int) -> int:
    return os.pread(fd, os.fstat(fd).st_size, 0).count(b"\n")


def inspect(directory: Path) -> list[SegmentInfo]:
    """Every segment in a spool directory, with its event count and whether a live process holds it."""
    infos = []
    for path in sorted(Path(directory).glob(f"*{SEGMENT_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            live = not _try_lock(fd)
            infos.append(SegmentInfo(path, _count_lines(fd), os.fstat(fd).st_size, live))
        finally:
            os.close(fd)  # also releases the probe's lock
    return infos
