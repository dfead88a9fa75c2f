"""Realistic synthetic trials (no training): learning curves, both arms, all outcomes.

Used by `sntrack publish-sample`, the tests and the benchmarks to drive the real pipeline cheaply.
"""

from __future__ import annotations

import math
import random
import uuid

from producer.emitter import TrialEvents
from schemas import Event, ProducerInfo, RunError, RunStarted, StartPayload


def synthetic_trial(
    rng: random.Random, model_run_id: str, producer: ProducerInfo, epochs: int, number: int = 0,
    *, twin_of: RunStarted | None = None, sn_effect: float = 0.0,
) -> list[Event]:
    """One trial's events in order: start, `epochs` metrics (fewer when pruned/failed), stop. With `twin_of`, the
    paired twin of that trial: same hyper-parameters and seed, the other flag, linked by `paired_with`.

    Both arms are drawn alike unless `sn_effect` is set: at 1, a spectral-norm trial gets +0.005 on its accuracy
    ceiling, half the validation noise and +8% duration; the effect scales linearly (negative: SN is worse)."""
    trial = TrialEvents(f"{model_run_id}-t{number:05d}-{uuid.uuid4().hex[:6]}", model_run_id, producer)
    if twin_of is None:
        spectral_norm = rng.random() < 0.5
        hyperparams = {
            "lr": round(10 ** rng.uniform(-4, -1.5), 6), "hidden": rng.choice([64, 128, 256]),
            "depth": rng.randint(1, 3), "dropout": round(rng.uniform(0, 0.5), 3),
            "weight_decay": round(10 ** rng.uniform(-6, -3), 8), "batch_size": rng.choice([32, 64, 128]),
            "epochs": epochs,
        }
        seed, paired_with = rng.randrange(2**31), None
    else:
        spectral_norm, hyperparams = not twin_of.payload.spectral_norm, dict(twin_of.payload.hyperparams)
        seed, paired_with = twin_of.payload.seed, twin_of.trial_id
    events: list[Event] = [trial.start(StartPayload(
        spectral_norm=spectral_norm, hyperparams=hyperparams, dataset="digits", model="mlp",
        seed=seed, optuna_trial_number=number, paired_with=paired_with,
    ))]
    outcome = rng.choices(["completed", "pruned", "failed"], weights=[85, 10, 5])[0]
    last_epoch = epochs if outcome == "completed" else rng.randint(1, max(1, epochs - 1))
    effect = sn_effect if spectral_norm else 0.0
    ceiling = rng.uniform(0.90, 0.98) + 0.005 * effect
    train_acc = val_acc = 0.1
    for epoch in range(last_epoch):
        progress = 1 - math.exp(-(epoch + 1) / max(2.0, epochs / 4))
        train_acc = min(0.999, ceiling * progress + rng.uniform(0, 0.02))
        val_acc = min(train_acc, ceiling * progress - rng.uniform(0, 0.03) * (1 - 0.5 * effect))
        norms = {f"layers.{i}": (1.0 + rng.uniform(-1e-3, 1e-3)) if spectral_norm else rng.uniform(1.5, 6.0)
                 for i in range(hyperparams["depth"] + 1)}
        events.append(trial.metric(epoch, {
            "train_loss": -math.log(max(train_acc, 1e-3)), "val_loss": -math.log(max(val_acc, 1e-3)),
            "train_accuracy": train_acc, "val_accuracy": val_acc,
        }, norms))
    final = {"duration_ms": rng.uniform(500, 3000) * last_epoch / epochs * (1 + 0.08 * effect),
             "final_val_accuracy": val_acc, "final_train_accuracy": train_acc}
    error = RunError(type="nan_loss", message="loss became nan") if outcome == "failed" else None
    events.append(trial.stop(outcome, spectral_norm, final, error))
    return events


def synthetic_study(trials: int, epochs: int, *, seed: int = 0, producer: ProducerInfo,
                    model_run_id: str | None = None, paired: bool = False,
                    sn_effect: float = 0.0) -> list[list[Event]]:
    """`trials` trials; `paired` makes every odd-numbered trial the twin of the one before (a paired design);
    `sn_effect` as in `synthetic_trial` (0: no built-in difference between the arms)."""
    rng = random.Random(seed)
    model_run_id = model_run_id or f"sample-{uuid.uuid4().hex[:8]}"
    study: list[list[Event]] = []
    for n in range(trials):
        twin_of = study[-1][0] if paired and n % 2 else None
        study.append(synthetic_trial(rng, model_run_id, producer, epochs, n, twin_of=twin_of,
                                     sn_effect=sn_effect))
    return study
