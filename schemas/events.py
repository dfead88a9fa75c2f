"""Pydantic v2 models of the event envelope and the three ml.run.* events, at their current schema versions.

Each event type has its own version (SCHEMA_VERSIONS): ml.run.start 1, ml.run.metric 2, ml.run.stop 1. Older
versions are brought up to the current one by schemas.upcasting before validation; the models of superseded
versions live in schemas.history (for their JSON Schema and contract tests only).

Strict at the gate: no coercion ("true" is not a boolean), no unknown fields, no NaN/inf.
Nothing the store cannot hold: no NUL in any string (PostgreSQL text and jsonb refuse it), integers within the
PostgreSQL column they land in, times within years 1..9999 once in UTC. Every projection therefore sees the same
accepted set (tests/test_gate_totality.py, tests/test_gate_store_limits.py).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from schemas.topology import RUN_METRIC, RUN_START, RUN_STOP

# The version producers emit and consumers validate, per event type (a version is a property of one event's shape).
SCHEMA_VERSIONS: dict[str, int] = {RUN_START: 1, RUN_METRIC: 2, RUN_STOP: 1}
ALL_SEARCHES = "*"  # reserved model_run_id: aggregates over every search are stored under it

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # PostgreSQL integer
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # PostgreSQL bigint (seed)
# NUL is refused by a pattern, checked in pydantic-core: a Python validator per string halved gate throughput.
NO_NUL = r"^[^\x00]*$"


EventType = Literal["ml.run.start", "ml.run.metric", "ml.run.stop"]
Text = Annotated[str, Field(pattern=NO_NUL)]
Identifier = Annotated[Text, Field(min_length=1, max_length=200)]
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Scalar = Text | int | float | bool | None


def _version(number: int) -> object:
    # A strict int pinned to one value, not Literal[n]: pydantic's Literal accepts `true` for 1.
    return Annotated[int, Field(ge=number, le=number, json_schema_extra={"const": number})]


Version1, Version2 = _version(1), _version(2)
Measurements = dict[Annotated[Text, Field(min_length=1, max_length=100)], float]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class ProducerInfo(_Strict):
    worker_id: Identifier
    host: Text
    pid: Int32
    version: Text


class StartPayload(_Strict):
    spectral_norm: bool
    hyperparams: dict[Text, Scalar] = Field(default_factory=dict)
    dataset: Text
    model: Text
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
    mlflow_run_id: Text | None = None
    optuna_trial_number: Int32 | None = None
    paired_with: Text | None = None

    @field_validator("hyperparams")
    @classmethod
    def _epochs_fit_integer(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        # `epochs` lands in trials.epochs (integer). A float is bounded too: the journal keeps the envelope as
        # jsonb, which prints 3e9 as the integer 3000000000, so a replay would read an int the column cannot hold.
        # Other hyperparams live only in jsonb, which holds any number this parser reads (up to 4,300 digits);
        # bounding them would refuse, on replay, a float such as 1e300 that jsonb gives back as an integer.
        epochs = value.get("epochs")
        if isinstance(epochs, int | float) and not isinstance(epochs, bool) and not INT32_MIN <= epochs <= INT32_MAX:
            raise ValueError(f"hyperparams['epochs'] = {epochs} is outside PostgreSQL integer")
        return value


Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_measurements(flat: dict[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Flat names `<split>_<name>` (version 1's `train_loss`) → ({split: {name: value}}, the names of no split).
    The inverse of MetricPayload.flat_measurements: no name is lost or renamed."""
    splits: dict[str, dict[str, float]] = {}
    rest: dict[str, float] = {}
    for key, value in flat.items():
        split, _, name = key.partition("_")
        if split in SPLITS and name:
            splits.setdefault(split, {})[name] = value
        else:
            rest[key] = value
    return splits, rest


class MetricPayload(_Strict):
    """Version 2: the measurements of one epoch grouped by data split, and the optimiser step they were taken at.

    `splits` holds per-split values (`{"val": {"loss": 0.4, "accuracy": 0.9}}`), `measurements` those of no split
    (a learning rate, a gradient norm). `step` counts optimiser steps since the trial began; None when the producer
    does not know it (every upcast version 1 event)."""

    epoch: Count
    step: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    splits: dict[Split, Measurements] = Field(default_factory=dict)
    measurements: Measurements = Field(default_factory=dict)
    spectral_norms: Measurements | None = None

    def flat_measurements(self) -> dict[str, float]:
        """Every measurement under one flat name, `<split>_<name>` for a split's (the read model's and MLflow's
        names, and version 1's). A split's value wins over a same-named one in `measurements`."""
        flat = dict(self.measurements)
        for split, values in self.splits.items():
            flat.update({f"{split}_{name}": value for name, value in values.items()})
        return flat


class RunError(_Strict):
    type: Literal["nan_loss", "oom", "timeout", "exception", "interrupted", "worker_lost"]
    message: Annotated[Text, Field(max_length=4000)]


class StopPayload(_Strict):
    status: Literal["completed", "failed", "pruned"]
    spectral_norm: bool
    measurements: Measurements = Field(default_factory=dict)
    error: RunError | None = None

    @model_validator(mode="after")
    def _error_only_when_failed(self) -> StopPayload:
        if self.status == "failed" and self.error is None:
            raise ValueError("a failed stop must carry an error")
        if self.status != "failed" and self.error is not None:
            raise ValueError(f"a {self.status} stop must not carry an error")
        return self


class _Envelope(_Strict):
    event_id: uuid.UUID
    schema_version: int  # each event type pins it to its current version (checked in pydantic-core)
    occurred_at: AwareDatetime
    trial_id: Identifier
    model_run_id: Identifier
    seq: Count
    producer: ProducerInfo

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"{value.isoformat()} is out of range once converted to UTC (years 1..9999)") from None

    @field_validator("model_run_id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == ALL_SEARCHES:
            raise ValueError(f"model_run_id {ALL_SEARCHES!r} is reserved for aggregates over all searches")
        return value

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


# Older versions are upcast before validation (schemas.upcasting); newer ones are refused there.
class RunStarted(_Envelope):
    schema_version: Version1
    event_type: Literal["ml.run.start"] = RUN_START
    payload: StartPayload

    @model_validator(mode="after")
    def _start_is_seq_zero(self) -> RunStarted:
        if self.seq != 0:
            raise ValueError("ml.run.start must have seq 0")
        return self


class RunMetric(_Envelope):
    schema_version: Version2
    event_type: Literal["ml.run.metric"] = RUN_METRIC
    payload: MetricPayload


class RunStopped(_Envelope):
    schema_version: Version1
    event_type: Literal["ml.run.stop"] = RUN_STOP
    payload: StopPayload


Event = Annotated[RunStarted | RunMetric | RunStopped, Field(discriminator="event_type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_MODELS: dict[str, type[_Envelope]] = {RUN_START: RunStarted, RUN_METRIC: RunMetric, RUN_STOP: RunStopped}


def new_event_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit millisecond timestamp, then random bits; sorts by creation time."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)
