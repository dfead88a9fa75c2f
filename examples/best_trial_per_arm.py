"""A catch-up subscriber: print each new best trial per arm (spectral_norm on / off) as stops arrive.

    sntrack subscribe best --bind ml.run.stop --from-start --handler examples.best_trial_per_arm:handle

It sees the whole history from the journal first, then live stops, so the bests it prints hold over every trial
ever recorded. Delivery is at least once: a stop seen again (after a crash) changes nothing here. The bests live in
memory; after a restart the subscriber resumes from its stored position, so run it with a new NAME (or delete its
row in subscriber_positions and its queue) to rebuild them from the start."""

from __future__ import annotations

from schemas import Event

METRIC = "final_val_accuracy"
best: dict[bool, tuple[float, str]] = {}  # spectral_norm → (accuracy, trial_id)


def handle(event: Event) -> None:
    if event.event_type != "ml.run.stop" or event.payload.status != "completed":
        return
    accuracy = event.payload.measurements.get(METRIC)
    arm = event.payload.spectral_norm
    if accuracy is None or (arm in best and accuracy <= best[arm][0]):
        return
    best[arm] = (accuracy, event.trial_id)
    print(f"best {'SN' if arm else 'baseline'}: {event.trial_id} {METRIC}={accuracy:.4f} "
          f"(search {event.model_run_id})", flush=True)
