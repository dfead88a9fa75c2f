"""Bring envelopes of older schema versions up to the current one before validation.

Versions are per event type (schemas.events.SCHEMA_VERSIONS). UPCASTERS maps (event_type, N) to a function turning
an N envelope (a dict) into an N+1 envelope. An upcaster that fails, or does not produce version N+1, is reported as
UpcastFailed (the gate rejects the message as invalid_event), never as a crash or an endless loop
(tests/test_gate_totality.py).

The gate upcasts what arrives from the broker; `read_stored` upcasts what the journal holds, so a journal written
before a version change replays unchanged (tests/test_upcasting.py).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from schemas.events import EVENT_ADAPTER, SCHEMA_VERSIONS, Event, split_measurements
from schemas.topology import RUN_METRIC

Upcaster = Callable[[dict], dict]


class UnsupportedVersion(ValueError):
    pass


class UpcastFailed(ValueError):
    pass


def metric_1_to_2(envelope: dict) -> dict:
    """ml.run.metric 1 → 2: flat `<split>_<name>` measurements move under `splits`; the step was not recorded."""
    payload = envelope["payload"]
    unknown = set(payload) - {"epoch", "measurements", "spectral_norms"}
    if unknown:  # version 2's fields (step, splits) included: version 1 never had them
        raise ValueError(f"a version 1 metric payload has no field(s) {', '.join(sorted(unknown))}")
    splits, rest = split_measurements(payload["measurements"])
    upgraded = {"epoch": payload["epoch"], "step": None, "splits": splits, "measurements": rest}
    if "spectral_norms" in payload:
        upgraded["spectral_norms"] = payload["spectral_norms"]
    return {**envelope, "schema_version": 2, "payload": upgraded}


UPCASTERS: dict[tuple[str, int], Upcaster] = {(RUN_METRIC, 1): metric_1_to_2}


def upcast(envelope: dict) -> dict:
    event_type, version = envelope.get("event_type"), envelope.get("schema_version")
    current = SCHEMA_VERSIONS.get(event_type) if isinstance(event_type, str) else None
    if current is None or not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return envelope  # left for validation to refuse with a precise message
    if version > current:
        raise UnsupportedVersion(
            f"{event_type} schema_version {version} is newer than this consumer understands ({current})")
    while version < current:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise UnsupportedVersion(f"no upcaster from {event_type} schema_version {version}")
        try:
            envelope = step(envelope)
        except Exception as exc:  # noqa: BLE001 - an old envelope the step cannot read is a bad message
            raise UpcastFailed(f"upcasting from schema_version {version} failed: {type(exc).__name__}: {exc}") from exc
        produced = envelope.get("schema_version") if isinstance(envelope, dict) else None
        if produced != version + 1:
            raise UpcastFailed(f"the upcaster from schema_version {version} produced version {produced!r}")
        version = produced
    return envelope


def read_stored(text: str | bytes) -> Event:
    """An envelope the journal holds, at whatever version it was accepted, as the current event. Current versions
    take one pass in pydantic-core; older ones are upcast. Raises ValidationError or ValueError on what the gate
    would never have accepted."""
    try:
        return EVENT_ADAPTER.validate_json(text)
    except ValidationError:
        document = from_json(text)
        if not isinstance(document, dict) or document.get("schema_version") == SCHEMA_VERSIONS.get(
                document.get("event_type")):
            raise
        return EVENT_ADAPTER.validate_json(to_json(upcast(document)))
