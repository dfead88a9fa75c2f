"""The worker's pure parts: model, training outcomes, search space, and the recorder's event ordering."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch import nn

from producer.data import load_split
from producer.emitter import producer_info
from producer.model import SingularValueMeter, build_model, refresh_spectral_norm
from producer.search_space import SearchSpace, SearchSpaceError
from producer.tracking import Tracker
from producer.training import TrialConfig, TrialOutcome, _error, run_trial
from schemas import RunMetric, RunStarted, RunStopped

torch.set_num_threads(1)

BASE = TrialConfig(spectral_norm=True, lr=3e-3, hidden=32, depth=2, dropout=0.1, weight_decay=1e-4,
                   batch_size=64, epochs=4, seed=3, dataset="wine")


class ListRecorder:
    def __init__(self):
        self.start = None
        self.epochs: list[tuple[int, dict, dict | None]] = []
        self.steps: list[int | None] = []
        self.outcome: TrialOutcome | None = None

    def started(self, payload):
        self.start = payload

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        self.epochs.append((epoch, measurements, spectral_norms))
        self.steps.append(step)

    def stopped(self, outcome, model):
        self.outcome = outcome


def train(config: TrialConfig, **kwargs) -> ListRecorder:
    recorder = ListRecorder()
    run_trial(config, recorder, **kwargs)
    return recorder


def test_sn_arm_has_unit_singular_values_and_baseline_does_not():
    sn = train(dataclasses.replace(BASE, dataset="digits", epochs=6))
    baseline = train(dataclasses.replace(BASE, dataset="digits", epochs=6, spectral_norm=False))
    assert sn.outcome.status == baseline.outcome.status == "completed"
    # SN's power iteration runs once per optimizer step; the worker converges it after each epoch's last step, so
    # the evaluated weights are normalized within the report's manipulation check (sigma <= 1.05). The baseline's
    # grow freely.
    values = [value for _, _, norms in sn.epochs for value in norms.values()]
    assert all(set(norms) == {"layers.0", "layers.1", "layers.2"} for _, _, norms in sn.epochs)
    assert all(0.95 < value <= 1.05 for value in values), values
    assert max(baseline.epochs[-1][2].values()) > 2.0


def test_output_layer_can_stay_unwrapped():
    model = build_model(8, 3, hidden=16, depth=1, dropout=0.0, spectral_norm=True, sn_output_layer=False)
    assert [hasattr(layer, "parametrizations") for layer in model.layers] == [True, False]
    with pytest.raises(RuntimeError, match="eval mode"):
        SingularValueMeter().measure(model)


def test_singular_value_meter_tracks_the_exact_value_as_weights_change():
    torch.manual_seed(1)
    model = build_model(64, 10, hidden=128, depth=2, dropout=0.0, spectral_norm=False).eval()
    meter = SingularValueMeter(seed=0)
    for _ in range(5):  # weights drift between "epochs" as training would move them
        with torch.no_grad():
            for layer in model.layers:
                layer.weight.add_(0.01 * torch.randn_like(layer.weight))
        measured = meter.measure(model)
        exact = {f"layers.{i}": float(torch.linalg.matrix_norm(layer.weight, ord=2))
                 for i, layer in enumerate(model.layers)}
        assert measured.keys() == exact.keys()
        assert all(-1e-5 < (exact[k] - measured[k]) / exact[k] < 1e-2 for k in exact), (measured, exact)


def _train_and_measure(config: TrialConfig, epochs: int) -> list[tuple[dict, dict]]:
    """(measured, exact) singular values at the end of each epoch of a real training run, the worker's way: SN's
    vectors refreshed, eval mode, one meter warm-started across epochs."""
    split = load_split(config.dataset, config.split_seed)
    torch.manual_seed(config.seed)
    model = build_model(split.n_features, split.n_classes, hidden=config.hidden, depth=config.depth,
                        dropout=config.dropout, spectral_norm=config.spectral_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    meter, results = SingularValueMeter(seed=0), []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(split.x_train.shape[0], generator=order).split(config.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(split.x_train[batch]), split.y_train[batch]).backward()
            optimizer.step()
        if config.spectral_norm:
            refresh_spectral_norm(model)
        model.eval()
        measured = meter.measure(model)
        with torch.no_grad():
            exact = {f"layers.{i}": float(torch.linalg.matrix_norm(layer.weight, ord=2))
                     for i, layer in enumerate(model.layers)}
        results.append((measured, exact))
    return results


@pytest.mark.parametrize("spectral_norm", [False, True], ids=["plain", "spectral_norm"])
def test_singular_value_meter_tracks_training(spectral_norm):
    """Warm-started across the epochs of the benchmark's trial, plain and spectrally normalized: within 1% of the
    SVD of the effective weight, never above it."""
    config = dataclasses.replace(BASE, dataset="digits", hidden=64, lr=3e-3, spectral_norm=spectral_norm)
    for epoch, (measured, exact) in enumerate(_train_and_measure(config, epochs=8)):
        assert measured.keys() == exact.keys()
        assert all(-1e-5 < (exact[k] - measured[k]) / exact[k] < 1e-2 for k in exact), (epoch, measured, exact)


def test_singular_value_meter_leaves_spectral_norm_vectors_alone():
    torch.manual_seed(2)
    model = build_model(16, 4, hidden=32, depth=2, dropout=0.0, spectral_norm=True, sn_output_layer=False).eval()
    wrapped = [layer.parametrizations.weight[0] for layer in model.layers[:-1]]
    before = [(norm._u.clone(), norm._v.clone()) for norm in wrapped]
    meter = SingularValueMeter(seed=0)
    measured = meter.measure(model)
    assert set(measured) == {"layers.0", "layers.1", "layers.2"}
    after = [(norm._u, norm._v) for norm in wrapped]
    assert all(torch.equal(a, b) for pair in zip(after, before, strict=True) for a, b in zip(*pair, strict=True))


def test_pair_starts_from_the_same_weights():
    torch.manual_seed(0)
    first = build_model(8, 3, hidden=16, depth=1, dropout=0.0, spectral_norm=False).state_dict()
    torch.manual_seed(0)
    wrapped = build_model(8, 3, hidden=16, depth=1, dropout=0.0, spectral_norm=True).state_dict()
    assert torch.equal(first["layers.0.weight"], wrapped["layers.0.parametrizations.weight.original"])


def test_training_reports_every_epoch_and_final_measurements():
    recorder = train(dataclasses.replace(BASE, epochs=3))
    assert [e for e, _, _ in recorder.epochs] == [0, 1, 2]
    assert set(recorder.epochs[0][1]) == {"train_loss", "val_loss", "train_accuracy", "val_accuracy"}
    final = recorder.outcome.measurements
    assert final["epochs_completed"] == 3 and final["final_val_accuracy"] == recorder.epochs[-1][1]["val_accuracy"]
    assert recorder.start.hyperparams["epochs"] == 3 and recorder.start.seed == 3 and recorder.start.dataset == "wine"
    per_epoch = recorder.steps[0]  # optimiser steps: one per batch, counted from the trial's start
    assert per_epoch > 1 and recorder.steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_nan_loss_ends_as_failed_nan_loss():
    recorder = train(dataclasses.replace(BASE, spectral_norm=False, lr=1e6))
    assert recorder.outcome.status == "failed" and recorder.outcome.error.type == "nan_loss"


def test_exception_ends_as_failed_with_type_and_message():
    recorder = train(dataclasses.replace(BASE, dataset="mnist"))
    assert recorder.outcome.status == "failed"
    assert recorder.outcome.error.type == "exception" and "ValueError" in recorder.outcome.error.message


def test_exception_text_with_nul_still_gives_a_valid_error():
    error = _error(ValueError("bad\x00byte"))  # the contract refuses NUL: it would fail the failed stop itself
    assert error.type == "exception" and error.message == "ValueError: bad\\x00byte"


def test_stop_interrupts_the_running_trial():
    stop = threading.Event()
    stop.set()
    recorder = train(BASE, stop=stop)
    assert recorder.outcome.error.type == "interrupted" and recorder.outcome.interrupted


def test_pruning_ends_as_pruned():
    recorder = train(BASE, should_prune=lambda epoch, accuracy: epoch == 1)
    assert recorder.outcome.status == "pruned" and len(recorder.epochs) == 2


def test_search_space_overrides_and_validation():
    space = SearchSpace.load(overrides={"lr": "1e-3:1e-1", "hidden": "16,32", "epochs": "5", "dropout": "0:1"})
    assert space.dimensions["lr"].log and space.dimensions["lr"].low == 1e-3
    assert space.dimensions["hidden"].choices == (16, 32)
    assert space.dimensions["epochs"].value == 5
    assert isinstance(space.dimensions["dropout"].low, float)
    assert space.searches_the_flag and not SearchSpace.load(overrides={"spectral_norm": "true"}).searches_the_flag
    with pytest.raises(SearchSpaceError, match="epochs"):
        SearchSpace.load(overrides={"epochs": "0"})
    with pytest.raises(SearchSpaceError, match="bounds"):
        SearchSpace.load(overrides={"lr": "a:b"})


class FakeMlflow:
    available = True

    def __init__(self):
        self.calls = []

    def begin(self, trial_id, model_run_id, payload, on_run_id):
        self.on_run_id = on_run_id
        return object()

    def metrics(self, run, epoch, values, timestamp_ms):
        self.calls.append(("metrics", epoch))

    def end(self, run, status, state_dict):
        self.calls.append(("end", status, sorted(state_dict)[:1]))

    def close(self, timeout):
        return True


class ListPublisher:
    def __init__(self):
        self.events = []

    def publish(self, event):
        self.events.append(event)


def test_events_wait_for_the_mlflow_run_id_in_order():
    publisher, mlflow = ListPublisher(), FakeMlflow()
    tracker = Tracker(publisher, producer_info("test"), mlflow, start_wait_s=30)
    run_trial(dataclasses.replace(BASE, epochs=2), tracker.trial("t-1", "study"))
    assert publisher.events == [] and mlflow.calls[-1][:2] == ("end", "completed")
    assert mlflow.on_run_id("run-123") is True  # the start goes out with the run: the worker owns it
    assert mlflow.on_run_id("late") is False  # a second release changes nothing; the worker drops that run
    kinds = [type(e) for e in publisher.events]
    assert kinds == [RunStarted, RunMetric, RunMetric, RunStopped]
    assert [e.seq for e in publisher.events] == [0, 1, 2, 3]
    assert publisher.events[0].payload.mlflow_run_id == "run-123"
    metrics = [e.payload for e in publisher.events[1:3]]  # schema_version 2: split measurements and the step
    assert [m.splits["val"].keys() for m in metrics] == [{"loss", "accuracy"}] * 2
    assert 0 < metrics[0].step < metrics[1].step == 2 * metrics[0].step


def test_events_go_out_with_a_null_run_id_when_mlflow_is_late():
    publisher, mlflow = ListPublisher(), FakeMlflow()
    tracker = Tracker(publisher, producer_info("test"), mlflow, start_wait_s=0.05)
    recorder = tracker.trial("t-2", "study")
    run_trial(dataclasses.replace(BASE, epochs=1), recorder)
    threading.Event().wait(0.3)
    assert [e.seq for e in publisher.events] == [0, 1, 2]
    assert publisher.events[0].payload.mlflow_run_id is None
    assert mlflow.on_run_id("too-late") is False  # refused: the run is the consumer's
    tracker.close(1)
