"""`sntrack export` and `sntrack trial show` on a study recorded through the real consumers."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet

from producer.emitter import producer_info
from producer.sample import synthetic_study
from sntrack.sparkline import sparkline
from tests.test_studies import _record, sntrack


async def _study(env):
    trials = synthetic_study(4, 3, producer=producer_info(), model_run_id="exp", seed=3, paired=True)
    await _record(env, [e for t in trials for e in t])
    return trials


async def test_export_one_row_per_trial_and_per_epoch(env, tmp_path):
    trials = await _study(env)
    run = sntrack(env, "export", "--run", "exp")
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert len(rows) == 4
    by_id = {r["trial_id"]: r for r in rows}
    for trial in trials:
        start, stop = trial[0], trial[-1]
        row = by_id[start.trial_id]
        assert row["status"] == stop.payload.status and row["spectral_norm"] == str(start.payload.spectral_norm)
        assert row["paired_with"] == (start.payload.paired_with or "")
        for name, value in start.payload.hyperparams.items():
            assert row[f"hp.{name}"] == str(value)
        if "final_val_accuracy" in stop.payload.measurements:
            assert float(row["final.final_val_accuracy"]) == stop.payload.measurements["final_val_accuracy"]

    run = sntrack(env, "export", "--run", "exp", "--curves", "--format", "jsonl")
    curves = [json.loads(line) for line in run.stdout.splitlines()]
    metrics = [e for t in trials for e in t if e.event_type == "ml.run.metric"]
    assert len(curves) == len(metrics)
    first = next(c for c in curves if c["trial_id"] == metrics[0].trial_id and c["epoch"] == metrics[0].payload.epoch)
    assert first["val_accuracy"] == metrics[0].payload.splits["val"]["accuracy"]

    target = tmp_path / "curves.parquet"
    run = sntrack(env, "export", "--run", "exp", "--curves", "--format", "parquet", "--output", str(target))
    assert run.returncode == 0 and f"wrote {len(metrics)} rows" in run.stderr, run.stderr
    assert pyarrow.parquet.read_table(target).num_rows == len(metrics)


async def test_trial_show_prints_events_curve_and_singular_values(env):
    trials = await _study(env)
    trial = trials[0]
    run = sntrack(env, "trial", "show", trial[0].trial_id)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"trial {trial[0].trial_id}  study exp  spectral_norm=")
    assert f"  events ({len(trial)} in the journal):" in lines
    curve_line = next(line for line in lines if line.strip().startswith("val_accuracy"))
    assert len(curve_line.split()[1]) == sum(e.event_type == "ml.run.metric" for e in trial)
    if trial[1].payload.spectral_norms:
        assert "  largest singular value per layer (last epoch measured):" in lines


def test_sparkline_scales_between_extremes():
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([1.0, None, float("nan"), 1.0]) == "▁  ▁"
    assert sparkline([]) == ""
