"""Telling a TLS certificate that did not verify (a setting to fix) from other connection failures.

TLS itself is configured in the service URLs, where each client library reads it (README, "Production set-up and
security"): `amqps://...?cafile=CA.pem` for RabbitMQ (aiormq), `postgresql://...?sslmode=verify-full&sslrootcert=
CA.pem` for PostgreSQL (asyncpg and libpq alike). Proved by tests/test_tls.py."""

from __future__ import annotations

import ssl


def certificate_problem(exc: BaseException) -> str | None:
    """Why the server's certificate did not verify (an unknown CA, a host name it does not name, expired), when
    `exc` or an exception it was raised from says so; None for any other failure."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes, short in practice; never a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"its TLS certificate did not verify ({seen.verify_message})"
        seen = seen.__cause__ or seen.__context__
    return None
