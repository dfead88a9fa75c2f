"""An sntrack projection plugin: `best_trials_by_arm`, the best completed trial of each study and arm.

Installed beside sntrack, it runs like a built-in projection:

    pip install ./examples/sntrack-best-trials
    sntrack db migrate                 # creates best_trials_by_arm (recorded as plugin:best_trials/001_...)
    sntrack topology apply             # declares its queue sntrack.plugin.best_trials, bound to ml.run.stop
    sntrack consume best_trials        # or `sntrack consume all`
    sntrack replay best_trials         # rebuilt from the journal, history included
    sntrack status                     # lists it under "projection plugins"

`project` only says which writes an event implies; sntrack applies each event exactly once, in batches, and
dead-letters what cannot be applied. Its statement is order-independent (keep the higher accuracy, ties to the
smaller trial id), as every projection's must be: events of a queue can arrive in any order after a redelivery.
"""

from __future__ import annotations

from consumers.plugins import PluginProjection, sql_files
from consumers.projections.base import Statement
from schemas import Event, RunStopped

KEEP_BEST = """
INSERT INTO best_trials_by_arm AS b (model_run_id, spectral_norm, trial_id, val_accuracy, finished_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (model_run_id, spectral_norm) DO UPDATE SET
    trial_id = EXCLUDED.trial_id, val_accuracy = EXCLUDED.val_accuracy, finished_at = EXCLUDED.finished_at
WHERE EXCLUDED.val_accuracy > b.val_accuracy
   OR (EXCLUDED.val_accuracy = b.val_accuracy AND EXCLUDED.trial_id < b.trial_id)
"""


class BestTrials(PluginProjection):
    name = "best_trials"
    patterns = ("ml.run.stop",)
    tables = ("best_trials_by_arm",)
    migrations = sql_files(__name__)

    def project(self, event: Event):
        match event:
            case RunStopped(payload=p) if p.status == "completed" and "final_val_accuracy" in p.measurements:
                yield Statement(KEEP_BEST, (event.model_run_id, p.spectral_norm, event.trial_id,
                                            p.measurements["final_val_accuracy"], event.occurred_at))
