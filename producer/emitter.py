"""Build one trial's events with the envelope filled in and `seq` assigned (start = 0, then +1)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from schemas import (
    SCHEMA_VERSIONS,
    MetricPayload,
    ProducerInfo,
    RunError,
    RunMetric,
    RunStarted,
    RunStopped,
    StartPayload,
    StopPayload,
    new_event_id,
)
from schemas.events import split_measurements
from schemas.topology import RUN_METRIC, RUN_START, RUN_STOP


def producer_info(worker_id: str | None = None) -> ProducerInfo:
    try:
        package_version = version("sntrack")
    except PackageNotFoundError:
        package_version = "unknown"
    host = socket.gethostname()
    return ProducerInfo(
        worker_id=worker_id or f"{host}-{os.getpid()}", host=host, pid=os.getpid(), version=package_version
    )


class TrialEvents:
    """The events of one trial, in order. Not thread-safe: one trial is trained by one thread."""

    def __init__(self, trial_id: str, model_run_id: str, producer: ProducerInfo, next_seq: int = 0):
        self.trial_id = trial_id
        self.model_run_id = model_run_id
        self.producer = producer
        self._next_seq = next_seq

    def _envelope(self, event_type: str) -> dict:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return {
            "event_id": new_event_id(),
            "schema_version": SCHEMA_VERSIONS[event_type],
            "occurred_at": datetime.now(UTC),
            "trial_id": self.trial_id,
            "model_run_id": self.model_run_id,
            "seq": seq,
            "producer": self.producer,
        }

    def start(self, payload: StartPayload) -> RunStarted:
        if self._next_seq != 0:
            raise RuntimeError(f"trial {self.trial_id} already started")
        return RunStarted(**self._envelope(RUN_START), payload=payload)

    def metric(
        self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None = None,
        step: int | None = None,
    ) -> RunMetric:
        """`measurements` by flat name: `<split>_<name>` (train_loss, val_accuracy) go under their split."""
        splits, rest = split_measurements(measurements)
        payload = MetricPayload(epoch=epoch, step=step, splits=splits, measurements=rest,
                                spectral_norms=spectral_norms)
        return RunMetric(**self._envelope(RUN_METRIC), payload=payload)

    def stop(
        self,
        status: str,
        spectral_norm: bool,
        measurements: dict[str, float] | None = None,
        error: RunError | None = None,
    ) -> RunStopped:
        payload = StopPayload(
            status=status, spectral_norm=spectral_norm, measurements=measurements or {}, error=error
        )
        return RunStopped(**self._envelope(RUN_STOP), payload=payload)
