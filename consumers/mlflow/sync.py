"""The `mlflow` consumer: every trial has exactly one MLflow run with the trial's tags, params, learning curve,
final metrics and state, whoever produced the trial.

Per trial, the events of a batch (in seq order) become at most two requests: one `log-batch` (tags, the start's
params, every epoch's measurements and per-layer singular values at step = epoch, the stop's final measurements)
and, when the batch holds the stop, `runs/update` with the terminal state (FINISHED / FAILED / KILLED).

Which run holds a trial (docs/mlflow.md, "One run per trial"): the start event decides. A start that carries a
run id names the worker's run; a start without one leaves the run to this consumer, which creates it under a
PostgreSQL advisory lock per trial and commits the link in `mlflow_runs` before the lock is released, so
redelivered or concurrent events (any number of consumer instances, `reconcile --repair`) find it. Linking, in
order: the recorded link; the start's run id; the run found by the `trial_id` tag (a crash between creating and
committing, a worker's run already tagged); for an event that is not a start, the start in the journal; else a
new run — only when the start is known to carry no run id (a metric or stop that overtook its start waits for
it, at most `mlflow_max_attempts` retries). A linked run that was deleted (`reconcile --repair` removed a
duplicate, a user) is replaced by the run found by tag, else restored: the consumer relinks, it never
dead-letters for it. Proved by tests/test_mlflow_identity.py.

Failures (see docs/mlflow.md): MLflow unreachable → RetryLater, for as long as it is down (the runtime backs
off; the events wait in the queue; the other consumers run on). The server answers /health but this event's
calls keep failing (5xx, timeout) → counted per event; after `mlflow_max_attempts` → dead letter
`mlflow_unavailable`. The server rejects the request (4xx on a live run) → dead letter `mlflow_rejected` at once.
`sntrack reconcile --repair` converges what was dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import structlog

from common.errors import ConfigurationError
from common.urls import redact
from consumers.config import ConsumerConfig
from consumers.handler import DeadLetter, RetryLater
from consumers.mlflow.client import (
    MlflowError,
    MlflowNotFound,
    MlflowRejected,
    MlflowRest,
    MlflowUnavailable,
    check_tracking_uri,
    filter_string,
)
from consumers.mlflow.expected import RUN_STATUS, advisory_key
from consumers.persistence import Store, unapplied
from consumers.topology import QueueSpec
from schemas import Event, RunMetric, RunStarted, RunStopped
from schemas.mlflow import epoch_metrics, experiment_name, run_name, trial_params, trial_tags
from schemas.topology import RUN_METRIC, RUN_START, RUN_STOP

log = structlog.get_logger("sntrack.mlflow")

CONCURRENCY = 4  # trials synced at once; linking (which holds a database connection) is one at a time

LINK_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
SELECT_LINK = "SELECT run_id, origin, status FROM mlflow_runs WHERE trial_id = $1"
SELECT_LINKS = "SELECT trial_id, run_id, origin, status FROM mlflow_runs WHERE trial_id = ANY($1::text[])"
# The start as the journal recorded it: tells a metric or stop that overtook its start whose run holds the trial.
SELECT_JOURNAL_START = ("SELECT envelope FROM events WHERE trial_id = $1 AND event_type = 'ml.run.start' "
                        "ORDER BY position LIMIT 1")
UPSERT_LINK = """
INSERT INTO mlflow_runs AS m (trial_id, run_id, experiment_id, origin, status) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (trial_id) DO UPDATE SET
    run_id = EXCLUDED.run_id, experiment_id = EXCLUDED.experiment_id, origin = EXCLUDED.origin,
    status = CASE WHEN EXCLUDED.status <> 'running' THEN EXCLUDED.status ELSE m.status END,
    updated_at = now()
"""
# After syncing: record the status, but only on the run that was synced. A `reconcile --repair` may have moved
# the trial to another run meanwhile; only linking (under the trial's lock) and repair change run_id.
RECORD_STATUS = """
INSERT INTO mlflow_runs AS m (trial_id, run_id, experiment_id, origin, status) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (trial_id) DO UPDATE SET
    status = CASE WHEN EXCLUDED.status <> 'running' THEN EXCLUDED.status ELSE m.status END,
    updated_at = now()
WHERE m.run_id = EXCLUDED.run_id
"""


@dataclass(frozen=True)
class Link:
    run_id: str
    origin: str
    status: str  # the status last synced: a start never sets `running` over a terminal one


@dataclass
class Writes:
    """What a trial's events of one batch write to its run: one log-batch, and the terminal state if stopped."""

    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    state: tuple[str, int] | None = None  # (RUN_STATUS, end time ms)
    status: str | None = None  # the trial status these events establish (None: no change)


class StartPending(Exception):
    """A metric or stop overtook its start, and nothing yet says whose run holds the trial."""


class _Failed(Exception):
    def __init__(self, event: Event, error: Exception):
        super().__init__(str(error))
        self.event = event
        self.error = error


def _millis(event: Event) -> int:
    return int(event.occurred_at.timestamp() * 1000)


def writes_for(events: Sequence[Event]) -> Writes:
    """The trial's writes for these events (seq order). A start writes no status tag: `running` is set when the
    run is created, and a start handled after its stop (another instance, a redelivery) must not undo `completed`."""
    out = Writes()
    for event in events:
        if isinstance(event, RunStarted):
            p = event.payload
            out.tags.update(trial_tags(event.trial_id, event.model_run_id, p.spectral_norm, None))
            out.params.update(trial_params(p))
        elif isinstance(event, RunMetric):
            at = _millis(event)
            out.metrics.extend((k, v, at, event.payload.epoch) for k, v in epoch_metrics(event.payload).items())
        elif isinstance(event, RunStopped):
            p, at = event.payload, _millis(event)
            out.tags.update(trial_tags(event.trial_id, event.model_run_id, p.spectral_norm, p.status))
            out.metrics.extend((k, v, at, event.seq) for k, v in p.measurements.items())
            out.state, out.status = (RUN_STATUS[p.status], at), p.status
    return out


class MlflowSync:
    name = "mlflow"
    queue = QueueSpec("sntrack.mlflow", bindings=(RUN_START, RUN_METRIC, RUN_STOP))

    def __init__(self, store: Store, config: ConsumerConfig):
        self.config = config.mlflow
        if self.config.enabled:
            check_tracking_uri(self.config.tracking_uri)
        self.store = store
        self.log = log.bind(tracking_uri=redact(self.config.tracking_uri), experiment=self.config.experiment)
        self._client: MlflowRest | None = None
        self._experiments: dict[str, str] = {}  # experiment name → id
        self._attempts: dict[uuid.UUID, int] = {}
        self._trials = asyncio.Semaphore(CONCURRENCY)
        self._linking = asyncio.Semaphore(1)
        self._said_disabled = False

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def handle(self, events: Sequence[Event]) -> None:
        if not self.config.enabled:
            if not self._said_disabled:
                self.log.info("MLflow sync is disabled (SNTRACK_MLFLOW_ENABLED=false): events are acked unsynced; "
                              "`sntrack reconcile --repair` catches MLflow up later")
                self._said_disabled = True
            return
        self._client = self._client or MlflowRest(self.config.tracking_uri, self.config.timeout_s)
        by_trial, links = await self._pending(events)
        await self._experiments_of({trial[0].model_run_id for trial in by_trial.values()})
        outcomes = await asyncio.gather(*(self._sync_trial(trial_events, links.get(trial_id))
                                          for trial_id, trial_events in by_trial.items()), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            await self._settle(failures, single=len(events) == 1)

    def experiment(self, model_run_id: str) -> str:
        return experiment_name(self.config.experiment, model_run_id)

    async def _experiments_of(self, studies: set[str]) -> None:
        """The ids of the studies' experiments, created when missing."""
        for name in {self.experiment(s) for s in studies} - self._experiments.keys():
            try:
                self._experiments[name] = await self._client.experiment_id(name)
            except MlflowUnavailable as exc:
                raise RetryLater(f"MLflow unavailable: {exc}") from None
            except (MlflowError, ConfigurationError) as exc:
                # Refused credentials or a deleted experiment: an operator must act; keep the events meanwhile
                # instead of dead-lettering every one of them.
                raise RetryLater(f"MLflow experiment {name!r} unusable: {exc}") from None

    async def _pending(self, events: Sequence[Event]) -> tuple[dict[str, list[Event]], dict[str, Link]]:
        """The events not applied yet, by trial in seq order, and the trials' recorded links."""
        async with self.store.pool.acquire() as conn:
            # A late event of a study removed for good must not bring its MLflow runs back: unapplied leaves it out.
            fresh = await unapplied(conn, self.name, events, record=False)
            rows = await conn.fetch(SELECT_LINKS, list({e.trial_id for e in fresh}))
        by_trial: dict[str, list[Event]] = {}
        for event in sorted(fresh, key=lambda e: e.seq):
            by_trial.setdefault(event.trial_id, []).append(event)
        return by_trial, {r["trial_id"]: Link(r["run_id"], r["origin"], r["status"]) for r in rows}

    async def _sync_trial(self, events: list[Event], link: Link | None) -> None:
        async with self._trials:
            try:
                link = link or await self._link(events)
                try:
                    link = await self._write(events, link)
                except MlflowRejected as exc:
                    if not await self._gone(link.run_id, exc):
                        raise
                    link = await self._write(events, await self._link(events, stale=link.run_id))
            except (MlflowUnavailable, MlflowRejected, StartPending) as exc:
                raise _Failed(events[0], exc) from None
            await self._record(events, link)
        for event in events:
            self._attempts.pop(event.event_id, None)

    async def _gone(self, run_id: str, error: MlflowRejected) -> bool:
        """Was the request refused because the run is deleted (restorably: HTTP 400) or gone (404)?"""
        if isinstance(error, MlflowNotFound):
            return True
        try:
            return not (await self._client.get_run(run_id)).active
        except MlflowNotFound:
            return True

    async def _write(self, events: list[Event], link: Link) -> Link:
        writes = writes_for(events)
        calls = [self._client.log_batch(link.run_id, tags=writes.tags, params=writes.params, metrics=writes.metrics)]
        if writes.state is not None:
            calls.append(self._client.update_run(link.run_id, *writes.state))
        await asyncio.gather(*calls)
        first = events[0]
        self.log.debug("run synced", run_id=link.run_id, events=len(events), event_id=str(first.event_id),
                       trial_id=first.trial_id, event_type=first.event_type)
        return replace(link, status=writes.status) if writes.status else link

    async def _link(self, events: list[Event], stale: str | None = None) -> Link:
        """The trial's run, decided under the trial's advisory lock (see the module docstring); the link is
        committed before the lock is released."""
        first = events[0]
        start = next((e for e in events if isinstance(e, RunStarted)), None)
        experiment_id = self._experiments[self.experiment(first.model_run_id)]
        async with self._linking, self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(LINK_LOCK, advisory_key(first.trial_id))
            row = await conn.fetchrow(SELECT_LINK, first.trial_id)
            if row is not None and row["run_id"] != stale:
                return Link(row["run_id"], row["origin"], row["status"])
            link = await self._choose(conn, events, start, experiment_id, stale)
            if row is not None:
                link = replace(link, status=row["status"])
            await conn.execute(UPSERT_LINK, first.trial_id, link.run_id, experiment_id, link.origin, link.status)
        self.log.info("trial linked to an MLflow run", run_id=link.run_id, origin=link.origin, replaced=stale,
                      event_id=str(first.event_id), trial_id=first.trial_id, event_type=first.event_type)
        return link

    async def _choose(self, conn, events: list[Event], start: RunStarted | None, experiment_id: str,
                      stale: str | None) -> Link:
        first = events[0]
        described = start.payload.model_dump() if start is not None else None
        if described and described["mlflow_run_id"] and described["mlflow_run_id"] != stale:
            return Link(described["mlflow_run_id"], "event", "running")
        runs = await self._client.search_runs(experiment_id, filter_string("trial_id", first.trial_id))
        if runs:
            return Link(min(runs, key=lambda r: (r.start_time, r.run_id)).run_id, "found", "running")
        if stale is not None:  # its only run was deleted: bring that one back rather than start another
            await self._client.restore_run(stale)
            return Link(stale, "found", "running")
        if described is None:
            envelope = await conn.fetchval(SELECT_JOURNAL_START, first.trial_id)
            if envelope is not None:
                described = json.loads(envelope)["payload"]
                if described.get("mlflow_run_id"):
                    return Link(described["mlflow_run_id"], "event", "running")
            elif self._attempts.get(first.event_id, 0) < self.config.max_attempts:
                raise StartPending(f"{first.event_type} of trial {first.trial_id} arrived before its start; "
                                   "waiting for it to learn which run holds the trial")
        flag = bool((described or {}).get("spectral_norm", next(
            (e.payload.spectral_norm for e in events if isinstance(e, RunStopped)), False)))
        run_id = await self._client.create_run(experiment_id, run_name(first.trial_id, flag), _millis(start or first),
                                               trial_tags(first.trial_id, first.model_run_id, flag, "running"))
        return Link(run_id, "created", "running")

    async def _record(self, events: list[Event], link: Link) -> None:
        first = events[0]
        async with self.store.pool.acquire() as conn, conn.transaction():
            await unapplied(conn, self.name, events, record=True)
            await conn.execute(RECORD_STATUS, first.trial_id, link.run_id,
                               self._experiments[self.experiment(first.model_run_id)], link.origin, link.status)

    async def _settle(self, failures: list[BaseException], *, single: bool) -> None:
        """Turn the trials' failures into the runtime's verdict for the batch (see the module docstring)."""
        for failure in failures:
            if not isinstance(failure, _Failed):
                raise failure  # a bug: the runtime isolates the event and returns it to the queue
        rejected = [f for f in failures if isinstance(f.error, MlflowRejected)]
        if rejected:
            first = rejected[0]
            raise DeadLetter("mlflow_rejected", f"{first.event.event_type} of trial {first.event.trial_id}: "
                             f"{first.error}")
        for failure in failures:
            self._attempts[failure.event.event_id] = self._attempts.get(failure.event.event_id, 0) + 1
        first = failures[0]
        if all(isinstance(f.error, StartPending) for f in failures):
            raise RetryLater(str(first.error))
        if not await self._client.healthy():
            raise RetryLater(f"MLflow at {redact(self.config.tracking_uri)} is unreachable: {first.error}")
        worst = max(failures, key=lambda f: self._attempts[f.event.event_id])
        attempts = self._attempts[worst.event.event_id]
        if attempts >= self.config.max_attempts:
            if single:
                self._attempts.pop(worst.event.event_id, None)
            raise DeadLetter("mlflow_unavailable", f"{worst.event.event_type} of trial {worst.event.trial_id} "
                             f"failed {attempts} attempts while the server answered /health: {worst.error}")
        raise RetryLater(f"MLflow call failed (attempt {attempts} of {self.config.max_attempts}): "
                         f"{first.error}")
