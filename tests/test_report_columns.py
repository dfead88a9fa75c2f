"""The report's columnar code gives what the per-trial definitions it replaced give: pairing (duplicate ids, self
links, links both ways, a trial in several links, same-arm links, empty and unknown twins), the manipulation check
(several layer layouts, an output layer left unwrapped, no σ), whether a parameter varies, and None apart from a
stored NaN. Pure logic on fixed and seeded data; the statistics themselves are tested against scipy elsewhere."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from consumers.report import explore, manipulation
from consumers.report.columns import Columns, floats
from consumers.report.lazy_stats import import_in_background, stats
from consumers.report.report import complete_pairs
from consumers.report.snapshot import TrialRecord


def _pairs_by_definition(trials):
    """complete_pairs as it was written over the records (the specification)."""
    by_id = {t.id: t for t in trials}
    links = {(min(t.id, t.paired_with), max(t.id, t.paired_with)) for t in trials
             if t.paired_with and t.paired_with in by_id and t.paired_with != t.id}
    used, pairs = set(), []
    for low, high in sorted(links):
        first, second = by_id[low], by_id[high]
        if first.spectral_norm == second.spectral_norm or low in used or high in used:
            continue
        used.update((low, high))
        sn, base = (first, second) if first.spectral_norm else (second, first)
        if all(t.status == "completed" and t.val is not None for t in (sn, base)):
            pairs.append((sn, base))
    return pairs, len(links)


def _random_trials(rng: random.Random, n: int) -> list[TrialRecord]:
    ids = [rng.choice(["a", "b", "ab", "b1", "B", "", "z9", "10", "9"]) + str(rng.randrange(n)) for _ in range(n)]
    ids += rng.sample(ids, k=n // 10)  # duplicate ids: the last record of an id is the one linked
    out = []
    for trial_id in ids:
        twin = rng.choice([None, "", trial_id, "unknown", rng.choice(ids), rng.choice(ids)])
        status = rng.choice(["completed", "completed", "pruned", "running"])
        val = rng.choice([None, 0.5, rng.random(), rng.random()])
        out.append(TrialRecord(trial_id, rng.random() < 0.5, status, val, paired_with=twin))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_pairs_are_the_ones_the_definition_gives(seed):
    trials = _random_trials(random.Random(seed), random.Random(seed).choice([0, 1, 2, 5, 30, 200]))
    pairs, linked = complete_pairs(trials)
    expected, expected_linked = _pairs_by_definition(trials)
    assert linked == expected_linked
    assert [(a.id, b.id) for a, b in pairs] == [(a.id, b.id) for a, b in expected]
    assert all(a is x and b is y for (a, b), (x, y) in zip(pairs, expected, strict=True))


def test_a_trial_linked_twice_is_paired_by_its_first_link_only():
    trials = [TrialRecord("a", True, "completed", 0.9, paired_with="b"), TrialRecord("b", False, "completed", 0.8),
              TrialRecord("c", False, "completed", 0.7, paired_with="a"), TrialRecord("d", True, "completed", 0.6,
                                                                               paired_with="c")]
    pairs, linked = complete_pairs(trials)
    assert linked == 3 and [(a.id, b.id) for a, b in pairs] == [("a", "b"), ("d", "c")]
    assert _pairs_by_definition(trials)[0] == pairs


def test_floats_tell_none_from_a_stored_nan():
    x, present = floats([1.0, None, math.nan, 2, None])
    assert present.tolist() == [True, False, True, True, False]
    assert x[0] == 1.0 and x[3] == 2.0 and np.isnan(x[[1, 2, 4]]).all()
    assert floats([])[0].shape == (0,)


def test_columns_count_every_status_and_arm():
    trials = [TrialRecord(str(i), i % 2 == 0, s) for i, s in enumerate(["completed", "pruned", "failed", "running",
                                                                          "queued", "completed", "completed"])]
    c = Columns(trials)
    # SN: completed, failed, queued (in the total only), completed; baseline: pruned, running, completed.
    assert c.counts(c.arm(True)) == {"completed": 2, "pruned": 0, "failed": 1, "running": 0, "total": 4}
    assert c.counts(c.arm(False)) == {"completed": 1, "pruned": 1, "failed": 0, "running": 1, "total": 3}
    assert all(type(v) is int for v in c.counts(c.arm(False)).values())


def _order(name):
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _check_by_definition(sn, baseline):
    """manipulation.check as it was written over (id, σ, hyper-parameters) tuples (the specification)."""
    def wrapped(sigmas, hp):
        return sorted(sigmas, key=_order)[:-1] if (hp or {}).get("sn_output_layer") is False else list(sigmas)

    def spread(values):
        return {"median": float(np.median(values)), "max": float(np.max(values))} if values else {
            "median": None, "max": None}

    def summary(measured):
        per_layer, products = {}, []
        for sigmas in measured:
            for name, value in sigmas.items():
                per_layer.setdefault(name, []).append(value)
            products.append(math.prod(sigmas.values()))
        return {"trials_measured": len(measured),
                "layers": [{"layer": n, **spread(per_layer[n])} for n in sorted(per_layer, key=_order)],
                "lipschitz_bound": spread(products)}

    over = [i for i, s, hp in sn if any(s[n] > manipulation.SN_TOLERANCE for n in wrapped(s, hp))]
    under = [i for i, s, _ in baseline if s and all(v <= 1 for v in s.values())]
    return {"tolerance": manipulation.SN_TOLERANCE, "spectral_norm": summary([s for _, s, _ in sn]),
            "baseline": summary([s for _, s, _ in baseline]), "sn_trials_over_tolerance": len(over),
            "baseline_trials_all_at_most_one": len(under),
            "examples": {"spectral_norm": sorted(over)[:3], "baseline": sorted(under)[:3]},
            "passed": None if not sn and not baseline else not over and not under}


@pytest.mark.parametrize("seed", range(20))
def test_the_manipulation_check_is_the_one_the_definition_gives(seed):
    rng = random.Random(seed)
    layouts = [("layers.0", "layers.1", "layers.2"), ("layers.2", "layers.0", "layers.1"), ("layers.0", "layers.10"),
               ("fc",), ()]

    def arm(scale):
        out = []
        for _ in range(rng.choice([0, 1, 3, 40])):
            names = rng.choice(layouts)
            hp = rng.choice([None, {}, {"sn_output_layer": False}, {"sn_output_layer": True}])
            out.append((f"t{rng.randrange(1000)}", {n: rng.choice([1.0, 0.5, 1.2, scale * rng.random()])
                                                    for n in names}, hp))
        return out

    sn, baseline = arm(1.1), arm(3.0)
    got = manipulation.check(*(tuple(list(column) for column in zip(*a, strict=True)) if a else ([], [], [])
                               for a in (sn, baseline)))
    expected = _check_by_definition(sn, baseline)
    assert _close(got, expected)


def _close(got, expected) -> bool:
    """Equal, floats within a few ulps (a product of σ may be rounded differently once multiplied as floats)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        return all(_close(got[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        assert len(got) == len(expected)
        return all(_close(g, e) for g, e in zip(got, expected, strict=True))
    if isinstance(expected, float):
        assert math.isclose(got, expected, rel_tol=1e-15), (got, expected)
        return True
    assert got == expected
    return True


@pytest.mark.parametrize(("values", "varies"), [
    ([1, 1, 1], False), ([1, 1.0], True), ([0.0, -0.0], True), ([-0.0, -0.0], False), ([math.nan, math.nan], False),
    ([True, 1], True), (["a", "a"], False), (["a", "b"], True), ([None, None], False), ([[1], [1.0]], True),
    ([2.5, 2.5, 2.50], False), ([3], False), ([1, 2], True)])
def test_a_parameter_varies_when_its_values_print_differently(values, varies):
    assert explore._varies(values) is varies
    assert explore._varies(values) == (len({repr(v) for v in values}) > 1)


def test_scipy_stats_is_the_lazy_stats_module_once_imported():
    import_in_background("scipy.stats").join()
    import scipy.stats

    assert stats.t is scipy.stats.t and stats.wilcoxon is scipy.stats.wilcoxon


@pytest.mark.parametrize("values", [[1.0, math.nan], [math.nan, 1.0], [0.0, 1.0, -0.0], [0.0, 0.0], [1, 2, 1],
                                    [False, True], [None, 1]])
def test_more_parameters_vary_as_their_repr_says(values):
    assert explore._varies(values) == (len({repr(v) for v in values}) > 1)


def test_columns_read_objects_without_a_field_dict_alike():
    class Slotted:
        __slots__ = ("_record",)

        def __init__(self, record):
            self._record = record

        def __getattr__(self, name):
            return getattr(self._record, name)

    trials = _random_trials(random.Random(3), 50)
    plain, slotted = Columns(trials), Columns([Slotted(t) for t in trials])
    assert plain.ids == slotted.ids and plain.paired_with == slotted.paired_with
    assert np.array_equal(plain.val, slotted.val, equal_nan=True) and (plain.done == slotted.done).all()
