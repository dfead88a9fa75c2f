"""The sntrack event contract: event models, topology names, JSON Schema, upcasting.

Importable alone by any third party; imports nothing from `producer` or `consumers`.
"""

from schemas.events import (
    CURRENT_SCHEMA_VERSION,
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

__all__ = [
    "CURRENT_SCHEMA_VERSION",
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
    "StartPayload",
    "StopPayload",
    "new_event_id",
    "parse_event",
]
