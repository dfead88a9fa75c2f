"""The event contract at the gate: valid and invalid examples for every field rule."""

import copy
import json
import random
from pathlib import Path

import pytest

import schemas
from producer.emitter import producer_info
from producer.sample import synthetic_trial
from schemas import ROUTING_KEYS, GateRejection, RejectReason, parse_event
from schemas.events import EVENT_MODELS, SCHEMA_VERSIONS, RunMetric, RunStarted, RunStopped, new_event_id
from schemas.jsonschema import stale
from schemas.upcasting import UPCASTERS, UnsupportedVersion, upcast

LIMIT = 1_048_576

PRODUCER = {"worker_id": "w1", "host": "h", "pid": 42, "version": "0.1.0"}
START = {
    "event_id": "01939a3c-1d2e-7f00-8000-000000000001", "event_type": "ml.run.start", "schema_version": 1,
    "occurred_at": "2026-11-25T10:00:00Z", "trial_id": "t1", "model_run_id": "study-1", "seq": 0,
    "producer": PRODUCER,
    "payload": {"spectral_norm": True, "hyperparams": {"lr": 0.01, "hidden": 128, "opt": "adam", "bn": False},
                "dataset": "digits", "model": "mlp", "seed": 7, "mlflow_run_id": None,
                "optuna_trial_number": 3, "paired_with": None},
}
# ml.run.metric is at schema_version 2 (splits and step); version 1 (flat measurements) is still accepted, upcast.
METRIC = {**START, "event_id": "01939a3c-1d2e-7f00-8000-000000000002", "event_type": "ml.run.metric", "seq": 1,
          "schema_version": 2,
          "payload": {"epoch": 0, "step": 12, "splits": {"train": {"loss": 0.5}, "val": {"accuracy": 0.9}},
                      "measurements": {"lr": 0.01}, "spectral_norms": {"layers.0": 1.0}}}
METRIC_V1 = {**METRIC, "schema_version": 1,
             "payload": {"epoch": 0, "measurements": {"train_loss": 0.5, "val_accuracy": 0.9, "lr": 0.01},
                         "spectral_norms": {"layers.0": 1.0}}}
STOP = {**START, "event_id": "01939a3c-1d2e-7f00-8000-000000000003", "event_type": "ml.run.stop", "seq": 2,
        "payload": {"status": "completed", "spectral_norm": True,
                    "measurements": {"duration_ms": 1200.0, "final_val_accuracy": 0.95}}}


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def changed(doc, path, value):
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


DELETE = object()


@pytest.mark.parametrize("doc, model", [(START, RunStarted), (METRIC, RunMetric), (METRIC_V1, RunMetric),
                                        (STOP, RunStopped)])
def test_valid_examples_parse(doc, model):
    event = parse_event(body(doc), max_bytes=LIMIT)
    assert isinstance(event, model)
    assert str(event.event_id) == doc["event_id"]
    assert event.occurred_at.utcoffset().total_seconds() == 0


def test_round_trip_is_identity():
    event = parse_event(body(STOP), max_bytes=LIMIT)
    assert parse_event(event.to_json(), max_bytes=LIMIT) == event


def test_offset_times_are_normalised_to_utc():
    event = parse_event(body(changed(START, ["occurred_at"], "2026-11-25T12:00:00+02:00")), max_bytes=LIMIT)
    assert event.occurred_at.isoformat() == "2026-11-25T10:00:00+00:00"


def test_failed_stop_with_error_is_valid():
    doc = changed(STOP, ["payload", "status"], "failed")
    doc["payload"]["error"] = {"type": "nan_loss", "message": "loss is nan at epoch 3"}
    assert parse_event(body(doc), max_bytes=LIMIT).payload.error.type == "nan_loss"


INVALID = [
    ("string boolean", START, ["payload", "spectral_norm"], "true"),
    ("missing flag", START, ["payload", "spectral_norm"], DELETE),
    ("not a uuid", START, ["event_id"], "not-a-uuid"),
    ("naive time", START, ["occurred_at"], "2026-11-25T10:00:00"),
    ("not a time", START, ["occurred_at"], "yesterday"),
    ("empty trial id", START, ["trial_id"], ""),
    ("missing model run", START, ["model_run_id"], DELETE),
    ("reserved model run", STOP, ["model_run_id"], "*"),
    ("negative seq", METRIC, ["seq"], -1),
    ("start with seq 1", START, ["seq"], 1),
    ("string seq", METRIC, ["seq"], "1"),
    ("schema_version 0", START, ["schema_version"], 0),
    ("unknown envelope field", START, ["extra"], 1),
    ("unknown payload field", START, ["payload", "learning_rate"], 0.1),
    ("nested hyperparam", START, ["payload", "hyperparams", "opt"], {"name": "adam"}),
    ("missing producer", START, ["producer"], DELETE),
    ("producer pid as string", START, ["producer", "pid"], "42"),
    ("negative epoch", METRIC, ["payload", "epoch"], -1),
    ("measurement as string", METRIC, ["payload", "measurements", "lr"], "0.5"),
    ("split measurement as string", METRIC, ["payload", "splits", "val", "accuracy"], "0.9"),
    ("unknown split", METRIC, ["payload", "splits", "holdout"], {"loss": 0.1}),
    ("negative step", METRIC, ["payload", "step"], -1),
    ("string step", METRIC, ["payload", "step"], "12"),
    ("metric v2 without epoch", METRIC, ["payload", "epoch"], DELETE),
    ("v1 measurement as string", METRIC_V1, ["payload", "measurements", "train_loss"], "0.5"),
    ("v1 negative epoch", METRIC_V1, ["payload", "epoch"], -1),
    ("v1 without measurements", METRIC_V1, ["payload", "measurements"], DELETE),
    ("v1 with a v2 field", METRIC_V1, ["payload", "bogus"], 1),
    ("v1 schema_version as bool", METRIC_V1, ["schema_version"], True),
    ("v2 schema_version as bool", START, ["schema_version"], True),
    ("unknown status", STOP, ["payload", "status"], "crashed"),
    ("failed without error", STOP, ["payload", "status"], "failed"),
    ("completed with error", STOP, ["payload", "error"], {"type": "oom", "message": "x"}),
    ("unknown error type", STOP, ["payload", "error"], {"type": "segfault", "message": "x"}),
    ("stop without flag", STOP, ["payload", "spectral_norm"], DELETE),
    ("payload of another type", METRIC, ["payload"], START["payload"]),
]


@pytest.mark.parametrize("name, doc, path, value", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_examples_are_refused_with_the_field_named(name, doc, path, value):
    with pytest.raises(GateRejection) as caught:
        parse_event(body(changed(doc, path, value)), max_bytes=LIMIT)
    assert caught.value.reason == RejectReason.INVALID_EVENT
    assert caught.value.detail


@pytest.mark.parametrize("raw, reason", [
    (b"\x00\xff garbage", RejectReason.INVALID_JSON),
    (b"[1, 2, 3]", RejectReason.INVALID_JSON),
    (b'{"event_type": "ml.run.start", "x": NaN}', RejectReason.INVALID_JSON),
    (body(changed(METRIC, ["payload", "measurements", "train_loss"], float("nan"))), RejectReason.INVALID_JSON),
    (body(changed(START, ["event_type"], "ml.run.pause")), RejectReason.UNKNOWN_TYPE),
    (body(changed(START, ["event_type"], DELETE)), RejectReason.UNKNOWN_TYPE),
    (body(changed(START, ["schema_version"], 99)), RejectReason.UNSUPPORTED_VERSION),
    (body(changed(START, ["schema_version"], 2)), RejectReason.UNSUPPORTED_VERSION),
    (body(changed(METRIC, ["schema_version"], 3)), RejectReason.UNSUPPORTED_VERSION),
])
def test_gate_reasons(raw, reason):
    with pytest.raises(GateRejection) as caught:
        parse_event(raw, max_bytes=LIMIT)
    assert caught.value.reason == reason


@pytest.mark.parametrize("doc", [METRIC, METRIC_V1])
def test_overflowing_number_literal_is_refused(doc):
    raw = body(doc).replace(b'0.5', b'1e400')
    assert b"1e400" in raw
    with pytest.raises(GateRejection) as caught:
        parse_event(raw, max_bytes=LIMIT)
    assert caught.value.reason == RejectReason.INVALID_EVENT
    assert "finite" in caught.value.detail


def test_too_large_is_refused_before_parsing():
    raw = body(changed(START, ["payload", "hyperparams", "blob"], "x" * 2_000_000))
    with pytest.raises(GateRejection) as caught:
        parse_event(raw, max_bytes=LIMIT)
    assert caught.value.reason == RejectReason.TOO_LARGE


def test_upcasting_chain_runs_registered_steps(monkeypatch):
    # As if ml.run.metric had a version 3: the real 1 → 2 step, then a registered 2 → 3, in order.
    monkeypatch.setitem(SCHEMA_VERSIONS, "ml.run.metric", 3)
    monkeypatch.setitem(UPCASTERS, ("ml.run.metric", 2), lambda doc: {**doc, "schema_version": 3, "renamed": True})
    assert upcast(METRIC_V1)["payload"]["splits"] == {"train": {"loss": 0.5}, "val": {"accuracy": 0.9}}
    assert upcast(METRIC_V1)["renamed"] is True
    assert upcast({**METRIC, "schema_version": 3}) == {**METRIC, "schema_version": 3}
    del UPCASTERS[("ml.run.metric", 2)]
    with pytest.raises(UnsupportedVersion, match="no upcaster"):
        upcast(METRIC)


def test_versions_are_per_event_type():
    """Only ml.run.metric moved to version 2; start and stop are still at 1, and each model pins its own."""
    assert SCHEMA_VERSIONS == {"ml.run.start": 1, "ml.run.metric": 2, "ml.run.stop": 1}
    for event_type, model in EVENT_MODELS.items():
        assert model.model_json_schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSIONS[event_type]
    with pytest.raises(UnsupportedVersion, match="newer"):
        upcast({**STOP, "schema_version": 2})


def test_uuid7_ids_are_unique_and_time_ordered():
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids)
    millis = [i.int >> 80 for i in ids]
    assert millis == sorted(millis)


def test_json_schema_files_are_current():
    assert stale() == [], "run `make schemas`"


def test_json_schema_covers_every_event_type():
    """Every routed event type has a model, a checked-in schema pinning its event_type, a branch of the union's
    discriminator, and a real event of that type passes the gate as that model."""
    folder = Path(schemas.__file__).parent / "json"
    union = json.loads((folder / "event.schema.json").read_text())
    trial = synthetic_trial(random.Random(2), "contract", producer_info("w"), epochs=1)
    assert sorted(EVENT_MODELS) == sorted(ROUTING_KEYS) == sorted(union["discriminator"]["mapping"])
    for event_type in ROUTING_KEYS:
        schema = json.loads((folder / f"{event_type}.schema.json").read_text())
        assert schema["properties"]["event_type"]["const"] == event_type
        assert union["discriminator"]["mapping"][event_type] == f"#/$defs/{schema['title']}"
        [sample] = [e for e in trial if e.event_type == event_type]
        assert type(parse_event(sample.to_json(), max_bytes=LIMIT)) is EVENT_MODELS[event_type]
