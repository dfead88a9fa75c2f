"""Telling a broker that refused us (a setting to fix) from a broker that is away (wait, or spool)."""

from __future__ import annotations

from urllib.parse import unquote

import aio_pika
import aiormq

from common.tls import certificate_problem
from common.urls import path_name, redact


def amqp_refusal(exc: BaseException, url: str) -> str | None:
    """One line saying why RabbitMQ at `url` refused the connection, or None when `exc` is not a refusal.

    A refusal is wrong credentials, a vhost the user may not open, or a vhost that does not exist. RabbitMQ answers
    the last two by closing the connection while it is opened, which aiormq reports as an invalid frame
    (Connection.Close where Connection.OpenOk was expected). Proved by tests/test_config_errors.py. A TLS
    certificate that does not verify is a refusal too (tests/test_tls.py); other TLS errors may be a broker going
    away mid-handshake."""
    if problem := certificate_problem(exc):
        return (f"refusing RabbitMQ at {redact(url)}: {problem}; check cafile= (the CA's certificate) and the host "
                "name in SNTRACK_AMQP_URL")
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError):
        return f"RabbitMQ refused the credentials in {redact(url)}; check user and password in SNTRACK_AMQP_URL"
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
            isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)):
        vhost = unquote(path_name(url)) or "/"
        return (f"RabbitMQ at {redact(url)} refused vhost {vhost!r}: it does not exist or the user may not open it "
                "(sntrack topology apply creates it; check SNTRACK_AMQP_URL)")
    return None
