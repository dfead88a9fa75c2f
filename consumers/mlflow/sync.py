"""The `mlflow` consumer: every trial has exactly one MLflow run with the trial's tags, params, learning curve,
final metrics and state, whoever produced the trial.

Per trial, the events of a batch (in seq order) become at most two requests: one `log-batch` (tags, the start's
params, every epoch's measurements and per-layer singular values at step = epoch, the stop's final measurements)
and, when the batch holds the stop, `runs/update` with the terminal state (FINISHED / FAILED / KILLED).

Which run holds a trial (docs/mlflow.md, "One run per trial"): the start event decides. A start that carries a
run id names the worker's run; a start without one leaves the run to this consumer, which creates it under a
PostgreSQL advisory lock per trial and commits the link in `mlflow_runs` before the lock is released, so
redelivered or concurrent events (any number of consumer instances, `reconcile --repair`) find it. Linking, in
order: the recorded link; the start's run id (for a metric or stop without its start in the batch, the start in
the journal); the run found by the `trial_id` tag (a crash between creating and committing); else a new run — only
when the start is known to carry no run id (a metric or stop that overtook its start waits for
it, at most `mlflow_max_attempts` retries). A linked run that was deleted (`reconcile --repair` removed a
duplicate, a user) is replaced by the run found by tag, else restored: the consumer relinks, it never
dead-letters for it. Proved by tests/test_mlflow_identity.py.

Rate: the batch's trials without a link are linked together, in one transaction holding their locks (taken in
key order), their runs found or created concurrently; then every trial's calls go out, up to
`mlflow_concurrency` trials at once; then one transaction records what was synced. Stop (SIGTERM): no trial starts
its calls any more, those in flight finish and are recorded, the batch stays unacked
(tests/test_mlflow_stop.py).

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

LINK_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
# The same locks for many trials in one statement, taken in key order (PostgreSQL evaluates the call after the
# sort): two consumer instances linking overlapping trials never wait on each other in a cycle.
LINK_LOCKS = """
SELECT count(pg_advisory_xact_lock(key))
FROM (SELECT DISTINCT hashtextextended(name, 0) AS key FROM unnest($1::text[]) AS name ORDER BY key) AS keys
"""
SELECT_LINK = "SELECT run_id, origin, status FROM mlflow_runs WHERE trial_id = $1"
SELECT_LINKS = "SELECT trial_id, run_id, origin, status FROM mlflow_runs WHERE trial_id = ANY($1::text[])"
# The starts as the journal recorded them: tell metrics or stops that overtook their start whose run holds the trial.
SELECT_JOURNAL_STARTS = """
SELECT DISTINCT ON (trial_id) trial_id, envelope FROM events
WHERE trial_id = ANY($1::text[]) AND event_type = 'ml.run.start' ORDER BY trial_id, position
"""
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


@dataclass(frozen=True)
class Synced:
    """A trial whose events of the batch are in MLflow, on the run `link` names."""

    events: list[Event]
    link: Link


class StartPending(Exception):
    """A metric or stop overtook its start, and nothing yet says whose run holds the trial."""


class Stopping(Exception):
    """The consumer is stopping: this trial's calls were not started; it is left to the next run."""


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


async def create_trial_run(client: MlflowRest, experiment_id: str, events: Sequence[Event], spectral_norm: bool) -> str:
    """A new run for the events' trial: its name, its start's time (else the first event's), its tags, running."""
    first = events[0]
    start = next((e for e in events if isinstance(e, RunStarted)), first)
    return await client.create_run(experiment_id, run_name(first.trial_id, spectral_norm), _millis(start),
                                   trial_tags(first.trial_id, first.model_run_id, spectral_norm, "running"))


async def send(client: MlflowRest, run_id: str, writes: Writes) -> None:
    """A trial's writes of one batch: one log-batch and, for a stop, runs/update, sent together."""
    calls = [client.log_batch(run_id, tags=writes.tags, params=writes.params, metrics=writes.metrics)]
    if writes.state is not None:
        calls.append(client.update_run(run_id, *writes.state))
    await asyncio.gather(*calls)


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
        self._calls = asyncio.Semaphore(self.config.concurrency)  # trials with MLflow calls in flight
        self._stopping = False
        self._said_disabled = False

    def stop(self) -> None:
        """The consumer is stopping (the runtime calls this): no trial starts its calls any more; those in flight
        finish and are recorded, and the batch stays unacked, so the rest is synced by the next run."""
        self._stopping = True

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
        # A stop's two calls go out together, so each trial in flight may hold two connections.
        self._client = self._client or MlflowRest(self.config.tracking_uri, self.config.timeout_s,
                                                  connections=2 * self.config.concurrency)
        by_trial, links = await self._pending(events)
        await self._experiments_of({trial[0].model_run_id for trial in by_trial.values()})
        failures: list[BaseException] = []
        unlinked = {trial_id: trial for trial_id, trial in by_trial.items() if trial_id not in links}
        if unlinked:
            linked, failures = await self._link(unlinked)
            links.update(linked)
        outcomes = await asyncio.gather(*(self._sync_trial(trial, links[trial_id])
                                          for trial_id, trial in by_trial.items() if trial_id in links),
                                        return_exceptions=True)
        await self._record([o for o in outcomes if isinstance(o, Synced)])
        failures += [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            await self._settle(failures, single=len(events) == 1)

    def experiment(self, model_run_id: str) -> str:
        return experiment_name(self.config.experiment, model_run_id)

    def _experiment_id(self, event: Event) -> str:
        return self._experiments[self.experiment(event.model_run_id)]

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

    async def _sync_trial(self, events: list[Event], link: Link) -> Synced:
        try:
            try:
                link = await self._write(events, link)
            except MlflowRejected as exc:
                if not await self._gone(link.run_id, exc):
                    raise
                relinked, failures = await self._link({events[0].trial_id: events}, stale=link.run_id)
                if failures:
                    raise failures[0] from None
                link = await self._write(events, relinked[events[0].trial_id])
        except (MlflowUnavailable, MlflowRejected, StartPending, Stopping) as exc:
            raise _Failed(events[0], exc) from None
        return Synced(events, link)

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
        async with self._calls:
            if self._stopping:
                raise Stopping
            await send(self._client, link.run_id, writes)
        first = events[0]
        self.log.debug("run synced", run_id=link.run_id, events=len(events), event_id=str(first.event_id),
                       trial_id=first.trial_id, event_type=first.event_type)
        return replace(link, status=writes.status) if writes.status else link

    async def _link(self, trials: dict[str, list[Event]], stale: str | None = None) \
            -> tuple[dict[str, Link], list[BaseException]]:
        """The runs of trials that have no link (or whose linked run `stale` is gone), decided under the trials'
        advisory locks (see the module docstring): one transaction for them all, the runs found or created
        concurrently, every link committed before the locks are released. Returns the links and the failures."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(LINK_LOCKS, [advisory_key(trial_id) for trial_id in trials])
            recorded = {r["trial_id"]: r for r in await conn.fetch(SELECT_LINKS, list(trials))}
            links = {trial_id: Link(r["run_id"], r["origin"], r["status"])
                     for trial_id, r in recorded.items() if r["run_id"] != stale}
            undecided = {trial_id: trial for trial_id, trial in trials.items() if trial_id not in links}
            without_start = [t for t, trial in undecided.items() if not any(isinstance(e, RunStarted) for e in trial)]
            journal = {r["trial_id"]: json.loads(r["envelope"])["payload"]
                       for r in await conn.fetch(SELECT_JOURNAL_STARTS, without_start)} if without_start else {}
            outcomes = await asyncio.gather(*(self._choose(trial, journal.get(t), stale)
                                              for t, trial in undecided.items()), return_exceptions=True)
            failures: list[BaseException] = []
            chosen = {}
            for (trial_id, trial), outcome in zip(undecided.items(), outcomes, strict=True):
                if isinstance(outcome, MlflowUnavailable | MlflowRejected | StartPending | Stopping):
                    failures.append(_Failed(trial[0], outcome))
                elif isinstance(outcome, BaseException):
                    failures.append(outcome)
                else:
                    chosen[trial_id] = replace(outcome, status=recorded[trial_id]["status"]) \
                        if trial_id in recorded else outcome
            await conn.executemany(UPSERT_LINK, [(trial_id, link.run_id, self._experiment_id(trials[trial_id][0]),
                                                  link.origin, link.status) for trial_id, link in chosen.items()])
        for trial_id, link in chosen.items():
            first = trials[trial_id][0]
            self.log.info("trial linked to an MLflow run", run_id=link.run_id, origin=link.origin, replaced=stale,
                          event_id=str(first.event_id), trial_id=trial_id, event_type=first.event_type)
        return links | chosen, failures

    async def _choose(self, events: list[Event], journal_start: dict | None, stale: str | None) -> Link:
        """A trial's run when no link names one: the start's run id, else the run found by tag, else (the start
        known to carry no run id) a new run. `journal_start`: the start's payload as the journal recorded it, for
        events that overtook their start."""
        first = events[0]
        start = next((e for e in events if isinstance(e, RunStarted)), None)
        described = start.payload.model_dump() if start is not None else journal_start
        if described and described.get("mlflow_run_id") and described["mlflow_run_id"] != stale:
            return Link(described["mlflow_run_id"], "event", "running")
        experiment_id = self._experiment_id(first)
        async with self._calls:
            if self._stopping:
                raise Stopping
            runs = await self._client.search_runs(experiment_id, filter_string("trial_id", first.trial_id))
            if runs:
                return Link(min(runs, key=lambda r: (r.start_time, r.run_id)).run_id, "found", "running")
            if stale is not None:  # its only run was deleted: bring that one back rather than start another
                await self._client.restore_run(stale)
                return Link(stale, "found", "running")
            if described is None and self._attempts.get(first.event_id, 0) < self.config.max_attempts:
                raise StartPending(f"{first.event_type} of trial {first.trial_id} arrived before its start; "
                                   "waiting for it to learn which run holds the trial")
            flag = bool((described or {}).get("spectral_norm", next(
                (e.payload.spectral_norm for e in events if isinstance(e, RunStopped)), False)))
            run_id = await create_trial_run(self._client, experiment_id, events, flag)
        return Link(run_id, "created", "running")

    async def _record(self, synced: list[Synced]) -> None:
        """The synced trials' events applied and their status recorded, in one transaction."""
        if not synced:
            return
        async with self.store.pool.acquire() as conn, conn.transaction():
            await unapplied(conn, self.name, [e for s in synced for e in s.events], record=True)
            await conn.executemany(RECORD_STATUS, [
                (s.events[0].trial_id, s.link.run_id, self._experiment_id(s.events[0]), s.link.origin, s.link.status)
                for s in synced])
        for event in (e for s in synced for e in s.events):
            self._attempts.pop(event.event_id, None)

    async def _settle(self, failures: list[BaseException], *, single: bool) -> None:
        """Turn the trials' failures into the runtime's verdict for the batch (see the module docstring)."""
        for failure in failures:
            if not isinstance(failure, _Failed):
                raise failure  # a bug: the runtime isolates the event and returns it to the queue
        if self._stopping:
            raise RetryLater(f"stopping: {len(failures)} trial(s) of the batch left unsynced for the next run")
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
