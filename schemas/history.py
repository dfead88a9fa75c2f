"""Models of superseded schema versions, frozen as they were accepted: what old producers send and old journals hold.

They validate nothing at the gate (an old envelope is upcast, then validated by the current model,
schemas.upcasting); they give the JSON Schema of each old version (schemas/json/) and the contract tests' oracle
for what an old version allowed. Never change one: add the next version to schemas.events and an upcaster.
"""

from __future__ import annotations

from typing import Literal

from schemas.events import Count, Measurements, Version1, _Envelope, _Strict
from schemas.topology import RUN_METRIC


class MetricPayloadV1(_Strict):
    epoch: Count
    measurements: Measurements  # flat names: train_loss, val_accuracy, ...
    spectral_norms: Measurements | None = None


class RunMetricV1(_Envelope):
    schema_version: Version1
    event_type: Literal["ml.run.metric"] = RUN_METRIC
    payload: MetricPayloadV1


# (event_type, version) → model, for every version that is no longer current.
HISTORY_MODELS = {(RUN_METRIC, 1): RunMetricV1}
