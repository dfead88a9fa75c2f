"""Queues as data: each consumer's durable quorum queue with its delivery limit and dead-letter queue."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.topology import DEAD_LETTER_EXCHANGE, ROUTING_PATTERN_ALL

# A backstop for messages that crash the consumer process itself. Handler errors are dead-lettered by the
# runtime after its own retries. The limit is not low because RabbitMQ 3.10 counts every message of the
# prefetch window as delivered again when a consumer dies: a low limit would dead-letter innocent messages
# after a few kill -9s.
DEFAULT_DELIVERY_LIMIT = 20


@dataclass(frozen=True)
class QueueSpec:
    name: str
    bindings: tuple[str, ...] = (ROUTING_PATTERN_ALL,)
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dlq"

    @property
    def arguments(self) -> dict[str, object]:
        # RabbitMQ 3.10 quorum queues have no default delivery limit: without one a poison message loops forever.
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": self.name,
        }

    @property
    def dead_letter_arguments(self) -> dict[str, object]:
        return {"x-queue-type": "quorum"}
