"""The trials of a report as columns: one pass over the TrialRecords builds numpy arrays (flag, status, values with
their "present" masks) and plain lists (ids, hyper-parameters, σ), so that the statistics select with masks and
index arrays instead of looping over 100,000 objects again and again. Arrays keep the trials' order, so sums and
the other order-sensitive figures are the same numbers as from the lists of the same trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from itertools import islice, repeat
from operator import attrgetter, itemgetter, le

import numpy as np

from consumers.report.snapshot import TRIAL_FIELDS, JsonColumn, TrialTable

STATUSES = ("completed", "pruned", "failed", "running")
STATUS_CODES = {name: code for code, name in enumerate(STATUSES)}
OTHER = len(STATUSES)  # any other status: counted in the total only


def _fields(trials: Sequence) -> list[list]:
    """Each of TRIAL_FIELDS as a list over the trials: a TrialTable's own lists; else read from the instances'
    __dict__ (a dataclass keeps its fields there; a third faster than getattr), or by getattr where an object has no
    such dict entry."""
    if isinstance(trials, TrialTable):
        return trials.fields
    try:
        found = list(map(vars, trials))
        return [list(map(itemgetter(name), found)) for name in TRIAL_FIELDS]
    except (TypeError, KeyError):
        return [list(map(attrgetter(name), trials)) for name in TRIAL_FIELDS]


def floats(values: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Numbers or None as a float array (None as NaN) and the mask of entries that are not None (a stored NaN is
    present, as `value is not None` says)."""
    x = np.array(values, dtype=float) if len(values) else np.zeros(0)
    present = ~np.isnan(x)
    missing = np.flatnonzero(~present)
    if len(missing):
        present[missing] = [values[i] is not None for i in missing]
    return x, present


class Columns:
    """Columns of `trials` (TrialRecord-like objects), index i being trials[i]."""

    def __init__(self, trials: Sequence) -> None:
        n = len(trials)
        self.trials = trials
        self.n = n
        (self.ids, flags, statuses, val, train, duration, self._hyperparams, self.paired_with, self.model_run_ids,
         self.datasets, epochs, self._sigmas) = _fields(trials)
        self.sn = np.fromiter(map(bool, flags), bool, n)
        self.status = np.fromiter(map(STATUS_CODES.get, statuses, repeat(OTHER)), np.int8, n)
        self.completed = self.status == STATUS_CODES["completed"]
        self.val, self.val_present = floats(val)
        self.train, self.train_present = floats(train)
        self.duration, self.duration_present = floats(duration)
        self.epochs, self.epochs_present = floats(epochs)
        self.done = self.completed & self.val_present  # completed with a final validation accuracy

    @cached_property
    def hyperparams(self) -> list[dict | None]:
        """Parsed on first use (a TrialTable holds JSON texts: consumers.report.snapshot.JsonColumn)."""
        return list(self._hyperparams)

    @cached_property
    def sigmas(self) -> list[dict | None]:
        return list(self._sigmas)

    def hyperparams_at(self, i: int) -> dict | None:
        """Trial i's hyper-parameters, without parsing the others' where they are not parsed yet."""
        column = self._hyperparams
        return column.item(i) if isinstance(column, JsonColumn) else column[i]

    def arm(self, spectral_norm: bool) -> np.ndarray:
        return self.sn if spectral_norm else ~self.sn

    def counts(self, mask: np.ndarray) -> dict[str, int]:
        """Trials per status of the trials in `mask`, and their total (plain ints)."""
        found = np.bincount(self.status[mask], minlength=OTHER + 1)
        return {**{name: int(found[code]) for code, name in enumerate(STATUSES)}, "total": int(mask.sum())}

    def pairs(self) -> tuple[np.ndarray, np.ndarray, int]:
        """complete_pairs over the columns: index arrays (SN, baseline) of the complete pairs in the order of their
        sorted (low id, high id) links, and how many linked pairs there are in all."""
        ids = self.ids
        index = dict(zip(ids, range(self.n), strict=True))  # the last of equal ids, as {t.id: t} keeps
        # Each trial's linked twin (-1: none, or one the scope does not hold); a link to itself is none.
        other = np.fromiter(map(index.get, self.paired_with, repeat(-1)), np.int64, self.n)
        own = np.arange(self.n) if len(index) == self.n else np.fromiter(map(index.__getitem__, ids), np.int64, self.n)
        if "" in index:  # an empty paired_with names no twin (it is false), even where a trial has the empty id
            other[[i for i, name in enumerate(self.paired_with) if name == ""]] = -1
        linked = (other >= 0) & (other != own)
        if not linked.any():
            return np.zeros(0, int), np.zeros(0, int), 0
        ends = np.stack([own[linked], other[linked]], axis=1)
        # Python's order of the ids (as min/max and sorted() compare them): numpy's string arrays drop trailing NULs,
        # so "a" and "a\x00" would tie there. The read model's are usually in order already (the report reads them so).
        if all(map(le, ids, islice(ids, 1, None))):
            rank = np.arange(self.n)
        else:
            rank = np.empty(self.n, dtype=np.int64)
            rank[sorted(range(self.n), key=ids.__getitem__)] = np.arange(self.n)
        # A link is (lower id, higher id); ranks order the distinct ids as strings do.
        swap = rank[ends[:, 0]] > rank[ends[:, 1]]
        ends[swap] = ends[swap][:, ::-1]
        keys = rank[ends[:, 0]] * self.n + rank[ends[:, 1]]
        _, first = np.unique(keys, return_index=True)  # sorted as the (low, high) id pairs are
        links = ends[first]
        low, high = links[:, 0], links[:, 1]
        cross = self.sn[low] != self.sn[high]
        ends_used = np.concatenate([low[cross], high[cross]])
        if len(ends_used) and np.bincount(ends_used).max() > 1:  # a trial in several links: the first one wins
            keep, used = np.zeros(len(links), bool), set()
            for k in np.flatnonzero(cross).tolist():
                a, b = int(low[k]), int(high[k])
                if a not in used and b not in used:
                    used.update((a, b))
                    keep[k] = True
        else:
            keep = cross
        low, high = low[keep], high[keep]
        complete = self.done[low] & self.done[high]
        low, high = low[complete], high[complete]
        low_is_sn = self.sn[low]
        return np.where(low_is_sn, low, high), np.where(low_is_sn, high, low), len(links)


class Lazily(Sequence):
    """get(positions[k]) at index k, computed when read: for a sequence of which few entries are ever read."""

    def __init__(self, get, positions: Sequence[int]) -> None:
        self._get, self._positions = get, positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, k):
        return self._get(self._positions[k])
