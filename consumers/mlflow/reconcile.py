"""Compare every trial of the read model with MLflow, and repair what diverges (`sntrack reconcile`).

Runs are searched in each study's experiment (`SNTRACK_MLFLOW_EXPERIMENT`, `{study}` = model_run_id) by their tags
(deleted ones included, to tell "deleted" from "missing"); the run the read model links a trial to
(`trial_mlflow_runs`) is fetched by id when its tags no longer lead to it. Divergences, per trial:

- missing_run: no run carries the trial → repair creates one (under the trial's lock, as the consumer does);
- deleted_run: its only run is deleted (restorable) → repair restores it, then fixes it;
- duplicate_runs: more than one active run → repair keeps the run with the most data (params and metric keys),
  the linked one on a tie, then the oldest; the others are deleted the restorable way (`runs/delete`, `mlflow gc`
  never runs here); a consumer whose run was deleted relinks to the kept one;
- tag: trial_id, model_run_id, spectral_norm, constraint_method or status missing or different;
- param: a param of the start event (schemas.mlflow.trial_params) missing or different;
- curve: an epoch's measurement or singular value (trial_metrics) missing or different at its step;
- metric: a final measurement of a finished trial missing or different (latest value);
- status: the run's state is not the trial's (RUNNING / FINISHED / FAILED / KILLED);
- link: the read model names another run than the one kept → repair records the kept one in mlflow_runs.

Repair never writes the state or status tag of a running trial (the consumer may be ahead of the read model; a
finished trial's state is final), so it is safe beside a live consumer
(tests/test_mlflow_identity.py::test_reconcile_repair_beside_the_consumer). A trial the sync consumer has not
reached yet shows up too (reconcile compares a moment, not a process): run it again, or repair.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from consumers.mlflow.client import MlflowNotFound, MlflowRest, RunRecord, filter_string
from consumers.mlflow.expected import RUN_STATUS, TERMINAL, advisory_key
from consumers.mlflow.sync import LINK_LOCK, SELECT_LINK, UPSERT_LINK
from schemas import MetricPayload, StartPayload
from schemas.mlflow import epoch_metrics, experiment_name, run_name, trial_params, trial_tags

HISTORY_CONCURRENCY = 8  # metric-history requests in flight (one per run and key)

SELECT_TRIALS = """
SELECT t.id, t.model_run_id, t.spectral_norm, t.status, t.metrics, t.last_seq, t.started_at, t.finished_at,
       t.inserted_at, v.mlflow_run_id, t.hyperparams, t.dataset, t.model, t.seed, t.optuna_trial_number,
       t.paired_with,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('epoch', m.epoch, 'measurements', m.measurements,
                                                     'spectral_norms', m.spectral_norms, 'at', m.occurred_at)),
                        '[]')
        FROM trial_metrics m WHERE m.trial_id = t.id) AS curve
FROM trials t JOIN trial_mlflow_runs v ON v.trial_id = t.id
WHERE $1::text IS NULL OR t.model_run_id = $1
ORDER BY t.id
"""
STUDIES = "SELECT DISTINCT model_run_id FROM trials ORDER BY 1"


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
    params: dict[str, str] = field(default_factory=dict)  # empty until the start is in the read model
    curve: dict[str, dict[int, float]] = field(default_factory=dict)  # metric key → step (epoch) → value
    curve_times: dict[int, int] = field(default_factory=dict)  # epoch → occurred_at ms

    @property
    def tags(self) -> dict[str, str]:
        """The tags to check; a running trial's status tag is the consumer's to set (it may be ahead)."""
        return trial_tags(self.id, self.model_run_id, self.spectral_norm,
                          self.status if self.status in TERMINAL else None)

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


def _trial(r: asyncpg.Record) -> Trial:
    params = {}
    if r["dataset"] is not None:  # the start is in the read model
        params = trial_params(StartPayload(
            spectral_norm=r["spectral_norm"], hyperparams=json.loads(r["hyperparams"]), dataset=r["dataset"],
            model=r["model"] or "", seed=r["seed"] or 0, optuna_trial_number=r["optuna_trial_number"],
            paired_with=r["paired_with"]))
    curve: dict[str, dict[int, float]] = {}
    times: dict[int, int] = {}
    for point in json.loads(r["curve"]):
        payload = MetricPayload(epoch=point["epoch"], measurements=point["measurements"],
                                spectral_norms=point["spectral_norms"])
        times[payload.epoch] = _millis(datetime.fromisoformat(point["at"]))
        for key, value in epoch_metrics(payload).items():
            curve.setdefault(key, {})[payload.epoch] = value
    return Trial(r["id"], r["model_run_id"], r["spectral_norm"], r["status"], json.loads(r["metrics"]),
                 r["last_seq"], r["started_at"] or r["inserted_at"], r["finished_at"], r["mlflow_run_id"],
                 params, curve, times)


async def load_trials(conn: asyncpg.Connection, model_run_id: str | None) -> list[Trial]:
    return [_trial(r) for r in await conn.fetch(SELECT_TRIALS, model_run_id)]


async def studies(conn: asyncpg.Connection) -> list[str]:
    """The studies (model_run_id) the read model holds."""
    return [r["model_run_id"] for r in await conn.fetch(STUDIES)]


async def fetch_runs(client: MlflowRest, experiment_ids: list[str], trials: list[Trial],
                     model_run_id: str | None) -> tuple[dict[str, list[RunRecord]], dict[str, RunRecord]]:
    """MLflow's runs by their trial_id tag, and every run seen by id (linked runs fetched when not found)."""
    filter_ = filter_string("model_run_id", model_run_id) if model_run_id else ""
    by_id: dict[str, RunRecord] = {}
    for experiment_id in experiment_ids:
        by_id.update({r.run_id: r for r in await client.search_runs(experiment_id, filter_, include_deleted=True)})
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


def diagnose(trial: Trial, tagged: list[RunRecord], by_id: dict[str, RunRecord],
             curves: dict[str, dict[str, dict[int, float]]]) -> Verdict:
    """The trial's divergences; `curves` holds the metric histories fetched per run (run → key → step → value)."""
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
        ranked = sorted(active, key=lambda r: (-(len(r.params) + len(r.metrics)), r.run_id != trial.linked_run_id,
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
    for key, expected in trial.params.items():
        found = run.params.get(key)
        if found != expected:
            diverges("param", run.run_id, f"{key}: expected {expected!r}, found {_shown(found)}")
    history = curves.get(run.run_id, {})
    for key, expected_points in trial.curve.items():
        found_points = history.get(key, {})
        wrong = sorted(step for step, value in expected_points.items()
                       if step not in found_points or not _same(found_points[step], value))
        if wrong:
            diverges("curve", run.run_id, f"{key}: {len(wrong)} of {len(expected_points)} epochs missing or "
                     f"different (first: epoch {wrong[0]})")
    for key, expected in trial.final_metrics.items():
        found = run.metrics.get(key)
        if found is None or not _same(found, expected):
            diverges("metric", run.run_id, f"{key}: expected {expected!r}, found {_shown(found)}")
    if trial.status in TERMINAL and run.status != RUN_STATUS[trial.status]:
        diverges("status", run.run_id, f"expected {RUN_STATUS[trial.status]}, found {run.status}")
    if trial.linked_run_id != run.run_id:
        diverges("link", run.run_id, f"read model links {trial.linked_run_id or 'no run'}")
    return verdict


async def fetch_curves(client: MlflowRest, trials: list[Trial], by_trial: dict[str, list[RunRecord]],
                       by_id: dict[str, RunRecord]) -> dict[str, dict[str, dict[int, float]]]:
    """The metric history of every curve key of every run (deleted ones too) that may hold a trial."""
    wanted = {(run.run_id, key) for t in trials
              for run in [*by_trial.get(t.id, []), by_id.get(t.linked_run_id or "")] if run is not None
              for key in t.curve}
    gate = asyncio.Semaphore(HISTORY_CONCURRENCY)

    async def one(run_id: str, key: str) -> dict[int, float]:
        async with gate:
            return await client.metric_history(run_id, key)

    keys = sorted(wanted)
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for (run_id, key), history in zip(keys, await asyncio.gather(*(one(*k) for k in keys)), strict=True):
        curves.setdefault(run_id, {})[key] = history
    return curves


async def check(conn: asyncpg.Connection, client: MlflowRest, experiments: dict[str, str],
                template: str, model_run_id: str | None) -> list[Verdict]:
    """`experiments` caches experiment name → id (created when missing)."""
    trials = await load_trials(conn, model_run_id)
    for name in {experiment_name(template, t.model_run_id) for t in trials} - experiments.keys():
        experiments[name] = await client.experiment_id(name)
    ids = sorted({experiments[experiment_name(template, t.model_run_id)] for t in trials})
    by_trial, by_id = await fetch_runs(client, ids, trials, model_run_id)
    curves = await fetch_curves(client, trials, by_trial, by_id)
    return [diagnose(t, by_trial.get(t.id, []), by_id, curves) for t in trials]


async def _run_for(conn: asyncpg.Connection, client: MlflowRest, experiment_id: str, trial: Trial) -> str:
    """A run for a trial that had none, chosen as the consumer chooses, under the same lock: the link a consumer
    committed meanwhile, else a run found by tag, else a new one."""
    async with conn.transaction():
        await conn.execute(LINK_LOCK, advisory_key(trial.id))
        row = await conn.fetchrow(SELECT_LINK, trial.id)
        if row is not None:
            return row["run_id"]
        runs = await client.search_runs(experiment_id, filter_string("trial_id", trial.id))
        if runs:
            return min(runs, key=lambda r: (r.start_time, r.run_id)).run_id
        run_id = await client.create_run(experiment_id, run_name(trial.id, trial.spectral_norm),
                                         _millis(trial.started_at), trial.tags)
        await conn.execute(UPSERT_LINK, trial.id, run_id, experiment_id, "repaired", trial.status)
        return run_id


async def repair(conn: asyncpg.Connection, client: MlflowRest, experiment_id: str, verdict: Verdict) -> None:
    """Make MLflow and the link match the trial: create or restore its run, drop extra runs, set tags, missing
    params, the curve, final metrics and (finished trials only) the state; record the link."""
    trial = verdict.trial
    if verdict.keep is None:
        run_id, present = await _run_for(conn, client, experiment_id, trial), {}
    else:
        run_id, present = verdict.keep.run_id, verdict.keep.params
        if verdict.restore is not None:
            await client.restore_run(run_id)
    for extra in verdict.drop:
        await client.delete_run(extra.run_id)
    millis = _millis(trial.finished_at) if trial.finished_at else _millis(trial.started_at)
    metrics = [(key, value, trial.curve_times[step], step)
               for key, points in trial.curve.items() for step, value in points.items()]
    metrics += [(k, v, millis, trial.last_seq) for k, v in trial.final_metrics.items()]
    params = {k: v for k, v in trial.params.items() if k not in present}  # a param, once logged, cannot change
    await client.log_batch(run_id, tags=trial.tags, params=params, metrics=metrics)
    if trial.status in TERMINAL:
        await client.update_run(run_id, RUN_STATUS[trial.status], millis)
    async with conn.transaction():
        await conn.execute(LINK_LOCK, advisory_key(trial.id))
        await conn.execute(UPSERT_LINK, trial.id, run_id, experiment_id, "repaired", trial.status)


async def reconcile(conn: asyncpg.Connection, client: MlflowRest, template: str, *,
                    model_run_id: str | None = None, fix: bool = False) -> Outcome:
    """Check (and with `fix`, repair) the trials of one study or all; `template` is SNTRACK_MLFLOW_EXPERIMENT."""
    experiments: dict[str, str] = {}
    verdicts = await check(conn, client, experiments, template, model_run_id)
    outcome = Outcome(len(verdicts), [d for v in verdicts for d in v.divergences])
    if not fix or not outcome.divergences:
        return outcome
    broken = [v for v in verdicts if v.divergences]
    errors: dict[str, str] = {}
    for verdict in broken:
        try:
            await repair(conn, client, experiments[experiment_name(template, verdict.trial.model_run_id)], verdict)
        except Exception as exc:  # noqa: BLE001 - reported per trial; the others are still repaired
            errors[verdict.trial.id] = f"{type(exc).__name__}: {exc}"
    again = {v.trial.id: v for v in await check(conn, client, experiments, template, model_run_id)}
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


def _same(found: float, expected: float) -> bool:
    return math.isclose(found, expected, rel_tol=1e-9, abs_tol=1e-12)


def _shown(value: object) -> str:
    return "missing" if value is None else repr(value)


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
