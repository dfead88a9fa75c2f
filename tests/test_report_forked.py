"""The report's forked worker (consumers.report.forked): the same report as in one process, computed in a child that
really is another process, and computed here instead whenever the child fails or dies."""

from __future__ import annotations

import json
import os
import random
import signal
from datetime import UTC, datetime

import pytest

from consumers.report import forked
from consumers.report.report import build_report
from consumers.report.snapshot import ComparisonData, JsonColumn, TrialRecord, TrialTable

pytestmark = pytest.mark.skipif(not forked.can_fork(), reason="forks only on Linux with two cores or more")

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


@pytest.mark.parametrize("paired", [True, False])
def test_the_forked_build_gives_the_report_of_one_process(paired):
    trials = _study(paired, seed=7)
    alone = build_report(ComparisonData(_table(trials), None, []), now=NOW)
    with_child = build_report(ComparisonData(_table(trials), None, []), now=NOW, fork=True)
    assert with_child == alone
    assert alone["design"]["primary"] == ("paired" if paired else "independent")
    assert alone["manipulation"]["passed"] is False and alone["where_it_helps"]["parameters"]
    assert bool(alone["confounding"]) is not paired


def test_the_result_comes_from_another_process():
    assert forked.start(os.getpid)() != os.getpid()


def _fails_in_a_child(parent: int) -> str:
    if os.getpid() != parent:
        raise RuntimeError("only in the child")
    return "computed here"


def _killed_in_a_child(parent: int) -> str:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return "computed here"


@pytest.mark.parametrize("work", [_fails_in_a_child, _killed_in_a_child])
def test_a_child_that_fails_or_dies_leaves_the_work_to_the_parent(work):
    assert forked.start(work, os.getpid())() == "computed here"


def test_twins_hyper_parameters_are_parsed_once_and_equal_a_parse_of_each():
    texts = ['{"lr": 0.1, "hidden": 64}', '{"lr": 0.1, "hidden": 64}', None, '{"lr": 1e-3}',
             '{"hidden": 64, "lr": 0.1}']
    column = JsonColumn(texts, repeats=True)
    assert list(column) == [json.loads(t) if t else None for t in texts]
    assert column[0] is column[1] and column[0] is not column[4]
    assert list(JsonColumn(texts)) == list(column)
