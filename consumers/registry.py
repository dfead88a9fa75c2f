"""Every consumer that `sntrack consume` can run, by name, with the queue it reads.

PROJECTIONS are SQL projections (journal, read models) applied by the runtime's exactly-once Store.
SIDE_EFFECTS are handler classes that act outside PostgreSQL (e.g. MLflow); each has class attributes
`name` and `queue` and is built as `cls(store, config)` with a consumers.config.ConsumerConfig.
"""

from __future__ import annotations

from consumers.mlflow.sync import MlflowSync
from consumers.projections.journal import JournalProjection
from consumers.projections.sn_comparison import ComparisonProjection
from consumers.projections.trials import TrialsProjection

PROJECTIONS = {p.name: p for p in (JournalProjection(), TrialsProjection(), ComparisonProjection())}
SIDE_EFFECTS: dict[str, type] = {MlflowSync.name: MlflowSync}
CONSUMER_NAMES = (*PROJECTIONS, *SIDE_EFFECTS)
QUEUES = tuple(p.queue for p in PROJECTIONS.values()) + tuple(cls.queue for cls in SIDE_EFFECTS.values())
