"""A durable local spool for events the broker could not take: append-only JSON-lines segment files.

Layout: `<spool_dir>/<created_ns>-<owner>.jsonl`, one event per line, segments read in name order.
An event counts as spooled only once its line is written and fsync'ed. An append that fails part-way (a full
disk takes half a line, then refuses) is cut back to the last good record before the error is raised, so a
retry never merges into a fragment
(tests/test_spool.py::test_short_write_then_enospc_is_truncated_to_the_last_good_record).

Ownership between processes sharing a spool dir: each Spool is an owner `<pid>-<random>` holding an fcntl
`flock` on its lock file `.owner-<owner>.lock` (locked before it gets that name, so nobody sees it unlocked)
for as long as it lives; a segment belongs to the owner named in its file name. A segment whose owner's lock is
free (or gone) belongs to a process that is gone, and any Spool adopts it with `adopt_orphans()` by renaming it
to its own owner name (rename is atomic: of two adopters, one wins). One lock per process rather than one per
segment keeps descriptors bounded at any number of segments: the lock, the writer segment and the segment being
read, each opened on demand (tests/test_spool.py::test_two_thousand_segments_under_a_low_descriptor_limit).
A draining crash leaves the segment in place, so its events may be published again: consumers dedupe by
event_id (at-least-once).

Trust: the spool directory must be this user's own, mode 0700 when created here, and is refused (SpoolDirError)
when it is a symbolic link, owned by another user, or writable by group or others: anyone who could write there
could plant segments that this worker adopts and publishes under its own identity. Symlinked segments and lock
files are skipped with a warning and never followed (opens use O_NOFOLLOW, or O_EXCL when creating). Proved by
tests/test_spool_security.py.

Thread-safe: appends, reads and commits may come from different threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from common.errors import ConfigurationError
from schemas import Event

log = structlog.get_logger("sntrack.spool")

SEGMENT_SUFFIX = ".jsonl"
SEGMENT_MAX_EVENTS = 2000
LOCK_PREFIX = ".owner-"
LOCK_SUFFIX = ".lock"
REJECTED_DIR = "rejected"  # unroutable events, kept with the reason the broker gave


class SpoolDirError(ConfigurationError):
    """The spool directory is not safe to use: a symlink, another user's, or writable by others."""


def secure_directory(directory: Path) -> Path:
    """Create the spool directory 0700 when missing; refuse it unless it is a real directory of this user that
    nobody else may write to. Returns the path."""
    directory = Path(directory)
    if not os.path.lexists(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700, follow_symlinks=False)  # the umask could have taken bits off, never added
        except FileExistsError:
            pass  # another process created it first: checked below like any existing directory
    return _check_directory(directory)


def _check_directory(directory: Path) -> Path:
    where = f"spool directory {directory} (SNTRACK_SPOOL_DIR)"
    try:
        info = os.lstat(directory)
    except OSError as exc:
        raise SpoolDirError(f"cannot use the {where}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise SpoolDirError(f"refusing the {where}: it is a symbolic link; point SNTRACK_SPOOL_DIR at the real "
                            "directory")
    if not stat.S_ISDIR(info.st_mode):
        raise SpoolDirError(f"refusing the {where}: it is not a directory")
    if info.st_uid != os.geteuid():
        raise SpoolDirError(f"refusing the {where}: it is owned by uid {info.st_uid}, not by this user "
                            f"(uid {os.geteuid()}); use a directory of your own")
    if info.st_mode & 0o022:
        raise SpoolDirError(f"refusing the {where}: it is writable by group or others (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); chmod 700 it")
    return directory


def _is_symlink(path: Path) -> bool:
    """True (with a warning) for a symbolic link where a segment or lock file should be: skipped, never followed."""
    if not path.is_symlink():
        return False
    log.warning("skipping a symbolic link in the spool directory; it is never followed", path=str(path))
    return True


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


@dataclass(eq=False)
class _Segment:
    path: Path
    size: int  # bytes written (segments are append-only, by their one owner)
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
    live: bool  # owned by a running process (possibly this one)


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


def _durable_append(fd: int, data: bytes, size: int) -> None:
    """Write `data` at the end of a file of `size` bytes and fsync; on failure cut the file back to `size`."""
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, size)
        raise


def _owner_of(path: Path) -> str:
    return path.name.removesuffix(SEGMENT_SUFFIX).partition("-")[2]


def _lock_path(directory: Path, owner: str) -> Path:
    return directory / f"{LOCK_PREFIX}{owner}{LOCK_SUFFIX}"


def _lock_dead_owner(directory: Path, owner: str) -> int | None:
    """The locked descriptor of `owner`'s lock file when that owner is gone (-1: no lock file); None: alive."""
    try:
        fd = os.open(_lock_path(directory, owner), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        log.warning("skipping a symbolic link in the spool directory; it is never followed",
                    path=str(_lock_path(directory, owner)))
        return None  # not a lock we can judge: its owner's segments stay where they are
    if _try_lock(fd):
        return fd
    os.close(fd)
    return None


def _release_dead_owner(directory: Path, owner: str, fd: int) -> None:
    if fd >= 0:
        _lock_path(directory, owner).unlink(missing_ok=True)
        os.close(fd)


class Spool:
    """This process's share of a spool directory: the segments it writes and the orphans it adopted."""

    def __init__(self, directory: Path, max_segment_events: int = SEGMENT_MAX_EVENTS):
        self.directory = secure_directory(directory)
        self.max_segment_events = max_segment_events
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._owner_fd: int | None = None  # our lock, taken before our first segment exists
        self._segments: list[_Segment] = []  # drain order; the last one may be the active writer segment
        self._writer: _Segment | None = None
        self._writer_fd: int | None = None
        self._reading: tuple[_Segment, int] | None = None  # the segment being drained and its descriptor
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Write records behind everything already spooled; durable (fsync'ed) when this returns. On an OSError
        (a full disk) the segment is cut back to its last complete record, and the error raised."""
        with self._lock:
            start = 0
            while start < len(records):
                segment, fd = self._writable_segment()
                batch = records[start:start + self.max_segment_events - segment.events]
                data = b"".join(record.body + b"\n" for record in batch)
                _durable_append(fd, data, segment.size)
                segment.size += len(data)
                segment.events += len(batch)
                start += len(batch)

    def reject(self, rejected: Sequence[tuple[Record, str]]) -> None:
        """Quarantine events the broker returned as unroutable: appended, with the reason, to
        `rejected/<owner>.jsonl` beside the segments, fsync'ed when this returns."""
        folder = self.directory / REJECTED_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        at = datetime.now(UTC).isoformat()
        data = b"".join(json.dumps({"reason": reason, "rejected_at": at, "event": json.loads(record.body)},
                                   separators=(",", ":")).encode() + b"\n" for record, reason in rejected)
        fd = os.open(folder / f"{self.owner}{SEGMENT_SUFFIX}",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            _durable_append(fd, data, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _ensure_owner(self) -> None:
        if self._owner_fd is not None:
            return
        temporary = self.directory / f".{self.owner}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(temporary, _lock_path(self.directory, self.owner))
        self._owner_fd = fd

    def _writable_segment(self) -> tuple[_Segment, int]:
        if self._writer is not None and self._writer.events < self.max_segment_events:
            return self._writer, self._writer_fd
        self._close_writer()
        self._ensure_owner()
        path = self.directory / f"{time.time_ns():020d}-{self.owner}{SEGMENT_SUFFIX}"
        self._writer_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)
        self._writer = _Segment(path, 0)
        self._segments.append(self._writer)
        return self._writer, self._writer_fd

    def _close_writer(self) -> None:
        if self._writer_fd is not None:
            os.close(self._writer_fd)
        self._writer, self._writer_fd = None, None

    def adopt_orphans(self) -> int:
        """Take over segments whose owner is gone; they are drained before this process's own. Returns events."""
        adopted: list[_Segment] = []
        with self._lock:
            by_owner: dict[str, list[Path]] = {}
            for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
                if not _is_symlink(path):
                    by_owner.setdefault(_owner_of(path), []).append(path)
            by_owner.pop(self.owner, None)
            stale_locks = {path.name[len(LOCK_PREFIX):-len(LOCK_SUFFIX)]
                           for path in self.directory.glob(f"{LOCK_PREFIX}*{LOCK_SUFFIX}")}
            stale_locks.discard(self.owner)
            for owner in sorted(set(by_owner) | stale_locks):
                fd = _lock_dead_owner(self.directory, owner)
                if fd is None:
                    continue  # alive
                try:
                    if by_owner.get(owner):
                        self._ensure_owner()
                        adopted.extend(self._take(by_owner[owner]))
                finally:
                    _release_dead_owner(self.directory, owner, fd)
            if adopted:
                _fsync_dir(self.directory)
            adopted.sort(key=lambda segment: segment.path.name)
            self._segments[:0] = adopted
        events = sum(_count_lines(segment.path) for segment in adopted)
        if adopted:
            log.info("adopted orphaned spool segments", segments=len(adopted), events=events,
                     spool_dir=str(self.directory))
        return events

    def _take(self, paths: list[Path]) -> list[_Segment]:
        taken = []
        for path in paths:
            created = path.name.partition("-")[0]
            mine = self.directory / f"{created}-{self.owner}{SEGMENT_SUFFIX}"
            try:
                os.rename(path, mine)
            except FileNotFoundError:
                continue  # another process adopted it first
            taken.append(_Segment(mine, mine.lstat().st_size))
        return taken

    def next_chunk(self, limit: int) -> Chunk | None:
        """Up to `limit` records from the head segment, not yet marked drained; None when nothing is unread."""
        with self._lock:
            for segment in self._segments:
                if segment.offset < segment.size:
                    return self._read(segment, limit)
            return None

    def _reader_fd(self, segment: _Segment) -> int:
        if self._reading is not None and self._reading[0] is segment:
            return self._reading[1]
        self._close_reader()
        fd = os.open(segment.path, os.O_RDONLY | os.O_NOFOLLOW)
        self._reading = (segment, fd)
        return fd

    def _close_reader(self) -> None:
        if self._reading is not None:
            os.close(self._reading[1])
            self._reading = None

    def _read(self, segment: _Segment, limit: int) -> Chunk:
        data = os.pread(self._reader_fd(segment), segment.size - segment.offset, segment.offset)
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
            if segment is not self._writer and segment.offset >= segment.size:
                self._remove(segment)

    def release_if_drained(self) -> bool:
        """When every spooled event has been drained, delete what is left and return True."""
        with self._lock:
            if any(segment.offset < segment.size for segment in self._segments):
                return False
            for segment in list(self._segments):
                self._remove(segment)
            return True

    def _remove(self, segment: _Segment) -> None:
        segment.path.unlink(missing_ok=True)
        if self._reading is not None and self._reading[0] is segment:
            self._close_reader()
        if segment is self._writer:
            self._close_writer()
        self._segments.remove(segment)

    def is_empty(self) -> bool:
        with self._lock:
            return not self._segments

    def close(self) -> None:
        """Release every segment and the owner lock; what is left is an orphan for the next publisher."""
        with self._lock:
            for segment in self._segments:
                if segment.offset >= segment.size:
                    segment.path.unlink(missing_ok=True)
            self._segments.clear()
            self._close_reader()
            self._close_writer()
            if self._owner_fd is not None:
                _lock_path(self.directory, self.owner).unlink(missing_ok=True)
                os.close(self._owner_fd)
                self._owner_fd = None


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def inspect(directory: Path) -> list[SegmentInfo]:
    """Every segment in a spool directory, with its event count and whether a live process owns it (none when the
    directory does not exist; SpoolDirError when it is not safe, as for a Spool)."""
    directory = Path(directory)
    if not os.path.lexists(directory):
        return []
    _check_directory(directory)
    alive: dict[str, bool] = {}
    infos = []
    for path in sorted(directory.glob(f"*{SEGMENT_SUFFIX}")):
        if _is_symlink(path):
            continue
        owner = _owner_of(path)
        if owner not in alive:
            fd = _lock_dead_owner(directory, owner)
            alive[owner] = fd is None
            if fd is not None and fd >= 0:
                os.close(fd)  # a probe: releases the lock, leaves the file for the adopter
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        infos.append(SegmentInfo(path, _count_lines(path), size, alive[owner]))
    return infos
