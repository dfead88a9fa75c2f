"""What `sntrack status` checks beyond counts: the daemons' own logins, idle queues, and a read model behind."""

from __future__ import annotations

import aio_pika

from sntrack.refusal import amqp_refusal
from sntrack.settings import ConfigurationError, Settings, redact


async def check_amqp_login(settings: Settings) -> None:
    """Log in to RabbitMQ as the daemons do (SNTRACK_AMQP_URL, not the management API's administrator), so a wrong
    password or vhost is reported instead of looking healthy (tests/test_status.py)."""
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:
        if refusal := amqp_refusal(exc, settings.amqp_url):
            raise ConfigurationError(refusal) from None
        raise ConfigurationError(f"cannot reach RabbitMQ at {redact(settings.amqp_url)} ({exc or type(exc).__name__})"
                                 ) from None
    await connection.close()


def warnings(queues: dict[str, dict], journal_trials: int, read_model_trials: int) -> list[str]:
    """Lines telling the user what the figures imply: a queue nobody reads, a read model behind the journal."""
    out = [f"warning: no consumer on {name} ({info.get('messages', 0)} messages waiting); start `sntrack consume all`"
           for name, info in queues.items() if info and not info.get("consumers")]
    if journal_trials > read_model_trials:
        out.append(f"warning: the read model is behind the journal by {journal_trials - read_model_trials} trials: "
                   "the trials consumer is behind or not running")
    return out
