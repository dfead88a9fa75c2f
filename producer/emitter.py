"""Build one trial's events with the envelope filled in and `seq` assigned (start = 0, then +1)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from schemas import (
    CURRENT_SCHEMA_VERSION,
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

    def _envelope(self) -> dict:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return {
            "event_id": new_event_id(),
            "schema_version": CURRENT_SCHEMA_VERSION,
            "occurred_at": datetime.now(UTC),
            "trial_id": self.trial_id,
            "model_run_id": self.model_run_id,
            "seq": seq,
            "producer": self.producer,
        }

    def start(self, payload: StartPayload) -> RunStarted:
        if self._next_seq != 0:
            raise RuntimeError(f"trial {self.trial_id} already started")
        return RunStarted(**self._envelope(), payload=payload)

    def metric(
        self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None = None
    ) -> RunMetric:
        payload = MetricPayload(epoch=epoch, measurements=measurements, spectral_norms=spectral_norms)
        return RunMetric(**self._envelope(), payload=payload)

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
        return RunStopped(**self._envelope(), payload=payload)
