"""What `sntrack status` checks beyond counts: the daemons' own logins, idle queues, and a read model behind."""

from __future__ import annotations

import aio_pika

from common.amqp import amqp_refusal
from common.errors import ConfigurationError
from common.urls import redact
from sntrack.settings import Settings


async def check_amqp_login(settings: Settings) -> None:
    """Log in to RabbitMQ as the daemons do (SNTRACK_AMQP_URL, not the management API's administrator), so a wrong
    password or vhost is reported instead of looking healthy (tests/test_status.py)."""
    if failure := await _login(settings, timeout_s=10):
        away = f"cannot reach RabbitMQ at {redact(settings.amqp_url)} ({failure or type(failure).__name__})"
        raise ConfigurationError(amqp_refusal(failure, settings.amqp_url) or away)


async def amqp_refusal_now(settings: Settings, timeout_s: float = 5.0) -> str | None:
    """Why RabbitMQ refuses this login, or None when it accepts it or cannot be reached (for a worker, which spools
    while the broker is away, only a refusal is a configuration error)."""
    failure = await _login(settings, timeout_s)
    return None if failure is None else amqp_refusal(failure, settings.amqp_url)


async def _login(settings: Settings, timeout_s: float) -> Exception | None:
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=timeout_s)
    except Exception as exc:
        return exc
    await connection.close()
    return None


def warnings(queues: dict[str, dict], journal_trials: int, read_model_trials: int,
             superuser: str | None = None) -> list[str]:
    """Lines telling the user what the figures imply: a queue nobody reads, a read model behind the journal, the
    daemons' database login (`superuser`: its name when it is a superuser)."""
    out = [f"warning: no consumer on {name} ({info.get('messages', 0)} messages waiting); start `sntrack consume all`"
           for name, info in queues.items() if info and not info.get("consumers")]
    if journal_trials > read_model_trials:
        out.append(f"warning: the read model is behind the journal by {journal_trials - read_model_trials} trials: "
                   "the trials consumer is behind or not running")
    if superuser is not None:
        out.append(f"warning: SNTRACK_DATABASE_URL logs in as {superuser}, a PostgreSQL superuser; give the daemons "
                   "the writer role (`sntrack db migrate --roles`, README: Production set-up and security)")
    return out
