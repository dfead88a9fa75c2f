"""The spool trusts only a directory of this user's that nobody else may write to, and never follows a symlink
in it (issue 10: another local user must not plant segments that a worker publishes under its identity)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from producer.emitter import producer_info
from producer.sample import synthetic_study
from producer.spool import Record, Spool, SpoolDirError, inspect

DEAD_OWNER = "999999-deadbeef"  # no lock file: a segment of this owner looks orphaned


def _segment_lines() -> bytes:
    (trial,) = synthetic_study(1, 2, seed=5, producer=producer_info())
    return b"".join(Record.from_event(event).body + b"\n" for event in trial)


def test_spool_directory_is_created_0700_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        spool = Spool(tmp_path / "state" / "spool")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "state" / "spool").stat().st_mode) == 0o700
    spool.reject([(Record.from_line(_segment_lines().splitlines()[0]), "NO_ROUTE")])
    assert stat.S_IMODE((tmp_path / "state" / "spool" / "rejected").stat().st_mode) == 0o700
    spool.close()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o722])
def test_group_or_world_writable_spool_directory_is_refused(tmp_path, mode):
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(SpoolDirError, match=rf"writable by group or others \(mode {mode:04o}\); chmod 700 it"):
        Spool(directory)
    with pytest.raises(SpoolDirError):
        inspect(directory)
    assert list(directory.iterdir()) == []  # refused before anything was written


def test_spool_directory_owned_by_another_user_is_refused(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user (chown); the mode checks run without it")
    os.chown(directory, 65534, 65534)  # nobody
    with pytest.raises(SpoolDirError, match=r"owned by uid 65534, not by this user \(uid 0\)"):
        Spool(directory)


def test_symlinked_spool_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "spool").symlink_to(real)
    with pytest.raises(SpoolDirError, match="it is a symbolic link; point SNTRACK_SPOOL_DIR at the real directory"):
        Spool(tmp_path / "spool")


def test_symlinked_segment_is_skipped_with_a_warning_and_never_followed(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    planted = tmp_path / "elsewhere.jsonl"  # valid events: followed, they would be published and the file deleted
    planted.write_bytes(content := _segment_lines())
    link = directory / f"{1:020d}-{DEAD_OWNER}.jsonl"
    link.symlink_to(planted)
    spool = Spool(directory)
    with capture_logs() as logs:
        assert spool.adopt_orphans() == 0
        assert inspect(directory) == []
    assert spool.next_chunk(100) is None and spool.is_empty()
    assert link.is_symlink() and planted.read_bytes() == content
    warned = [entry["path"] for entry in logs if "symbolic link" in entry["event"]]
    assert str(link) in warned
    spool.close()


def test_the_cli_refuses_an_unsafe_spool_directory_in_one_line(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(0o777)
    out = subprocess.run([sys.executable, "-m", "sntrack", "spool", "status"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SNTRACK_SPOOL_DIR": str(directory)})
    assert out.returncode == 2
    assert out.stderr == (f"sntrack: refusing the spool directory {directory} (SNTRACK_SPOOL_DIR): it is writable by "
                          "group or others (mode 0777); chmod 700 it\n")
