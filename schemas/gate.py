"""The consumer's gate: raw message bytes → a validated event, or a rejection with a reason.

parse_event is total: whatever the bytes (deep nesting, huge numbers, out-of-range dates, NUL, invalid UTF-8, a bug
in an upcaster), it returns an Event or raises GateRejection, never anything else (tests/test_gate_totality.py,
tests/test_gate_fuzz.py). Valid input takes one pass through pydantic-core; only refused input is parsed again,
with pydantic-core's own iterative JSON parser (bounded nesting, no Python recursion), to say precisely why.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from schemas.events import EVENT_ADAPTER, NO_NUL, SCHEMA_VERSIONS, Event
from schemas.topology import ROUTING_KEYS
from schemas.upcasting import UnsupportedVersion, UpcastFailed, upcast

DETAIL_LIMIT = 1000


class RejectReason(StrEnum):
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_schema_version"
    INVALID_EVENT = "invalid_event"


def _printable(text: str) -> str:
    """At most DETAIL_LIMIT printable characters: the detail travels in an AMQP header and in logs."""
    text = text[:DETAIL_LIMIT]
    if text.isprintable():
        return text
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped[:DETAIL_LIMIT]


class GateRejection(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        detail = _printable(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_event(body: bytes, *, max_bytes: int) -> Event:
    """Validate one message body; raise GateRejection saying why it is refused, and nothing else."""
    if len(body) > max_bytes:
        raise GateRejection(RejectReason.TOO_LARGE, f"{len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        return EVENT_ADAPTER.validate_json(body)  # the common case: one pass in pydantic-core
    except ValidationError:
        pass  # find out precisely why, below
    except Exception as exc:  # noqa: BLE001 - a validator bug must not kill a consumer
        raise _unexpected(exc) from None
    try:
        return _explain(body)
    except GateRejection:
        raise
    except Exception as exc:  # noqa: BLE001 - the gate's promise: a rejection, never a crash
        raise _unexpected(exc) from None


def _unexpected(exc: Exception) -> GateRejection:
    return GateRejection(RejectReason.INVALID_EVENT, f"validation failed unexpectedly: {type(exc).__name__}: {exc}")


def _explain(body: bytes) -> Event:
    """The slow path for refused bodies: the precise reason, or the event once upcast from an older version."""
    try:
        document = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise GateRejection(RejectReason.INVALID_JSON, str(exc)) from None
    if not isinstance(document, dict):
        raise GateRejection(RejectReason.INVALID_JSON, f"expected a JSON object, got {type(document).__name__}")
    event_type = document.get("event_type")
    if not isinstance(event_type, str) or event_type not in ROUTING_KEYS:
        raise GateRejection(RejectReason.UNKNOWN_TYPE,
                            f"event_type {repr(event_type)[:100]} is not one of {ROUTING_KEYS}")
    try:
        if document.get("schema_version") != SCHEMA_VERSIONS[event_type]:
            body = to_json(upcast(document))
        return EVENT_ADAPTER.validate_json(body)
    except UnsupportedVersion as exc:
        raise GateRejection(RejectReason.UNSUPPORTED_VERSION, str(exc)) from None
    except UpcastFailed as exc:
        raise GateRejection(RejectReason.INVALID_EVENT, str(exc)) from None
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {_message(err)}"
                           for err in exc.errors(include_url=False))
        raise GateRejection(RejectReason.INVALID_EVENT, detail) from None


def _message(error) -> str:
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NO_NUL:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    return error["msg"]
