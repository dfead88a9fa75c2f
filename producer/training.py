"""One trial: build the model, train it epoch by epoch, report every epoch, end as completed, failed or pruned.

Knows nothing about Optuna, RabbitMQ or MLflow: it reports to a `TrialRecorder` (producer.tracking) and asks an
optional `should_prune(epoch, val_accuracy)` callback; a set `stop` event interrupts it between batches.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from producer.config import TrialConfig
from producer.data import Split, load_split
from producer.model import MODEL_NAME, SingularValueMeter, build_model, device, refresh_spectral_norm
from schemas import RunError, StartPayload

Status = Literal["completed", "failed", "pruned"]


@dataclass(frozen=True)
class TrialOutcome:
    status: Status
    measurements: dict[str, float]
    error: RunError | None = None

    @property
    def interrupted(self) -> bool:
        return self.error is not None and self.error.type == "interrupted"


class TrialRecorder(Protocol):
    """Where a trial reports; called on the training thread, so every method must return at once."""

    def started(self, payload: StartPayload) -> None: ...

    def epoch(self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None,
              step: int) -> None:
        """`step`: optimiser steps taken since the trial began (ml.run.metric schema_version 2)."""

    def stopped(self, outcome: TrialOutcome, model: nn.Module | None) -> None: ...

    def settle(self) -> None:
        """Block until every event reported so far is confirmed by the broker or in the fsync'ed spool (not
        called by run_trial: its caller waits here before telling Optuna the trial is over)."""


class _Interrupted(Exception):
    pass


class _NonFiniteLoss(Exception):
    pass


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


def _error(exc: BaseException) -> RunError:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        kind = "oom"
    else:
        kind = "exception"
    # The contract refuses NUL (PostgreSQL text cannot hold it); an exception's text may carry one.
    message = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
    return RunError(type=kind, message=message[:4000])


def run_trial(
    config: TrialConfig,
    recorder: TrialRecorder,
    *,
    optuna_trial_number: int | None = None,
    paired_with: str | None = None,
    should_prune: Callable[[int, float], bool] | None = None,
    stop: threading.Event | None = None,
    measure_norms: bool = True,
) -> TrialOutcome:
    """Train one trial and report it. Never raises for a training problem: NaN/inf loss ends as failed/nan_loss,
    an exception as failed with its type and message, a set `stop` as failed/interrupted."""
    began = time.perf_counter()
    recorder.started(StartPayload(
        spectral_norm=config.spectral_norm, hyperparams=config.hyperparams(), dataset=config.dataset,
        model=MODEL_NAME, seed=config.seed, optuna_trial_number=optuna_trial_number, paired_with=paired_with,
    ))
    last: dict[str, float] = {}
    epochs_done = 0
    model: nn.Module | None = None
    status: Status = "completed"
    error: RunError | None = None
    try:
        where = device()
        split: Split = load_split(config.dataset, config.split_seed).to(where)
        torch.manual_seed(config.seed)
        model = build_model(
            split.n_features, split.n_classes, hidden=config.hidden, depth=config.depth, dropout=config.dropout,
            spectral_norm=config.spectral_norm, sn_output_layer=config.sn_output_layer,
        ).to(where)
        # Both arms of a pair see the same initial weights (above), batch order and dropout masks (below).
        torch.manual_seed(config.seed + 1)
        order = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        n = split.x_train.shape[0]
        meter = SingularValueMeter(config.seed)
        steps = 0
        for epoch in range(config.epochs):
            model.train()
            total, batches = torch.zeros((), device=where), 0
            for batch in torch.randperm(n, generator=order).to(where).split(config.batch_size):
                if stop is not None and stop.is_set():
                    raise _Interrupted(f"worker stopped by a signal during epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(split.x_train[batch]), split.y_train[batch])
                loss.backward()
                optimizer.step()
                total += loss.detach()
                batches += 1
            if config.spectral_norm:
                refresh_spectral_norm(model)
            model.eval()
            train_loss = float(total) / batches
            steps += batches
            _, train_accuracy = _evaluate(model, split.x_train, split.y_train, loss_fn)
            val_loss, val_accuracy = _evaluate(model, split.x_val, split.y_val, loss_fn)
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise _NonFiniteLoss(f"loss became {train_loss if not math.isfinite(train_loss) else val_loss} "
                                     f"at epoch {epoch}")
            last = {"train_loss": train_loss, "val_loss": val_loss,
                    "train_accuracy": train_accuracy, "val_accuracy": val_accuracy}
            epochs_done = epoch + 1
            recorder.epoch(epoch, last, meter.measure(model) if measure_norms else None, steps)
            if should_prune is not None and epochs_done < config.epochs and should_prune(epoch, val_accuracy):
                status = "pruned"
                break
    except _NonFiniteLoss as exc:
        status, error = "failed", RunError(type="nan_loss", message=str(exc))
    except _Interrupted as exc:
        status, error = "failed", RunError(type="interrupted", message=str(exc))
    except Exception as exc:  # a trial's failure is data, not a worker crash
        status, error = "failed", _error(exc)
    outcome = TrialOutcome(status, _final(last, epochs_done, began), error)
    recorder.stopped(outcome, model)
    return outcome


def _final(last: dict[str, float], epochs_done: int, began: float) -> dict[str, float]:
    final = {"duration_ms": (time.perf_counter() - began) * 1000.0, "epochs_completed": float(epochs_done)}
    final.update({f"final_{name}": value for name, value in last.items()})
    return {name: value for name, value in final.items() if math.isfinite(value)}
