"""Generate docs/asyncapi.json, the AsyncAPI 3 description of the event contract, from the models
(python -m schemas.asyncapi; --check exits 1 when the checked-in file is stale; tests/test_asyncapi.py).

Channels are the routing keys on the topic exchange ml.events; each carries the messages of its event type: the
current version, and the superseded versions the gate still accepts and upcasts (schemas.history). Message payloads
are the models' JSON Schema, hoisted into components/schemas so that every $ref resolves inside the document.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic.json_schema import models_json_schema

from schemas.events import EVENT_MODELS, SCHEMA_VERSIONS
from schemas.history import HISTORY_MODELS
from schemas.topology import DEAD_LETTER_EXCHANGE, DETAIL_HEADER, EXCHANGE, REASON_HEADER, ROUTING_KEYS

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"
AMQP = "0.3.0"  # AsyncAPI AMQP bindings version

DESCRIPTION = f"""Training events of sntrack, published as persistent JSON messages to the topic exchange {EXCHANGE},
routing key = event_type. Versions are per event type (envelope field schema_version); this document's version
lists them in channel order ({', '.join(ROUTING_KEYS)}). A consumer validates every message at its gate: a
superseded version is upcast to the current one, a newer one or an invalid message is dead-lettered through
{DEAD_LETTER_EXCHANGE} to `<queue>.dlq` with headers {REASON_HEADER} and {DETAIL_HEADER}. Delivery is at least
once: event_id is the dedupe key."""


def _message(model: type, event_type: str, version: int, current: bool) -> dict:
    note = "current version: what producers emit" if current else "superseded: still accepted, upcast on arrival"
    return {
        "name": model.__name__,
        "title": f"{event_type} schema_version {version}",
        "summary": f"{event_type}, schema_version {version} ({note})",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        "bindings": {"amqp": {"messageType": event_type, "bindingVersion": AMQP}},
    }


def build() -> dict:
    versions = [(event_type, SCHEMA_VERSIONS[event_type], model, True) for event_type, model in EVENT_MODELS.items()]
    versions += [(event_type, version, model, False) for (event_type, version), model in HISTORY_MODELS.items()]
    _, definitions = models_json_schema([(model, "validation") for *_, model, _ in versions],
                                        ref_template="#/components/schemas/{model}")
    messages = {model.__name__: _message(model, t, v, current) for t, v, model, current in versions}
    channels, operations = {}, {}
    for event_type in ROUTING_KEYS:
        channel = event_type.replace(".", "_")  # ids are [A-Za-z0-9_-]; the address is the routing key
        names = [model.__name__ for t, _, model, _ in versions if t == event_type]
        channels[channel] = {
            "address": event_type,
            "title": f"routing key {event_type}",
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
            "bindings": {"amqp": {"is": "routingKey", "bindingVersion": AMQP, "exchange": {
                "name": EXCHANGE, "type": "topic", "durable": True, "autoDelete": False}}},
        }
        refs = [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names]
        for action, who in (("send", "producers publish"), ("receive", "consumers receive")):
            operations[f"{action}_{channel}"] = {
                "action": action, "channel": {"$ref": f"#/channels/{channel}"}, "messages": refs,
                "summary": f"{who} {event_type} events",
                "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP}} if action == "send" else {
                    "amqp": {"ack": True, "bindingVersion": AMQP}},
            }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "sntrack events", "version": ".".join(str(SCHEMA_VERSIONS[t]) for t in ROUTING_KEYS),
                 "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0-9-1",
                              "pathname": "/sntrack", "description": "a local RabbitMQ, vhost sntrack"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": definitions["$defs"]},
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def stale() -> bool:
    return not DOCUMENT.exists() or DOCUMENT.read_text() != render()


def main() -> int:
    if "--check" in sys.argv[1:]:
        if stale():
            print(f"{DOCUMENT} is stale; run `make schemas`", file=sys.stderr)
            return 1
        return 0
    DOCUMENT.write_text(render())
    print(f"wrote {DOCUMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
