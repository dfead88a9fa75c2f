"""The gateway's ASGI application (Starlette): POST /v1/events, GET /healthz, /metrics, /openapi.json, /schemas/*.

POST /v1/events, in order: bearer token (401 missing or malformed, 403 unknown or revoked), the token's rate
(429 + Retry-After), the request size (413, from Content-Length before reading, and while reading), every event
through the gate (400/413/422 with each refused event's index, reason and detail; nothing is published), then
the broker's confirms of every event (202 with the event ids; 503 + Retry-After when it cannot confirm).
A batch is all or nothing on the gate's side; after a 503 some events may have reached the broker, which is why
the client retries the whole request with the same event ids (tests/test_gateway.py).
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.broker import BrokerUnavailable, ConfirmingPublisher
from gateway.config import GatewayConfig
from gateway.ingest import split_body, status_for, validate
from gateway.metrics import GatewayMetrics
from gateway.openapi import document, schema_file
from gateway.ratelimit import RateLimiter
from gateway.tokens import TokenStoreUnavailable, TokenVerifier, Verdict
from schemas import GateRejection

log = structlog.get_logger("sntrack.gateway")


class TooLarge(Exception):
    pass


def _version() -> str:
    try:
        return version("sntrack")
    except PackageNotFoundError:
        return "unknown"


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing (TooLarge) one that declares or turns out to be over `limit` bytes before buffering it."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge(f"Content-Length {declared[:30]} exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def create_app(config: GatewayConfig, verifier: TokenVerifier, publisher: ConfirmingPublisher) -> Starlette:
    metrics = GatewayMetrics()
    limiter = RateLimiter(config.rate_per_s, config.burst)
    openapi = document(_version())

    async def authorize(request: Request) -> tuple[str, str] | Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            verdict = await verifier.verify(token.strip())
        except TokenStoreUnavailable as exc:
            log.warning("token lookup failed; answered 503", error=str(exc))
            return _error(503, "cannot check the token now; retry", {"Retry-After": str(config.retry_after_s)})
        if verdict is Verdict.MALFORMED:
            return _error(401, "malformed bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if isinstance(verdict, Verdict):
            return _error(403, f"token {verdict}")
        if wait := limiter.take(verdict[0]):
            return _error(429, "rate limit of this token exceeded", {"Retry-After": str(wait)})
        return verdict

    async def ingest(request: Request) -> Response:
        authorized = await authorize(request)
        if isinstance(authorized, Response):
            return authorized
        _, producer_id = authorized
        try:
            body = await read_capped(request, config.max_request_bytes)
            started = time.perf_counter()
            items = split_body(body, request.headers.get("content-type", "application/json"))
        except TooLarge as exc:
            return _error(413, str(exc))
        except GateRejection as exc:
            metrics.rejected[str(exc.reason)] += 1
            return _error(400, "the body is not JSON", rejected=[{"index": 0, "reason": str(exc.reason),
                                                                  "detail": exc.detail}])
        if not items:
            return _error(400, "no events in the body")
        events, rejected = validate(items, config.max_event_bytes)
        if rejected:
            metrics.rejected.update(str(r.reason) for r in rejected)
            return _error(status_for(rejected), f"{len(rejected)} of {len(items)} events refused; none published",
                          rejected=[r.as_json() for r in rejected])
        stamped = [e.model_copy(update={"producer": e.producer.model_copy(update={"worker_id": producer_id})})
                   for e in events]
        validated = time.perf_counter()
        try:
            await publisher.publish(stamped)
        except BrokerUnavailable as exc:
            log.warning("events not confirmed by the broker; answered 503", events=len(stamped), error=str(exc),
                        producer_id=producer_id)
            return _error(503, f"not confirmed by the broker, retry with the same events: {exc}",
                          {"Retry-After": str(config.retry_after_s)})
        confirmed = time.perf_counter()
        metrics.observe("gate", validated - started)
        metrics.observe("confirm", confirmed - validated)
        metrics.accepted += len(stamped)
        # Where this request's time went inside the gateway (W3C Server-Timing, ms): the client can subtract it from
        # what it measured to see the HTTP share; bench/gateway_bench.py does.
        timing = f"gate;dur={1000 * (validated - started):.3f}, confirm;dur={1000 * (confirmed - validated):.3f}"
        return JSONResponse({"accepted": len(stamped), "event_ids": [str(e.event_id) for e in stamped]},
                            status_code=202, headers={"Server-Timing": timing})

    async def healthz(request: Request) -> Response:
        if await publisher.check():
            return JSONResponse({"status": "ok", "broker": "connected"})
        return JSONResponse({"status": "degraded", "broker": publisher.last_error}, status_code=503,
                            headers={"Retry-After": str(config.retry_after_s)})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(publisher.connected), media_type="text/plain; version=0.0.4")

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def json_schema(request: Request) -> Response:
        body = schema_file(request.path_params["name"])
        if body is None:
            return _error(404, "no such schema")
        return Response(body, media_type="application/schema+json")

    def route(path: str, endpoint, method: str) -> Route:
        async def counted(request: Request) -> Response:
            response = await endpoint(request)
            metrics.requests[(path, response.status_code)] += 1
            return response
        return Route(path, counted, methods=[method])

    return Starlette(routes=[
        route("/v1/events", ingest, "POST"),
        route("/healthz", healthz, "GET"),
        route("/metrics", prometheus, "GET"),
        route("/openapi.json", openapi_json, "GET"),
        route("/schemas/{name}", json_schema, "GET"),
    ])
