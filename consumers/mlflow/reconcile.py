"""Compare every trial of the read model with MLflow, and repair what diverges (`sntrack reconcile`).

Runs are searched in the configured experiment by their tags (deleted ones included, to tell "deleted" from
"missing"); the run the read model links a trial to (`trial_mlflow_runs`) is fetched by id when its tags no
longer lead to it. Divergences, per trial:

- missing_run: no run carries the trial → repair creates one with the tags, final metrics and state;
- deleted_run: its only run is deleted (restorable) → repair restores it, then fixes it;
- duplicate_runs: more than one active run → repair keeps the run with the most data (params and metric keys:
  the worker's run with its learning curve and artifacts beats a run the consumer created), the linked one on a
  tie, then the oldest; the others are deleted the restorable way (`runs/delete`, `mlflow gc` never runs here);
- tag: trial_id, model_run_id, spectral_norm, constraint_method or status missing or different;
- metric: a final measurement of a finished trial missing or different (latest value);
- status: the run's state is not the trial's (RUNNING / FINISHED / FAILED / KILLED);
- link: the read model names another run than the one kept → repair records the kept one in mlflow_runs.

A trial the sync consumer has not reached yet shows up too (reconcile compares a moment, not a process):
run it again, or repair — the consumer then finds the repaired run by its link.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from consumers.mlflow.client import MlflowNotFound, MlflowRest, RunRecord, filter_string
from consumers.mlflow.expected import RUN_STATUS, TERMINAL, advisory_key, trial_tags
from consumers.mlflow.sync import LINK_LOCK, UPSERT_LINK

SELECT_TRIALS = """
SELECT t.id, t.model_run_id, t.spectral_norm, t.status, t.metrics, t.last_seq, t.started_at, t.finished_at,
       t.inserted_at, v.mlflow_run_id
FROM trials t JOIN trial_mlflow_runs v ON v.trial_id = t.id
WHERE $1::text IS NULL OR t.model_run_id = $1
ORDER BY t.id
"""


@dataclass(frozen=True)
class Trial:
    id: str
    model_run_id: str
    spectral_norm: bool
    status: str
    metrics: dict[str, float]
    last_seq: int
    started_at: datetime
    finished_at: datetime | None
    linked_run_id: str | None

    @property
    def tags(self) -> dict[str, str]:
        return trial_tags(self.id, self.model_run_id, self.spectral_norm, self.status)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.metrics if self.status in TERMINAL else {}


@dataclass(frozen=True)
class Divergence:
    trial_id: str
    kind: str
    run_id: str | None
    detail: str


@dataclass
class Verdict:
    """One trial's divergences and the run that should hold it (None when it has no usable run)."""

    trial: Trial
    divergences: list[Divergence] = field(default_factory=list)
    keep: RunRecord | None = None
    drop: list[RunRecord] = field(default_factory=list)
    restore: RunRecord | None = None


@dataclass
class Outcome:
    checked: int
    divergences: list[Divergence]
    repaired: list[Divergence] = field(default_factory=list)
    unrepaired: list[Divergence] = field(default_factory=list)


async def load_trials(conn: asyncpg.Connection, model_run_id: str | None) -> list[Trial]:
    rows = await conn.fetch(SELECT_TRIALS, model_run_id)
    return [Trial(r["id"], r["model_run_id"], r["spectral_norm"], r["status"], json.loads(r["metrics"]),
                  r["last_seq"], r["started_at"] or r["inserted_at"], r["finished_at"], r["mlflow_run_id"])
            for r in rows]


async def fetch_runs(client: MlflowRest, experiment_id: str, trials: list[Trial],
                     model_run_id: str | None) -> tuple[dict[str, list[RunRecord]], dict[str, RunRecord]]:
    """MLflow's runs by their trial_id tag, and every run seen by id (linked runs fetched when not found)."""
    filter_ = filter_string("model_run_id", model_run_id) if model_run_id else ""
    runs = await client.search_runs(experiment_id, filter_, include_deleted=True)
    by_id = {r.run_id: r for r in runs}
    for trial in trials:
        if trial.linked_run_id and trial.linked_run_id not in by_id:
            try:
                by_id[trial.linked_run_id] = await client.get_run(trial.linked_run_id)
            except MlflowNotFound:
                pass
    by_trial: dict[str, list[RunRecord]] = {}
    for run in by_id.values():
        by_trial.setdefault(run.tags.get("trial_id", ""), []).append(run)
    return by_trial, by_id


def diagnose(trial: Trial, tagged: list[RunRecord], by_id: dict[str, RunRecord]) -> Verdict:
    verdict = Verdict(trial)
    linked = by_id.get(trial.linked_run_id or "")
    candidates = {r.run_id: r for r in tagged}
    if linked is not None:
        candidates[linked.run_id] = linked
    active = [r for r in candidates.values() if r.active]

    def diverges(kind: str, run_id: str | None, detail: str) -> None:
        verdict.divergences.append(Divergence(trial.id, kind, run_id, detail))

    if not active:
        deleted = sorted(candidates.values(), key=lambda r: (r.run_id != trial.linked_run_id, -r.start_time))
        if deleted:
            verdict.restore = verdict.keep = deleted[0]
            diverges("deleted_run", deleted[0].run_id, "the trial's run is deleted")
        else:
            diverges("missing_run", None, "no run carries this trial_id")
            return verdict
    else:
        ranked = sorted(active, key=lambda r: (-(r.params + len(r.metrics)), r.run_id != trial.linked_run_id,
                                               r.start_time, r.run_id))
        verdict.keep, verdict.drop = ranked[0], ranked[1:]
        if verdict.drop:
            diverges("duplicate_runs", verdict.keep.run_id,
                     f"{len(active)} active runs; keep {verdict.keep.run_id}, extra "
                     + ", ".join(r.run_id for r in verdict.drop))
    run = verdict.keep
    for key, expected in trial.tags.items():
        found = run.tags.get(key)
        if found != expected:
            diverges("tag", run.run_id, f"{key}: expected {expected!r}, found {_shown(found)}")
    for key, expected in trial.final_metrics.items():
        found = run.metrics.get(key)
        if found is None or not math.isclose(found, expected, rel_tol=1e-9, abs_tol=1e-12):
            diverges("metric", run.run_id, f"{key}: expected {expected!r}, found {_shown(found)}")
    if run.status != RUN_STATUS[trial.status]:
        diverges("status", run.run_id, f"expected {RUN_STATUS[trial.status]}, found {run.status}")
    if trial.linked_run_id != run.run_id:
        diverges("link", run.run_id, f"read model links {trial.linked_run_id or 'no run'}")
    return verdict


async def check(conn: asyncpg.Connection, client: MlflowRest, experiment_id: str,
                model_run_id: str | None) -> list[Verdict]:
    trials = await load_trials(conn, model_run_id)
    by_trial, by_id = await fetch_runs(client, experiment_id, trials, model_run_id)
    return [diagnose(t, by_trial.get(t.id, []), by_id) for t in trials]


async def repair(conn: asyncpg.Connection, client: MlflowRest, experiment_id: str, verdict: Verdict) -> None:
    """Make MLflow and the link match the trial: create or restore its run, drop extra runs, set tags, final
    metrics and state in two calls, record the link."""
    trial = verdict.trial
    millis = _millis(trial.finished_at) if trial.finished_at else None
    if verdict.keep is None:
        run_id = await client.create_run(experiment_id, trial.id, _millis(trial.started_at), trial.tags)
    else:
        run_id = verdict.keep.run_id
        if verdict.restore is not None:
            await client.restore_run(run_id)
    for extra in verdict.drop:
        await client.delete_run(extra.run_id)
    metrics = [(k, v, millis or _millis(trial.started_at), trial.last_seq) for k, v in trial.final_metrics.items()]
    await client.log_batch(run_id, tags=trial.tags, metrics=metrics)
    await client.update_run(run_id, RUN_STATUS[trial.status], millis if trial.status in TERMINAL else None)
    async with conn.transaction():
        await conn.execute(LINK_LOCK, advisory_key(trial.id))
        await conn.execute(UPSERT_LINK, trial.id, run_id, experiment_id, "repaired", trial.status)


async def reconcile(conn: asyncpg.Connection, client: MlflowRest, experiment_name: str, *,
                    model_run_id: str | None = None, fix: bool = False) -> Outcome:
    experiment_id = await client.experiment_id(experiment_name)
    verdicts = await check(conn, client, experiment_id, model_run_id)
    outcome = Outcome(len(verdicts), [d for v in verdicts for d in v.divergences])
    if not fix or not outcome.divergences:
        return outcome
    broken = [v for v in verdicts if v.divergences]
    errors: dict[str, str] = {}
    for verdict in broken:
        try:
            await repair(conn, client, experiment_id, verdict)
        except Exception as exc:  # noqa: BLE001 - reported per trial; the others are still repaired
            errors[verdict.trial.id] = f"{type(exc).__name__}: {exc}"
    again = {v.trial.id: v for v in await check(conn, client, experiment_id, model_run_id)}
    for verdict in broken:
        left = again[verdict.trial.id].divergences if verdict.trial.id in again else []
        reason = errors.get(verdict.trial.id)
        for divergence in verdict.divergences:
            still = [d for d in left if d.kind == divergence.kind]
            if reason or still:
                why = reason or f"still diverges after the repair: {still[0].detail}"
                outcome.unrepaired.append(Divergence(divergence.trial_id, divergence.kind, divergence.run_id, why))
            else:
                outcome.repaired.append(divergence)
    return outcome


def _shown(value: object) -> str:
    return "missing" if value is None else repr(value)


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
