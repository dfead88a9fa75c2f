"""Queues as data: each consumer's durable quorum queue with its delivery limit and dead-letter queue."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.topology import DEAD_LETTER_EXCHANGE, ROUTING_PATTERN_ALL

# A backstop only. The runtime itself dead-letters, with reason crashed_consumer, a message that keeps crashing
# the process (consumers.runtime, proven by tests/test_crash_loop.py). RabbitMQ 3.10 counts a delivery for every
# unacked message of a channel that closes (a graceful restart, a reconnect), so a low limit dead-letters good
# events of a backlog after a few restarts. The broker's own dead letters carry x-death reason delivery_limit.
DEFAULT_DELIVERY_LIMIT = 1000

# A dead-letter queue refuses (publisher nack) rather than drops once full; the runtime then keeps the original
# unacked and retries with a backoff (tests/test_dead_letter_safety.py).
DLQ_MAX_LENGTH = 100_000
DLQ_MAX_BYTES = 1024 * 1024 * 1024

# Subscriber queues drop their oldest messages beyond these bounds so a forgotten subscriber never fills the
# broker's disk; everything they carry is in the journal, from which a subscriber that overflowed re-reads.
SUBSCRIBER_MAX_LENGTH = 1_000_000
SUBSCRIBER_MAX_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class QueueSpec:
    name: str
    bindings: tuple[str, ...] = (ROUTING_PATTERN_ALL,)
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    max_length: int | None = None  # None: unbounded (a built-in consumer's queue must hold the whole backlog)
    max_bytes: int | None = None
    # False: `sntrack topology apply` declares the queue and its bindings and the runtime only checks that it exists,
    # so the consumer role needs no configure permission. True: the runtime declares and binds it (a subscriber's).
    runtime_declares: bool = False

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dlq"

    @property
    def arguments(self) -> dict[str, object]:
        # RabbitMQ 3.10 quorum queues have no default delivery limit: without one a poison message loops forever.
        # at-least-once dead-lettering (3.10, needs the stream_queue feature flag and reject-publish) makes the
        # broker keep a dead letter it cannot deliver instead of dropping it.
        arguments: dict[str, object] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": self.name,
        }
        if self.max_length is None:
            arguments.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        else:
            arguments.update({"x-max-length": self.max_length, "x-max-length-bytes": self.max_bytes,
                              "x-overflow": "drop-head"})
        return arguments

    @property
    def dead_letter_arguments(self) -> dict[str, object]:
        return {"x-queue-type": "quorum", "x-max-length": DLQ_MAX_LENGTH, "x-max-length-bytes": DLQ_MAX_BYTES,
                "x-overflow": "reject-publish"}


def subscriber_queue(name: str, patterns: tuple[str, ...]) -> QueueSpec:
    """The bounded queue of an extra subscriber `sntrack.sub.<name>`."""
    return QueueSpec(f"sntrack.sub.{name}", bindings=patterns, max_length=SUBSCRIBER_MAX_LENGTH,
                     max_bytes=SUBSCRIBER_MAX_BYTES, runtime_declares=True)
