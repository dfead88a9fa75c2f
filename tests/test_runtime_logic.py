"""The consumer runtime's batching, settling and retry logic in memory: fake deliveries, a fake handler and a fake
dead-letter exchange, no broker (pure logic; tests/test_poison.py, test_outages.py and test_dead_letter_safety.py
prove the same against the real RabbitMQ and PostgreSQL).

Every fake writes to one shared log, so the tests assert the order of commits, acks and dead letters.
"""

import asyncio
import json

import pytest

from consumers.handler import DeadLetter, RetryLater
from consumers.runtime import HANDLER_ATTEMPTS, ConsumerRuntime
from consumers.topology import QueueSpec
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import REASON_HEADER
from sntrack.settings import Settings

EVENTS = [e for trial in synthetic_study(3, 2, seed=1, producer=producer_info("w"), model_run_id="rt") for e in trial]


class FakeMessage:
    def __init__(self, log: list, body: bytes, message_id: str, channel: object = "channel-1"):
        self.log, self.body, self.message_id, self.channel = log, body, message_id, channel
        self.redelivered = False
        self.headers: dict = {}
        self.routing_key, self.type, self.content_type, self.timestamp = "ml.run.metric", None, None, None

    async def ack(self, multiple: bool = False) -> None:
        self.log.append(("ack", self.message_id, multiple))


class FakeExchange:
    def __init__(self, log: list):
        self.log = log

    async def publish(self, message, routing_key: str, mandatory: bool, timeout: float) -> None:
        self.log.append(("dead_letter", message.message_id, message.headers[REASON_HEADER]))


class FakeHandler:
    """Commits a batch unless it holds a poison event (raises `poison_error`) or transient errors remain."""

    name = "fake"
    queue = QueueSpec("sntrack.fake")

    def __init__(self, log: list, poison: set[str] = frozenset(), poison_error: Exception | None = None,
                 transient: list[Exception] = ()):
        self.log, self.poison, self.transient = log, poison, list(transient)
        self.poison_error = poison_error or ValueError("a handler bug")
        self.calls: list[list[str]] = []

    async def handle(self, events) -> None:
        ids = [str(e.event_id) for e in events]
        self.calls.append(ids)
        if self.transient:
            raise self.transient.pop(0)
        if self.poison & set(ids):
            raise self.poison_error
        self.log.append(("commit", *ids))


def _runtime(handler: FakeHandler, **settings) -> ConsumerRuntime:
    return ConsumerRuntime(handler, Settings(**settings).consumer())


def _messages(log: list, events=EVENTS) -> list[FakeMessage]:
    return [FakeMessage(log, e.to_json(), str(e.event_id)) for e in events]


def _ids(messages) -> list[str]:
    return [m.message_id for m in messages]


async def test_a_batch_is_what_has_arrived_up_to_batch_size():
    log: list = []
    runtime = _runtime(FakeHandler(log), batch_size=3)
    for message in _messages(log)[:7]:
        runtime._inbox.put_nowait(message)
    sizes = [len(await runtime._next_batch()) for _ in range(3)]
    assert sizes == [3, 3, 1]  # the last batch does not wait to fill up
    runtime.stop()
    assert await asyncio.wait_for(runtime._next_batch(), 1) == []  # stopping ends the wait for a message


async def test_a_batch_is_acked_once_after_its_commit_one_multiple_ack_per_channel():
    log: list = []
    messages = _messages(log)[:6]
    for m in messages[3:]:
        m.channel = "channel-2"  # a reconnect mixed two channels into one batch
    runtime = _runtime(FakeHandler(log))
    await runtime._process(messages, FakeExchange(log))
    assert log == [("commit", *_ids(messages)), ("ack", messages[2].message_id, True),
                   ("ack", messages[5].message_id, True)]
    assert (runtime.stats.batches, runtime.stats.handled, runtime.stats.dead_lettered) == (1, 6, 0)


async def test_transient_errors_retry_the_same_batch_and_nothing_is_acked_before_it_commits():
    log: list = []
    messages = _messages(log)[:4]
    handler = FakeHandler(log, transient=[OSError("database away"), RetryLater("mlflow away")])
    runtime = _runtime(handler)
    await runtime._process(messages, FakeExchange(log))
    assert handler.calls == [_ids(messages)] * 3
    assert log == [("commit", *_ids(messages)), ("ack", messages[-1].message_id, True)]
    assert runtime.stats.retries == 2


async def test_stopping_while_a_dependency_is_away_leaves_the_batch_unacked():
    log: list = []
    handler = FakeHandler(log, transient=[OSError("database away")])
    runtime = _runtime(handler)
    runtime.stop()
    await runtime._process(_messages(log)[:4], FakeExchange(log))
    assert log == [] and runtime.stats.handled == 0


async def test_a_failing_batch_is_split_one_by_one_and_the_culprit_dead_lettered_after_the_attempts():
    log: list = []
    messages = _messages(log)[:5]
    culprit = messages[2].message_id
    handler = FakeHandler(log, poison={culprit})
    runtime = _runtime(handler)
    await runtime._process(messages, FakeExchange(log))

    assert handler.calls[0] == _ids(messages)  # the whole batch first
    assert handler.calls[1:] == [[i] for i in _ids(messages[:2])] + [[culprit]] * HANDLER_ATTEMPTS + [
        [i] for i in _ids(messages[3:])]
    expected = []
    for m in messages:
        if m.message_id == culprit:
            expected += [("dead_letter", culprit, "handler_error"), ("ack", culprit, False)]
        else:
            expected += [("commit", m.message_id), ("ack", m.message_id, False)]
    assert log == expected  # each good event acked right after its own commit, the culprit after its dead letter
    assert runtime.stats.dead_lettered == 1 and runtime.stats.reasons == {"handler_error": 1}
    assert runtime.stats.handled == 4


async def test_a_handler_dead_letter_is_settled_at_once_with_its_reason():
    log: list = []
    messages = _messages(log)[:3]
    culprit = messages[0].message_id
    handler = FakeHandler(log, poison={culprit}, poison_error=DeadLetter("unknown_study", "no such study"))
    runtime = _runtime(handler)
    await runtime._process(messages, FakeExchange(log))
    assert handler.calls == [_ids(messages), [culprit], [messages[1].message_id], [messages[2].message_id]]
    assert log[:2] == [("dead_letter", culprit, "unknown_study"), ("ack", culprit, False)]
    assert runtime.stats.reasons == {"unknown_study": 1} and runtime.stats.handled == 2


@pytest.mark.parametrize("body, reason", [(b"not json", "invalid_json"),
                                           (json.dumps({"event_type": "ml.run.nope"}).encode(), "unknown_type")])
async def test_gate_rejections_are_dead_lettered_and_acked_and_the_rest_handled_as_a_batch(body, reason):
    log: list = []
    messages = _messages(log)[:3]
    bad = FakeMessage(log, body, "bad")
    handler = FakeHandler(log)
    runtime = _runtime(handler)
    await runtime._process([messages[0], bad, *messages[1:]], FakeExchange(log))
    assert handler.calls == [_ids(messages)]
    assert log == [("dead_letter", "bad", reason), ("ack", "bad", False), ("commit", *_ids(messages)),
                   ("ack", messages[-1].message_id, True)]
    assert runtime.stats.reasons == {reason: 1}
