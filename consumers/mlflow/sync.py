"""The `mlflow` consumer: every trial has exactly one MLflow run with the trial's tags, final metrics and state.

- start: link the trial to its run — the mapping already recorded, else the run id the event carries, else the
  run found by the `trial_id` tag, else a new run (created with its tags in the same call) — and set the tags
  trial_id, model_run_id, spectral_norm, constraint_method, status;
- stop: tags (status included) and the final measurements in one `log-batch`, and the terminal state
  (FINISHED / FAILED / KILLED) with `runs/update`, the two requests sent concurrently;
- metric events are not bound to this queue: the worker logs the learning curve itself.

Exactly one run per trial: linking a trial to a run happens under a PostgreSQL advisory lock per trial, and the
link is committed in `mlflow_runs` before anything else can look, so redelivered or concurrent starts (any number
of consumer instances) find it; a crash between creating the run and committing the link is healed by the
search by tag on the next delivery. The applied events and the link's status are committed together after the
MLflow calls succeeded; MLflow calls are idempotent (tags overwrite, metrics with the same key, value, step and
timestamp are the same point), so a redelivery after a crash repeats them harmlessly.

Failures (see docs/mlflow.md): MLflow unreachable → RetryLater, for as long as it is down (the runtime backs
off; the events wait in the queue; the other consumers run on). The server answers /health but this event's
calls keep failing (5xx, timeout) → counted per event; after `mlflow_max_attempts` → dead letter
`mlflow_unavailable`. The server rejects the request (4xx, e.g. a deleted run) → dead letter `mlflow_rejected`
at once. `sntrack reconcile --repair` converges what was dead-lettered.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from consumers.handler import DeadLetter, RetryLater
from consumers.mlflow.client import (
    MlflowError,
    MlflowNotFound,
    MlflowRejected,
    MlflowRest,
    MlflowUnavailable,
    filter_string,
)
from consumers.mlflow.expected import RUN_STATUS, TERMINAL, advisory_key, trial_tags
from consumers.persistence import Store
from consumers.topology import QueueSpec
from schemas import Event, RunStarted, RunStopped
from schemas.topology import RUN_START, RUN_STOP
from sntrack.settings import ConfigurationError, Settings

log = structlog.get_logger("sntrack.mlflow")

CONCURRENCY = 4  # trials synced at once; linking (which holds a database connection) is one at a time

LINK_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
SELECT_LINKS = "SELECT trial_id, run_id, origin, status FROM mlflow_runs WHERE trial_id = ANY($1::text[])"
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
SELECT_APPLIED = "SELECT event_id FROM applied_events WHERE projection = $1 AND event_id = ANY($2::uuid[])"
INSERT_APPLIED = ("INSERT INTO applied_events (projection, event_id) SELECT $1, unnest($2::uuid[]) "
                  "ON CONFLICT DO NOTHING")


@dataclass(frozen=True)
class Link:
    run_id: str
    origin: str
    status: str  # the status last synced: a start never sets `running` over a terminal one


class _Failed(Exception):
    def __init__(self, event: Event, error: Exception):
        super().__init__(str(error))
        self.event = event
        self.error = error


def _millis(event: Event) -> int:
    return int(event.occurred_at.timestamp() * 1000)


class MlflowSync:
    name = "mlflow"
    queue = QueueSpec("sntrack.mlflow", bindings=(RUN_START, RUN_STOP))

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.log = log.bind(tracking_uri=settings.mlflow_tracking_uri, experiment=settings.mlflow_experiment)
        self._client: MlflowRest | None = None
        self._experiment_id: str | None = None
        self._attempts: dict[uuid.UUID, int] = {}
        self._trials = asyncio.Semaphore(CONCURRENCY)
        self._linking = asyncio.Semaphore(1)
        self._said_disabled = False

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def handle(self, events: Sequence[Event]) -> None:
        if not self.settings.mlflow_enabled:
            if not self._said_disabled:
                self.log.info("MLflow sync is disabled (SNTRACK_MLFLOW_ENABLED=false): events are acked unsynced; "
                              "`sntrack reconcile --repair` catches MLflow up later")
                self._said_disabled = True
            return
        client = self._client or MlflowRest(self.settings.mlflow_tracking_uri, self.settings.mlflow_timeout_s)
        self._client = client
        try:
            if self._experiment_id is None:
                self._experiment_id = await client.experiment_id(self.settings.mlflow_experiment)
        except MlflowUnavailable as exc:
            raise RetryLater(f"MLflow unavailable: {exc}") from None
        except (MlflowError, ConfigurationError) as exc:
            # Refused credentials or a deleted experiment: an operator must act; keep the events meanwhile
            # instead of dead-lettering every one of them.
            raise RetryLater(f"MLflow experiment {self.settings.mlflow_experiment!r} unusable: {exc}") from None
        by_trial, links = await self._pending(events)
        outcomes = await asyncio.gather(*(self._sync_trial(trial_events, links.get(trial_id))
                                          for trial_id, trial_events in by_trial.items()), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            await self._settle(failures, single=len(events) == 1)

    async def _pending(self, events: Sequence[Event]) -> tuple[dict[str, list[Event]], dict[str, Link]]:
        """The events not applied yet, by trial in seq order, and the trials' recorded links."""
        unique = {e.event_id: e for e in events}
        async with self.store.pool.acquire() as conn:
            applied = {r["event_id"] for r in await conn.fetch(SELECT_APPLIED, self.name, list(unique))}
            fresh = [e for e in unique.values() if e.event_id not in applied]
            rows = await conn.fetch(SELECT_LINKS, list({e.trial_id for e in fresh}))
        by_trial: dict[str, list[Event]] = {}
        for event in sorted(fresh, key=lambda e: e.seq):
            by_trial.setdefault(event.trial_id, []).append(event)
        return by_trial, {r["trial_id"]: Link(r["run_id"], r["origin"], r["status"]) for r in rows}

    async def _sync_trial(self, events: list[Event], link: Link | None) -> None:
        done: list[Event] = []
        async with self._trials:
            try:
                for event in events:
                    link = await self._apply(event, link)
                    done.append(event)
            except (MlflowUnavailable, MlflowRejected) as exc:
                raise _Failed(event, exc) from None
            finally:
                if done:
                    await self._record(done, link)
        for event in done:
            self._attempts.pop(event.event_id, None)

    async def _apply(self, event: Event, link: Link | None) -> Link:
        try:
            return await self._apply_to(event, link or await self._link(event))
        except MlflowNotFound:  # the linked run is gone for good (garbage-collected, other server): link anew
            stale = link.run_id if link else event.payload.mlflow_run_id if isinstance(event, RunStarted) else None
            return await self._apply_to(event, await self._link(event, stale=stale))

    async def _apply_to(self, event: Event, link: Link) -> Link:
        client = self._client
        if isinstance(event, RunStarted):
            status = None if link.status in TERMINAL else "running"
            await client.log_batch(link.run_id, tags=trial_tags(event.trial_id, event.model_run_id,
                                                                event.payload.spectral_norm, status))
            self.log.debug("run tagged", run_id=link.run_id, event_id=str(event.event_id), trial_id=event.trial_id,
                           event_type=event.event_type)
            return link
        assert isinstance(event, RunStopped)
        p, at = event.payload, _millis(event)
        tags = trial_tags(event.trial_id, event.model_run_id, p.spectral_norm, p.status)
        metrics = [(key, value, at, event.seq) for key, value in p.measurements.items()]
        await asyncio.gather(client.log_batch(link.run_id, tags=tags, metrics=metrics),
                             client.update_run(link.run_id, RUN_STATUS[p.status], at))
        self.log.debug("run finished", run_id=link.run_id, status=p.status, event_id=str(event.event_id),
                       trial_id=event.trial_id, event_type=event.event_type)
        return replace(link, status=p.status)

    async def _link(self, event: Event, stale: str | None = None) -> Link:
        """The trial's run, under the trial's advisory lock: the recorded link, else the start event's run id,
        else the run found by tag, else a new run; the link is committed before the lock is released."""
        carried = event.payload.mlflow_run_id if isinstance(event, RunStarted) else None
        async with self._linking, self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(LINK_LOCK, advisory_key(event.trial_id))
            row = await conn.fetchrow("SELECT run_id, origin, status FROM mlflow_runs WHERE trial_id = $1",
                                      event.trial_id)
            if row is not None and row["run_id"] != stale:
                return Link(row["run_id"], row["origin"], row["status"])
            if carried and carried != stale:
                link = Link(carried, "event", "running")
            else:
                link = await self._find_or_create(event)
            if row is not None:
                link = replace(link, status=row["status"])
            await conn.execute(UPSERT_LINK, event.trial_id, link.run_id, self._experiment_id, link.origin,
                               link.status)
        self.log.info("trial linked to an MLflow run", run_id=link.run_id, origin=link.origin,
                      event_id=str(event.event_id), trial_id=event.trial_id, event_type=event.event_type)
        return link

    async def _find_or_create(self, event: Event) -> Link:
        runs = await self._client.search_runs(self._experiment_id, filter_string("trial_id", event.trial_id))
        if runs:
            return Link(min(runs, key=lambda r: (r.start_time, r.run_id)).run_id, "found", "running")
        status = event.payload.status if isinstance(event, RunStopped) else "running"
        tags = trial_tags(event.trial_id, event.model_run_id, event.payload.spectral_norm, status)
        run_id = await self._client.create_run(self._experiment_id, event.trial_id, _millis(event), tags)
        return Link(run_id, "created", "running")

    async def _record(self, events: list[Event], link: Link) -> None:
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_APPLIED, self.name, [e.event_id for e in events])
            await conn.execute(RECORD_STATUS, events[0].trial_id, link.run_id, self._experiment_id, link.origin,
                               link.status)

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
        first = failures[0]
        if not await self._client.healthy():
            raise RetryLater(f"MLflow at {self.settings.mlflow_tracking_uri} is unreachable: {first.error}")
        for failure in failures:
            self._attempts[failure.event.event_id] = self._attempts.get(failure.event.event_id, 0) + 1
        worst = max(failures, key=lambda f: self._attempts[f.event.event_id])
        attempts = self._attempts[worst.event.event_id]
        if attempts >= self.settings.mlflow_max_attempts:
            if single:
                self._attempts.pop(worst.event.event_id, None)
            raise DeadLetter("mlflow_unavailable", f"{worst.event.event_type} of trial {worst.event.trial_id} "
                             f"failed {attempts} attempts while the server answered /health: {worst.error}")
        raise RetryLater(f"MLflow call failed (attempt {attempts} of {self.settings.mlflow_max_attempts}): "
                         f"{first.error}")
