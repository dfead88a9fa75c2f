"""What a training worker tells Prometheus, and whether it is ready (served by common.ops_http.OpsServer from a
thread beside the training loop).

Read at each scrape from the publisher's counters and the spool directory, so training does no extra work: events
by outcome (published, confirmed, spooled, flushed_from_spool, rejected), the publisher's buffer (events neither
confirmed nor spooled yet), the spool's size on disk. Ready while the publisher is connected to the broker and the
Optuna storage (PostgreSQL) answers a query.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from producer.publisher import EventPublisher
from producer.spool import SEGMENT_SUFFIX
from producer.study import sqlalchemy_url

CHECK_TIMEOUT_S = 2


class PublisherCollector:
    def __init__(self, publisher: EventPublisher, spool_dir: Path):
        self.publisher = publisher
        self.spool_dir = Path(spool_dir)

    def collect(self):
        stats = self.publisher.stats
        events = CounterMetricFamily("sntrack_publisher_events", "Events of this worker by outcome: published "
                                     "(handed to the publisher), confirmed by the broker, spooled to disk, "
                                     "flushed_from_spool, rejected as unroutable", labels=["outcome"])
        for outcome in ("published", "confirmed", "spooled", "flushed_from_spool", "rejected"):
            events.add_metric([outcome], getattr(stats, outcome))
        yield events
        yield GaugeMetricFamily("sntrack_publisher_buffer_events", "Events published but neither confirmed nor "
                                "spooled yet (in memory or in flight)", value=stats.pending)
        yield GaugeMetricFamily("sntrack_publisher_connected", "1 while connected to the broker",
                                value=int(stats.connected))
        sizes = []
        for path in self.spool_dir.glob(f"*{SEGMENT_SUFFIX}"):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                continue  # delivered and removed meanwhile
        yield GaugeMetricFamily("sntrack_spool_segments", "Spool segments waiting in the spool directory (this "
                                "worker's and orphaned ones)", value=len(sizes))
        yield GaugeMetricFamily("sntrack_spool_bytes", "Bytes of spooled events waiting in the spool directory",
                                value=sum(sizes))


def worker_registry(publisher: EventPublisher, spool_dir: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PublisherCollector(publisher, spool_dir))
    return registry


class WorkerHealth:
    """broker: the publisher is connected; database: the Optuna storage answers (a fresh connection each time)."""

    def __init__(self, publisher: EventPublisher, storage_url: str):
        self.publisher = publisher
        args = {"connect_timeout": CHECK_TIMEOUT_S} if storage_url.startswith("postgresql") else {}
        self._engine = create_engine(sqlalchemy_url(storage_url), poolclass=NullPool, connect_args=args)

    def database(self) -> bool:
        try:
            with self._engine.connect() as conn:
                return conn.execute(text("SELECT 1")).scalar() == 1
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def __call__(self) -> dict[str, bool]:
        return {"broker": self.publisher.stats.connected, "database": self.database()}
