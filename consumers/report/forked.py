"""Part of the report on the second core: a function run in a forked child while the parent computes the rest.

Everything the report computes runs under one GIL; `sntrack report` over 100,000 trials gives about half of its
build to the sections that parse the trials' hyper-parameters and to the resampling equivalence tests. A forked child
starts with the loaded data already in its memory (copy-on-write), so nothing is sent to it; only its result comes
back, pickled through a pipe. Wherever a child cannot be used (no fork, one core) or fails, the parent computes the
same result itself when asked for it (tests/test_report_forked.py).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def can_fork() -> bool:
    """Linux with at least two cores to run on: elsewhere fork is unavailable or unsafe beside system frameworks,
    and on one core the child only takes turns with the parent."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


def _bound_to(parent: int) -> None:
    """In the child: die with the parent (a parent killed or failing before it asks for the result leaves no child
    computing on), and hold none of its standard streams, so that a reader of its output sees the end as soon as the
    parent ends."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the line above
        os._exit(1)
    nothing = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(nothing, stream)


def start(function: Callable[..., T], *args) -> Callable[[], T]:
    """Start `function(*args)` in a forked child; return what gives its result (waiting for the child). Only where
    this thread is the process's only one (another could hold a lock the child would need: an import, a logging
    handler; the child has only the calling thread); otherwise the result is computed here when asked for."""
    here = lambda: function(*args)  # noqa: E731 - the same work in this process
    if not can_fork() or threading.active_count() > 1:  # another thread could hold a lock the child needs
        return here
    for stream in (sys.stdout, sys.stderr):  # the child must not write out the parent's buffered output again
        if stream is not None:
            stream.flush()
    read_end, write_end = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return here
    if pid == 0:  # the child: compute, send, and leave without running the parent's exit handlers or flushing
        status = 1
        try:
            os.close(read_end)
            _bound_to(parent)
            payload = pickle.dumps(function(*args), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
            status = 0
        except BaseException:  # noqa: BLE001, S110 - Ctrl-C or any failure: the parent computes it instead
            pass
        finally:
            os._exit(status)
    os.close(write_end)

    def result() -> T:
        with os.fdopen(read_end, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not payload:
            return here()
        return pickle.loads(payload)  # noqa: S301 - our own child's bytes
    return result
