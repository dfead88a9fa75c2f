"""A consumer's memory is bounded under a flood of maximum-size messages: prefetch follows the memory budget."""

import asyncio
import signal
from dataclasses import replace

from consumers.runtime import effective_prefetch
from sntrack.settings import Settings
from tests.conftest import wait_until
from tests.test_crash_loop import start_daemon_with

BUDGET_MB = 64
MESSAGES = 150
# The documented bound: an idle daemon (Python, aio-pika, asyncpg, pydantic: about 80 MiB) plus twice the budget
# (the bodies in flight, and their copies on the way to the dead-letter queue).
RSS_BOUND_MB = 120 + 2 * BUDGET_MB


def test_prefetch_follows_the_memory_budget():
    config = Settings(consumer_memory_mb=512).consumer()
    assert effective_prefetch(config) == 512  # 1 MiB messages
    assert effective_prefetch(replace(config, max_message_bytes=64 * 1024)) == 1000  # prefetch
    assert effective_prefetch(replace(config, memory_mb=1, max_message_bytes=4 * 1024 * 1024)) == 1


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


async def test_rss_stays_bounded_under_a_flood_of_maximum_size_messages(env):
    size = env.settings.max_message_bytes
    daemon = start_daemon_with(env, {"SNTRACK_CONSUMER_MEMORY_MB": str(BUDGET_MB)})
    try:
        await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/sntrack.journal") or {})
                         .get("consumers"), what="the daemon to consume")
        idle = _peak_rss_mb(daemon.pid)
        # Maximum-size bodies that are not JSON: each is read whole, judged by the gate and dead-lettered.
        for start in range(0, MESSAGES, 25):
            await env.publish_raw([bytes([65 + (start + i) % 26]) * size for i in range(25)])
        await wait_until(lambda: env.queue_depth("sntrack.journal.dlq") == MESSAGES, timeout=180,
                         what="every message judged")
        peak = _peak_rss_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    print(f"consumer RSS: idle {idle:.0f} MiB, peak {peak:.0f} MiB under {MESSAGES} x {size} B "
          f"(budget {BUDGET_MB} MiB, bound {RSS_BOUND_MB} MiB)")
    assert daemon.returncode == 0
    assert peak < RSS_BOUND_MB
