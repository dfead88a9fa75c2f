"""Every consumer that `sntrack consume` can run, by name, with the queue it reads.

PROJECTIONS are SQL projections (journal, read models) applied by the runtime's exactly-once Store.
Installed projection plugins (entry-point group `sntrack.projections`, consumers.plugins) join PROJECTIONS and
QUEUES; BUILTIN_QUEUES are sntrack's own (infra/rabbitmq/definitions.json). PLUGINS lists every plugin found, with
the problem of one that cannot run.
SIDE_EFFECTS are handler classes that act outside PostgreSQL (e.g. MLflow); each has class attributes
`name` and `queue` and is built as `cls(store, config)` with a consumers.config.ConsumerConfig.
"""

from __future__ import annotations

from consumers.mlflow.sync import MlflowSync
from consumers.plugins import discover
from consumers.projections.journal import JournalProjection
from consumers.projections.sn_comparison import ComparisonProjection
from consumers.projections.trials import TrialsProjection

BUILTIN_PROJECTIONS = {p.name: p for p in (JournalProjection(), TrialsProjection(), ComparisonProjection())}
SIDE_EFFECTS: dict[str, type] = {MlflowSync.name: MlflowSync}
PLUGINS = discover({*BUILTIN_PROJECTIONS, *SIDE_EFFECTS, "all"})
PROJECTIONS = {**BUILTIN_PROJECTIONS, **{p.name: p.projection for p in PLUGINS if p.projection is not None}}
CONSUMER_NAMES = (*PROJECTIONS, *SIDE_EFFECTS)
BUILTIN_QUEUES = (tuple(p.queue for p in BUILTIN_PROJECTIONS.values())
                  + tuple(cls.queue for cls in SIDE_EFFECTS.values()))
QUEUES = BUILTIN_QUEUES + tuple(p.queue for name, p in PROJECTIONS.items() if name not in BUILTIN_PROJECTIONS)


def plugin_migrations() -> list[tuple[str, str]]:
    """(version, SQL) of every loaded plugin's migrations, for `sntrack db migrate`."""
    return [m for p in PLUGINS if p.projection is not None for m in p.projection.migration_versions()]


def plugin_tables() -> tuple[str, ...]:
    """Every loaded plugin's tables: the writer role upserts them (`sntrack db migrate --roles`)."""
    return tuple(t for p in PLUGINS if p.projection is not None for t in p.projection.tables)
