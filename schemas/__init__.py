"""The sntrack event contract: event models, topology names, JSON Schema, upcasting.

Importable alone by any third party; imports nothing from `producer` or `consumers`.
"""

from schemas.events import (
    SCHEMA_VERSIONS,
    Event,
    EventType,
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
from schemas.gate import GateRejection, RejectReason, parse_event
from schemas.topology import DEAD_LETTER_EXCHANGE, EXCHANGE, ROUTING_KEYS, ROUTING_PATTERN_ALL
from schemas.upcasting import read_stored

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "EXCHANGE",
    "Event",
    "EventType",
    "GateRejection",
    "MetricPayload",
    "ProducerInfo",
    "ROUTING_KEYS",
    "ROUTING_PATTERN_ALL",
    "RejectReason",
    "RunError",
    "RunMetric",
    "RunStarted",
    "RunStopped",
    "SCHEMA_VERSIONS",
    "StartPayload",
    "StopPayload",
    "new_event_id",
    "parse_event",
    "read_stored",
]
