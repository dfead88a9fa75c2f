"""The consumer's gate: raw message bytes → a validated event, or a rejection with a reason."""

from __future__ import annotations

import json
from enum import StrEnum

from pydantic import ValidationError

from schemas.events import CURRENT_SCHEMA_VERSION, EVENT_ADAPTER, Event
from schemas.topology import ROUTING_KEYS
from schemas.upcasting import UnsupportedVersion, upcast


class RejectReason(StrEnum):
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_schema_version"
    INVALID_EVENT = "invalid_event"


class GateRejection(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _refuse_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token} is not allowed")


def parse_event(body: bytes, *, max_bytes: int) -> Event:
    """Validate one message body; raise GateRejection saying why it is refused."""
    if len(body) > max_bytes:
        raise GateRejection(RejectReason.TOO_LARGE, f"{len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        return EVENT_ADAPTER.validate_json(body)  # the common case: one pass in pydantic-core
    except ValidationError:
        pass  # find out precisely why, below
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GateRejection(RejectReason.INVALID_JSON, str(exc)[:500]) from None
    if not isinstance(document, dict):
        raise GateRejection(RejectReason.INVALID_JSON, f"expected a JSON object, got {type(document).__name__}")
    event_type = document.get("event_type")
    if event_type not in ROUTING_KEYS:
        raise GateRejection(RejectReason.UNKNOWN_TYPE, f"event_type {event_type!r} is not one of {ROUTING_KEYS}")
    try:
        if document.get("schema_version") != CURRENT_SCHEMA_VERSION:
            body = json.dumps(upcast(document)).encode()
        return EVENT_ADAPTER.validate_json(body)
    except UnsupportedVersion as exc:
        raise GateRejection(RejectReason.UNSUPPORTED_VERSION, str(exc)) from None
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise GateRejection(RejectReason.INVALID_EVENT, detail[:1000]) from None
