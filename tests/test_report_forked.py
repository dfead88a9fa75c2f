"""The report's forked worker (consumers.report.forked): the same report as in one process, computed in a child that
really is another process, and computed here instead whenever the child fails or dies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from consumers.report import forked
from consumers.report.report import build_report
from consumers.report.snapshot import ComparisonData, JsonColumn, TrialRecord, TrialTable

forks = pytest.mark.skipif(not forked.can_fork(), reason="forks only on Linux with two cores or more")

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def _table(trials: list[TrialRecord]) -> TrialTable:
    """The trials as `load` gives them: columns, with hyper-parameters and σ as JSON texts."""
    columns = {name: [getattr(t, name) for t in trials] for name in TrialRecord.__dataclass_fields__}
    for name in ("hyperparams", "sigmas"):
        columns[name] = JsonColumn([None if v is None else json.dumps(v) for v in columns[name]],
                                   repeats=name == "hyperparams")
    return TrialTable(columns, TrialRecord)


def _study(paired: bool, seed: int) -> list[TrialRecord]:
    """Pairs (twins sharing hyper-parameters) or unpaired trials whose lr differs by arm (confounding), with some
    spectral-norm layers left above 1 (the manipulation check fails) and pruned trials."""
    rng = random.Random(seed)
    trials = []
    for i in range(400):
        hp = {"lr": 10 ** rng.uniform(-4, -1), "hidden": rng.choice([64, 128, 256]),
              "act": rng.choice(["relu", "gelu"])}
        for flag in (True, False):
            if not paired and flag:
                hp = {**hp, "lr": hp["lr"] * 3}
            val = 0.9 + rng.gauss(0, 0.01) + (0.01 if flag and hp["lr"] > 0.01 else 0)
            sigmas = {"layers.0": 1.0 if flag and i % 50 else 2.5, "layers.1": 1.0 if flag else 3.0}
            status = "pruned" if rng.random() < 0.1 else "completed"
            trials.append(TrialRecord(f"t{i}-{flag}", flag, status, val, val + 0.02, 1000.0 + 100 * flag, hp,
                                      f"t{i}-{not flag}" if paired and flag else None, f"s{i % 2}", "digits", 4,
                                      sigmas if status == "completed" else None))
    return trials


def _in_a_fresh_python(code: str) -> str:
    """What `code` prints, run in a new interpreter: its only thread is the main one, as in `sntrack report` at the
    build (forked.start computes in the parent where another thread runs)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@forks
@pytest.mark.parametrize("paired", [True, False])
def test_the_forked_build_gives_the_report_of_one_process(paired):
    trials = _study(paired, seed=7)
    alone = build_report(ComparisonData(_table(trials), None, []), now=NOW)
    assert alone["design"]["primary"] == ("paired" if paired else "independent")
    assert alone["manipulation"]["passed"] is False and alone["where_it_helps"]["parameters"]
    assert bool(alone["confounding"]) is not paired
    code = f"""
import json, os
from consumers.report import forked, report
from consumers.report.snapshot import ComparisonData
from tests.test_report_forked import NOW, _study, _table
computed_in = []
start = forked.start
def spy(function, *args):
    pending = start(lambda *given: (os.getpid(), function(*given)), *args)
    def result():
        pid, value = pending()
        computed_in.append(pid)
        return value
    return result
forked.start = spy
built = report.build_report(ComparisonData(_table(_study({paired}, seed=7)), None, []), now=NOW, fork=True)
print(json.dumps({{"report": built, "computed_in": computed_in, "parent": os.getpid()}}))
"""
    found = json.loads(_in_a_fresh_python(code))
    assert len(found["computed_in"]) == 1 and found["computed_in"][0] != found["parent"]  # in a child
    assert found["report"] == json.loads(json.dumps(alone))


@forks
def test_the_result_comes_from_another_process():
    parent, child = _in_a_fresh_python(
        "import os\nfrom consumers.report import forked\nprint(os.getpid(), forked.start(os.getpid)())").split()
    assert parent != child


def test_with_another_thread_running_the_work_is_done_here():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert forked.start(os.getpid)() == os.getpid()
    finally:
        stop.set()
        other.join()


def _fails_in_a_child(parent: int) -> str:
    if os.getpid() != parent:
        raise RuntimeError("only in the child")
    return "computed here"


def _killed_in_a_child(parent: int) -> str:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return "computed here"


@forks
@pytest.mark.parametrize("work", ["_fails_in_a_child", "_killed_in_a_child"])
def test_a_child_that_fails_or_dies_leaves_the_work_to_the_parent(work):
    code = ("import os\nfrom consumers.report import forked\nfrom tests.test_report_forked import " + work + "\n"
            "print(forked.start(" + work + ", os.getpid())())")
    assert _in_a_fresh_python(code).strip() == "computed here"


def test_twins_hyper_parameters_are_parsed_once_and_equal_a_parse_of_each():
    texts = ['{"lr": 0.1, "hidden": 64}', '{"lr": 0.1, "hidden": 64}', None, '{"lr": 1e-3}',
             '{"hidden": 64, "lr": 0.1}']
    column = JsonColumn(texts, repeats=True)
    assert list(column) == [json.loads(t) if t else None for t in texts]
    assert column[0] is column[1] and column[0] is not column[4]
    assert list(JsonColumn(texts)) == list(column)


@forks
def test_a_child_ends_with_its_parent_and_holds_none_of_its_output(tmp_path):
    """A parent killed before it asks for the result: its reader sees the end of the output at once, and the child
    computing on (here: for a minute) is gone too."""
    noted = tmp_path / "child.pid"
    code = ("import os, signal, time\nfrom consumers.report import forked\n"
            f"forked.start(lambda: (open({str(noted)!r}, 'w').write(str(os.getpid())), time.sleep(60)))\n"
            f"while not os.path.exists({str(noted)!r}):\n    time.sleep(0.01)\n"
            "print('forked', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = process.communicate(timeout=30)  # both pipes at their end: the child holds neither
    assert out == b"forked\n" and process.returncode == -signal.SIGKILL
    child = int(noted.read_text())
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the child {child} outlived its parent")
