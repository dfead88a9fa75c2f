"""The report's read: one consistent snapshot of the read model (trials with the summaries of their curves, the
sn_comparison rows, the mean learning curves), as columns. It needs no numpy: `sntrack report` runs it while another
thread imports the statistics (consumers.report.report)."""

from __future__ import annotations

import asyncio
import difflib
import gc
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import asyncpg
from pydantic_core import from_json

from consumers.projections.comparison_keys import OVERALL
from consumers.report import queries

TRIAL_FIELDS = ("id", "spectral_norm", "status", "val", "train", "duration_ms", "hyperparams", "paired_with",
                "model_run_id", "dataset", "epochs_to_95", "sigmas")


class TrialTable(Sequence):
    """Trials as the database gave them, a sequence per field of TRIAL_FIELDS (`columns`, by name): Columns takes
    them as they are, and the per-trial records (`record(**fields)`) are made only when a caller asks for them (the
    plot, complete_pairs)."""

    def __init__(self, columns: dict[str, Sequence], record: Callable) -> None:
        self.fields = [columns[name] for name in TRIAL_FIELDS]
        self._record = record

    @cached_property
    def records(self) -> list:
        return [self._record(**dict(zip(TRIAL_FIELDS, values, strict=True)))
                for values in zip(*self.fields, strict=True)]

    def __len__(self) -> int:
        return len(self.fields[0])

    def __getitem__(self, index):
        return self.records[index]

    def __iter__(self):
        return iter(self.records)


@contextmanager
def paused_gc():
    """No cyclic garbage collection inside: making 100,000s of dicts, lists and records, or arrays from them, would
    set off full collections that rescan every object made so far and find nothing to free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class TrialRecord:
    id: str
    spectral_norm: bool
    status: str
    val: float | None = None
    train: float | None = None
    duration_ms: float | None = None
    hyperparams: dict | None = None
    paired_with: str | None = None
    model_run_id: str | None = None
    dataset: str | None = None
    epochs_to_95: int | None = None
    sigmas: dict[str, float] | None = None  # per-layer σ at the last measured epoch

    @property
    def gap(self) -> float | None:
        return None if self.val is None or self.train is None else self.train - self.val


@dataclass(frozen=True)
class CurvePoint:
    spectral_norm: bool
    epoch: int
    n: int
    mean: float | None
    std: float | None
    elapsed_s: float | None = None


@dataclass(frozen=True)
class ComparisonData:
    trials: Sequence[TrialRecord]  # a list, or the TrialTable `load` gives
    # sn_comparison rows keyed by (spectral_norm, status); None when the filter is not one sn_comparison keeps.
    aggregates: dict[tuple[bool, str], dict] | None
    curves: list[CurvePoint]
    model_run_id: str | None = None
    dataset: str | None = None
    journal_trials: int | None = None  # trials the journal holds for the scope, when it was counted

    def arm(self, spectral_norm: bool) -> list[TrialRecord]:
        return [t for t in self.trials if t.spectral_norm is spectral_norm]

    def completed_values(self, spectral_norm: bool) -> list[float]:
        return [t.val for t in self.arm(spectral_norm) if t.status == "completed" and t.val is not None]


class UnknownScope(ValueError):
    """--run or --dataset names nothing the read model or the journal knows."""


def _close_matches(name: str, known: list[str]) -> str:
    matches = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    return f"did you mean {', '.join(matches)}?" if matches else f"{len(known)} known"


async def _must_know(conn: asyncpg.Connection, query: str, what: str, name: str) -> None:
    known = [r[0] for r in await conn.fetch(query)]
    if name not in known:
        raise UnknownScope(f"unknown {what} {name!r}: {_close_matches(name, known)}")


async def _check_scope(conn: asyncpg.Connection, model_run_id: str | None, dataset: str | None,
                       found: int, live: bool = True) -> int | None:
    """The journal's trial count for the scope, when it can be counted cheaply and means something: a named search
    (an index read), or an empty scope without a dataset filter (the journal does not index datasets). Raises
    UnknownScope when nothing was found and neither the read model nor the journal knows the search or dataset.
    Not `live` (a past state), the journal, which holds what came later, is not read."""
    if found:
        return None if model_run_id is None or not live else await conn.fetchval(queries.JOURNAL_TRIALS, model_run_id)
    if dataset is not None:
        await _must_know(conn, queries.KNOWN_DATASETS, "dataset --dataset", dataset)
    if not live:
        if model_run_id is not None:
            await _must_know(conn, queries.READ_MODEL_SEARCHES, "search --run", model_run_id)
        return None
    journal = await conn.fetchval(queries.JOURNAL_TRIALS, model_run_id)
    if model_run_id is not None and not journal:
        await _must_know(conn, queries.KNOWN_SEARCHES, "search --run", model_run_id)
    return None if dataset is not None else journal


def _json_list(texts: Sequence[str | None]) -> list:
    """JSON texts (None: null) parsed in one call: a third of the time of one call each over 100,000 trials."""
    return from_json("[" + ",".join(["null" if text is None else text for text in texts]) + "]") if texts else []


_NO_JIT = "SET LOCAL jit = off"  # the curves' read scans millions of rows once: compiling it costs more than it saves


class JsonColumn(Sequence):
    """A column of JSON texts (None: null) as the values they encode, all parsed in one call on first use: the report
    parses hyper-parameters and σ only where it uses them (`sntrack report`: hyper-parameters in its forked worker,
    consumers.report.forked, σ in the parent). `repeats`: many texts are expected to be equal (the twins of a pair
    share their hyper-parameters), so each distinct text is parsed once, and equal texts give one shared value."""

    def __init__(self, texts: list[str | None], repeats: bool = False) -> None:
        self.texts = texts
        self.repeats = repeats

    @cached_property
    def values(self) -> list:
        distinct = list(dict.fromkeys(self.texts)) if self.repeats else self.texts
        if len(distinct) == len(self.texts):
            return _json_list(self.texts)
        parsed = dict(zip(distinct, _json_list(distinct), strict=True))
        return list(map(parsed.__getitem__, self.texts))

    def item(self, index: int):
        """The value at `index`, parsing only its text where the column is not parsed yet."""
        if "values" in self.__dict__:
            return self.values[index]
        text = self.texts[index]
        return None if text is None else from_json(text)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index):
        return self.values[index]

    def __iter__(self):
        return iter(self.values)


def _trial_columns(row: asyncpg.Record, json_row: asyncpg.Record) -> dict[str, Sequence]:
    """REPORT_TRIALS' and REPORT_TRIAL_JSON's rows of arrays as columns (TRIAL_FIELDS), hyper-parameters and σ as
    JsonColumns."""
    columns = {name: [] if values is None else values for name, values in (*row.items(), *json_row.items())}
    if len(columns["hyperparams"]) != len(columns["id"]):  # one snapshot and one order: cannot happen unless broken
        raise RuntimeError(f"the report's two reads of trials disagree: {len(columns['id'])} trials, "
                           f"{len(columns['hyperparams'])} hyper-parameter sets")
    columns["hyperparams"] = JsonColumn(columns["hyperparams"], repeats=True)
    columns["sigmas"] = JsonColumn(columns["sigmas"])
    return columns


Read = Callable[[asyncpg.Connection], Awaitable]


async def _side_reads(conn: asyncpg.Connection, helpers: Sequence[asyncpg.Connection],
                      reads: Sequence[Read]) -> list[asyncio.Future]:
    """Each read started on its own helper, in a transaction in `conn`'s exported snapshot."""
    snapshot = await conn.fetchval("SELECT pg_export_snapshot()")

    async def on(helper: asyncpg.Connection, read: Read):
        async with helper.transaction(isolation="repeatable_read", readonly=True):
            await helper.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'; {_NO_JIT}")
            return await read(helper)
    return [asyncio.ensure_future(on(helper, read)) for helper, read in zip(helpers, reads, strict=False)]


async def load(conn: asyncpg.Connection, model_run_id: str | None = None,
               dataset: str | None = None, *, live: bool = True, curves: bool = True,
               helpers: Sequence[asyncpg.Connection] = ()) -> ComparisonData:
    """Read trials (each with the summary of its curve the trials projection keeps), the mean learning curves and
    the sn_comparison rows in one repeatable-read snapshot. Not `live`: the connection's search_path starts with a
    schema written by `sntrack replay trials --until`, which holds trials and trial_metrics only; the summaries then
    come from its trials, and neither the live sn_comparison nor the journal is read. `curves=False` leaves the
    learning curves out (a scan of every epoch of every trial in scope; only JSON, CSV and the figure show them).
    `helpers`, other connections to the same database and search_path, read the trials' hyper-parameters and σ,
    then the curves, meanwhile, one each and in the same snapshot; what no helper reads, `conn` reads after the
    trials. The trials come back as a TrialTable (columns; records on demand)."""
    scope = (model_run_id, dataset)
    reads: list[Read] = [lambda c: c.fetchrow(queries.REPORT_TRIAL_JSON, *scope)]
    if curves:
        reads.append(lambda c: c.fetch(queries.REPORT_CURVES, *scope))
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_NO_JIT)
        side = await _side_reads(conn, helpers, reads) if helpers else []
        try:
            row = await conn.fetchrow(queries.REPORT_TRIALS, *scope)
            journal = await _check_scope(conn, model_run_id, dataset, len(row["id"] or ()), live)
            json_row, *more = [await each for each in side] + [await read(conn) for read in reads[len(side):]]
        finally:  # an unknown scope: the side reads stop, and their connections are free again when this returns
            for each in side:
                each.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        aggregates = None
        if dataset is None and live:
            found = await conn.fetch(queries.REPORT_AGGREGATES, model_run_id or OVERALL)
            aggregates = {(r["spectral_norm"], r["status"]): dict(r) for r in found}
    with paused_gc():
        trials = TrialTable(_trial_columns(row, json_row), TrialRecord)
    points = [CurvePoint(r["spectral_norm"], r["epoch"], r["n"], r["mean"], r["std"], r["elapsed_s"])
              for r in (more[0] if more else [])]
    return ComparisonData(trials, aggregates, points, model_run_id, dataset, journal)
