"""A request body → the events it carries, every one through the consumers' gate (schemas.gate.parse_event).

A body is one JSON event, a JSON array of events, or NDJSON (Content-Type application/x-ndjson: one event per
line, blank lines ignored). NDJSON lines reach the gate byte for byte; array elements are re-serialised first.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic_core import from_json, to_json

from schemas import Event, GateRejection, RejectReason, parse_event

NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: RejectReason
    detail: str

    def as_json(self) -> dict:
        return {"index": self.index, "reason": str(self.reason), "detail": self.detail}


def split_body(body: bytes, content_type: str) -> list[bytes]:
    """The event bodies of a request; GateRejection(INVALID_JSON) when the body as a whole is not JSON."""
    if content_type.split(";")[0].strip().lower() == NDJSON:
        return [line for line in body.split(b"\n") if line.strip()]
    if not body.lstrip().startswith(b"["):
        return [body]
    try:
        document = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise GateRejection(RejectReason.INVALID_JSON, str(exc)) from None
    return [to_json(item) for item in document]


def validate(items: list[bytes], max_event_bytes: int) -> tuple[list[Event], list[Rejected]]:
    """Every item through the gate: the events, and what was refused with the gate's reason and detail."""
    events, rejected = [], []
    for index, item in enumerate(items):
        try:
            events.append(parse_event(item, max_bytes=max_event_bytes))
        except GateRejection as exc:
            rejected.append(Rejected(index, exc.reason, exc.detail))
    return events, rejected


def status_for(rejected: list[Rejected]) -> int:
    """413 when an event is over the size limit, 400 when one is not JSON, else 422 (a contract violation)."""
    reasons = {r.reason for r in rejected}
    if RejectReason.TOO_LARGE in reasons:
        return 413
    return 400 if RejectReason.INVALID_JSON in reasons else 422
