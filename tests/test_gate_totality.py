"""parse_event is total: every body either becomes an Event or a GateRejection with a reason, never an exception.

The contract also refuses what PostgreSQL cannot store (issue 8, item 9), in the models themselves, so a producer
validating with the same models refuses it too.
"""

import json

import pytest
from pydantic import ValidationError

from schemas import GateRejection, RejectReason, parse_event
from schemas.events import RunStarted
from schemas.upcasting import UPCASTERS, UpcastFailed, upcast
from tests.test_contract import LIMIT, METRIC, METRIC_V1, START, STOP, body, changed

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


def rejection(raw: bytes) -> GateRejection:
    with pytest.raises(GateRejection) as caught:
        parse_event(raw, max_bytes=LIMIT)
    assert caught.value.detail
    return caught.value


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("opener, closer", [(b"[", b"]"), (b'{"a":', b"}")])
def test_deep_nesting_is_invalid_json(depth, opener, closer):
    assert rejection(opener * depth + b"1" * (opener != b"[") + closer * depth).reason == RejectReason.INVALID_JSON


def test_deep_nesting_inside_a_valid_envelope_is_invalid_json():
    raw = body(changed(START, ["payload", "hyperparams", "deep"], "X")).replace(b'"X"', b"[" * 5000 + b"]" * 5000)
    assert rejection(raw).reason == RejectReason.INVALID_JSON


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_times_outside_the_utc_range_are_refused(when):
    refused = rejection(body(changed(START, ["occurred_at"], when)))
    assert refused.reason == RejectReason.INVALID_EVENT
    assert "occurred_at" in refused.detail and "range" in refused.detail


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"])
def test_the_extreme_utc_times_are_accepted(when):
    assert parse_event(body(changed(START, ["occurred_at"], when)), max_bytes=LIMIT).occurred_at.year in (1, 9999)


NUL = "a\u0000b"
NUL_PLACES = [
    ("trial_id", START, ["trial_id"], NUL),
    ("model_run_id", STOP, ["model_run_id"], NUL),
    ("producer worker", START, ["producer", "worker_id"], NUL),
    ("producer host", START, ["producer", "host"], NUL),
    ("producer version", METRIC, ["producer", "version"], NUL),
    ("dataset", START, ["payload", "dataset"], NUL),
    ("model", START, ["payload", "model"], NUL),
    ("mlflow run id", START, ["payload", "mlflow_run_id"], NUL),
    ("paired with", START, ["payload", "paired_with"], NUL),
    ("hyperparam value", START, ["payload", "hyperparams", "opt"], NUL),
    ("hyperparam key", START, ["payload", "hyperparams", NUL], 1),
    ("measurement key", METRIC, ["payload", "measurements", NUL], 1.0),
    ("spectral norm key", METRIC, ["payload", "spectral_norms", NUL], 1.0),
    ("stop measurement key", STOP, ["payload", "measurements", NUL], 1.0),
]


@pytest.mark.parametrize("name, doc, path, value", NUL_PLACES, ids=[p[0] for p in NUL_PLACES])
def test_nul_is_refused_in_every_string(name, doc, path, value):
    refused = rejection(body(changed(doc, path, value)))
    assert refused.reason == RejectReason.INVALID_EVENT
    assert "NUL" in refused.detail


def test_nul_in_an_error_message_is_refused():
    doc = changed(STOP, ["payload", "status"], "failed")
    doc["payload"]["error"] = {"type": "exception", "message": "boom\u0000"}
    assert "NUL" in rejection(body(doc)).detail


def test_an_escaped_backslash_before_u0000_is_not_a_nul():
    doc = changed(START, ["payload", "hyperparams", "path"], "C:\\u0000dir")
    assert parse_event(body(doc), max_bytes=LIMIT).payload.hyperparams["path"] == "C:\\u0000dir"


def test_lone_surrogates_are_invalid_json():
    raw = body(changed(START, ["trial_id"], "X")).replace(b'"X"', b'"\\ud800"')
    assert rejection(raw).reason == RejectReason.INVALID_JSON


INT_LIMITS = [
    ("seq", METRIC, ["seq"], INT32_MAX),
    ("epoch", METRIC, ["payload", "epoch"], INT32_MAX),
    ("optuna trial number", START, ["payload", "optuna_trial_number"], INT32_MAX),
    ("pid", START, ["producer", "pid"], INT32_MAX),
    ("seed", START, ["payload", "seed"], INT64_MAX),
    ("epochs hyperparam", START, ["payload", "hyperparams", "epochs"], INT32_MAX),
]


@pytest.mark.parametrize("name, doc, path, largest", INT_LIMITS, ids=[p[0] for p in INT_LIMITS])
def test_integers_are_bounded_by_their_postgresql_column(name, doc, path, largest):
    parse_event(body(changed(doc, path, largest)), max_bytes=LIMIT)
    for beyond in (largest + 1, 10**30):
        refused = rejection(body(changed(doc, path, beyond)))
        assert refused.reason == RejectReason.INVALID_EVENT, beyond
        assert path[-1] in refused.detail


@pytest.mark.parametrize("name, doc, path, smallest", [
    ("optuna trial number", START, ["payload", "optuna_trial_number"], -(2**31)),
    ("seed", START, ["payload", "seed"], -(2**63)),
    ("epochs hyperparam", START, ["payload", "hyperparams", "epochs"], -(2**31)),
])
def test_negative_integers_are_bounded_too(name, doc, path, smallest):
    parse_event(body(changed(doc, path, smallest)), max_bytes=LIMIT)
    assert rejection(body(changed(doc, path, smallest - 1))).reason == RejectReason.INVALID_EVENT


@pytest.mark.parametrize("epochs", [3e9, -3e9, 1e300])
def test_an_epochs_float_beyond_integer_is_refused(epochs):
    # The journal's jsonb gives such a float back as an integer, which trials.epochs could not hold on replay.
    assert "epochs" in rejection(body(changed(START, ["payload", "hyperparams", "epochs"], epochs))).detail


def test_other_hyperparam_numbers_are_not_bounded():
    # They live only in jsonb, which holds them; a replay reads 1e300 back as a 301-digit integer.
    for value in (10**300, -(10**300), 1e300, 5e-324):
        doc = changed(START, ["payload", "hyperparams", "hidden"], value)
        assert parse_event(body(doc), max_bytes=LIMIT).payload.hyperparams["hidden"] == value


@pytest.mark.parametrize("literal", [b"1" + b"0" * 5000, b"1e400", b"-1e400", b"1" + b"0" * 400])
@pytest.mark.parametrize("place", [["seq"], ["payload", "epoch"], ["payload", "measurements", "train_loss"],
                                   ["schema_version"]])
def test_huge_number_literals_are_refused(literal, place):
    raw = body(changed(METRIC, place, "X")).replace(b'"X"', literal)
    assert rejection(raw).reason in (RejectReason.INVALID_JSON, RejectReason.INVALID_EVENT,
                                     RejectReason.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("raw", [b"\xff", b'{"event_type": "ml.run.start", "trial_id": "\xc3\x28"}',
                                 b"\xed\xa0\x80", b"", b"\x00", b"{" * 3 + b"\xff"])
def test_invalid_utf8_and_garbage_is_invalid_json(raw):
    assert rejection(raw).reason == RejectReason.INVALID_JSON


@pytest.mark.parametrize("event_type", [[], {}, [[1]], 1e300, None])
def test_unhashable_or_odd_event_types_are_unknown(event_type):
    assert rejection(body(changed(START, ["event_type"], event_type))).reason == RejectReason.UNKNOWN_TYPE


def test_details_are_printable_whatever_the_input():
    refused = rejection(body(changed(START, ["event_type"], "ml.run.\u0000\ud800" * 100)))
    assert refused.detail.isprintable() and len(refused.detail) <= 1000
    refused.detail.encode("utf-8")


def test_producers_validating_with_the_models_refuse_the_same_values():
    doc = changed(START, ["seq"], 0)
    with pytest.raises(ValidationError, match="pattern"):
        RunStarted.model_validate_json(body(changed(doc, ["trial_id"], NUL)))
    with pytest.raises(ValidationError, match="pattern"):
        RunStarted.model_validate({**doc, "trial_id": NUL})
    with pytest.raises(ValidationError):
        RunStarted.model_validate_json(body(changed(doc, ["payload", "seed"], 2**63)))


def test_a_failing_upcaster_is_a_rejection_not_a_crash(monkeypatch):
    monkeypatch.setitem(UPCASTERS, ("ml.run.metric", 1), lambda doc: {**doc, "schema_version": 2, "x": doc["missing"]})
    with pytest.raises(UpcastFailed, match="KeyError"):
        upcast(METRIC_V1)
    assert rejection(body(METRIC_V1)).reason == RejectReason.INVALID_EVENT


@pytest.mark.parametrize("payload", [None, [], {"epoch": 0}, {"measurements": [1]}, {"measurements": {"a": 1}}])
def test_the_real_upcaster_refuses_a_malformed_v1_payload(payload):
    # {"measurements": {"a": 1}} lacks the epoch: the upcast succeeds and validation names the field.
    assert rejection(body(changed(METRIC_V1, ["payload"], payload))).reason == RejectReason.INVALID_EVENT


def test_an_upcaster_that_does_not_advance_the_version_is_refused(monkeypatch):
    monkeypatch.setitem(UPCASTERS, ("ml.run.metric", 1), lambda doc: doc)
    with pytest.raises(UpcastFailed, match="version"):
        upcast(METRIC_V1)


def test_an_unexpected_exception_inside_validation_becomes_a_rejection(monkeypatch):
    # The last line of defence: whatever a future validator raises, the gate answers with a rejection.
    def broken(document):
        raise ZeroDivisionError("a bug in an upcaster")
    monkeypatch.setattr("schemas.gate.upcast", broken)
    refused = rejection(body(changed(METRIC, ["schema_version"], 1)))
    assert refused.reason == RejectReason.INVALID_EVENT and "ZeroDivisionError" in refused.detail


def test_valid_events_still_round_trip():
    for doc in (START, METRIC, METRIC_V1, STOP):
        event = parse_event(body(doc), max_bytes=LIMIT)
        assert json.loads(event.to_json())["event_id"] == doc["event_id"]
