"""The gateway's configuration, built by the command line from Settings (the library never reads the environment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    amqp_url: str
    database_url: str
    max_request_bytes: int = 8 * 1024 * 1024  # a whole request body; Content-Length is checked before reading
    max_event_bytes: int = 1_048_576  # one event, the same limit the consumers' gate applies
    rate_per_s: float = 50.0  # requests per second per token (token bucket), sustained
    burst: int = 100  # requests a token may make at once before the rate applies
    confirm_timeout_s: float = 5.0  # a broker confirm slower than this answers 503
    token_cache_s: float = 5.0  # a revoked token is refused at the latest this long after `token revoke`
    retry_after_s: int = 1  # Retry-After of a 503 (broker unreachable)
