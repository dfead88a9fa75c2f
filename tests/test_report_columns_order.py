"""The columnar report must pair trials as complete_pairs over the records does (found by attack19: numpy string
arrays drop trailing NULs, so ids "a" and "a\\x00" tied and the other link of a shared twin won)."""

from __future__ import annotations

from consumers.report.report import build_report, complete_pairs
from consumers.report.snapshot import ComparisonData, TrialRecord


def _trial(tid: str, sn: bool, val: float, paired_with: str | None) -> TrialRecord:
    return TrialRecord(tid, sn, "completed", val, val, 100.0, {"lr": 0.1}, paired_with, "m", "d", 3, None)


def test_pairs_follow_python_string_order_even_for_ids_differing_by_a_trailing_nul():
    trials = [_trial("a\x00", True, 0.9, "m"), _trial("a", True, 0.5, "m"), _trial("m", False, 0.7, None),
              _trial("p", True, 0.8, "q"), _trial("q", False, 0.6, None), _trial("r", True, 0.81, "s"),
              _trial("s", False, 0.61, None)]
    pairs, _ = complete_pairs(trials)  # the record-by-record definition: ("a", "m") sorts before ("a\x00", "m")
    expected = sum(a.val - b.val for a, b in pairs) / len(pairs)
    report = build_report(ComparisonData(trials, None, []))
    assert [(a.id, b.id) for a, b in pairs][0] == ("a", "m")
    assert report["tests"]["paired"]["n_pairs"] == len(pairs) == 3
    assert abs(report["tests"]["paired"]["mean_difference"]["estimate"] - expected) < 1e-12
