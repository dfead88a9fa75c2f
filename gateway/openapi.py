"""The gateway's OpenAPI 3.1 document. Event bodies reference the JSON Schema files of schemas/json/, which the
gateway serves at /schemas/<file> so the references resolve."""

from __future__ import annotations

from importlib.resources import files

SCHEMA_FILES = files("schemas") / "json"
EVENT_SCHEMA = "/schemas/event.schema.json"


def schema_file(name: str) -> bytes | None:
    """The bytes of schemas/json/<name>, or None when there is no such file."""
    if "/" in name or not name.endswith(".schema.json"):
        return None
    path = SCHEMA_FILES / name
    return path.read_bytes() if path.is_file() else None


def _error(description: str, retry_after: bool = False) -> dict:
    response: dict = {"description": description,
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


def document(version: str) -> dict:
    events = {"oneOf": [{"$ref": EVENT_SCHEMA}, {"type": "array", "items": {"$ref": EVENT_SCHEMA}}]}
    ndjson = {"type": "string", "description": "one event (see " + EVENT_SCHEMA + ") per line"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "sntrack gateway", "version": version,
                 "description": "HTTP ingest of sntrack training events onto ml.events (ml.run.metric at "
                                "schema_version 2, or 1 upcast; start and stop at 1)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token from `sntrack gateway token add`"}},
            "schemas": {
                "Accepted": {"type": "object", "required": ["accepted", "event_ids"], "properties": {
                    "accepted": {"type": "integer"},
                    "event_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}}}},
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"},
                    "rejected": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"}, "reason": {"type": "string", "enum": [
                            "too_large", "invalid_json", "unknown_type", "unsupported_schema_version",
                            "invalid_event"]},
                        "detail": {"type": "string"}}}}}},
            },
        },
        "paths": {
            "/v1/events": {"post": {
                "summary": "Publish events; 202 once the broker confirmed every one of them",
                "description": "All or nothing: when any event is refused, none is published. A retry with the "
                               "same event ids is harmless (the event id is the dedupe key downstream). The "
                               "token's producer id is stamped into producer.worker_id.",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": events},
                                                              "application/x-ndjson": {"schema": ndjson}}},
                "responses": {
                    "202": {"description": "confirmed by the broker",
                            "headers": {"Server-Timing": {
                                "schema": {"type": "string"},
                                "description": "ms spent in the gateway's gate and awaiting the broker's confirms, "
                                               "e.g. gate;dur=0.044, confirm;dur=0.930"}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "400": _error("a body or event that is not JSON"),
                    "401": _error("missing or malformed bearer token"),
                    "403": _error("unknown or revoked token"),
                    "413": _error("request or event over the size limit"),
                    "422": _error("an event violates the contract (reason and detail per event)"),
                    "429": _error("rate limit of the token exceeded", retry_after=True),
                    "503": _error("broker unreachable or no confirm in time; retry with the same events",
                                  retry_after=True),
                }}},
            "/healthz": {"get": {"summary": "200 when the broker is reachable, else 503",
                                 "responses": {"200": {"description": "ok"}, "503": {"description": "degraded"}}}},
            "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {"description": "ok"}}}},
        },
    }
