#!/usr/bin/env bash
# make demo: a real spectral-norm vs baseline study through the whole pipeline, ending in the comparison.
#   services up → MLflow server → consumers (daemon) → two workers on one paired Optuna study → wait until
#   the consumers caught up → report (with a plot) → MLflow reconciliation → where to look next.
# Tunables: DEMO_TRIALS_PER_WORKER (8), DEMO_EPOCHS (15), DEMO_DATASET (digits), DEMO_STUDY (demo-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STATE=.sntrack/demo
mkdir -p "$STATE"
STUDY=${DEMO_STUDY:-demo-$(date -u +%Y%m%d-%H%M%S)}
PER_WORKER=${DEMO_TRIALS_PER_WORKER:-8}
EPOCHS=${DEMO_EPOCHS:-15}
DATASET=${DEMO_DATASET:-digits}
export SNTRACK_MLFLOW_TRACKING_URI=${SNTRACK_MLFLOW_TRACKING_URI:-http://127.0.0.1:5000}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "MLflow tracking server (${SNTRACK_MLFLOW_TRACKING_URI})"
bash infra/mlflow/serve.sh --port "${SNTRACK_MLFLOW_TRACKING_URI##*:}"

say "consumers: journal, trials, comparison, mlflow (log: $STATE/consumers.log)"
$BIN/sntrack consume all >>"$STATE/consumers.log" 2>&1 &
CONSUMERS=$!
trap 'kill -TERM $CONSUMERS 2>/dev/null; wait $CONSUMERS 2>/dev/null || true' EXIT

say "two workers on study $STUDY: paired design, $DATASET, $EPOCHS epochs, $PER_WORKER trials each"
for w in 1 2; do
  SNTRACK_WORKER_ID="demo-worker-$w" $BIN/sntrack worker --study "$STUDY" --n-trials "$PER_WORKER" \
    --design paired --dataset "$DATASET" --epochs "$EPOCHS" >"$STATE/worker-$w.log" 2>&1 &
  PIDS+=($!)
done
for pid in "${PIDS[@]}"; do
  wait "$pid" || { echo "a worker failed; see $STATE/worker-*.log" >&2; exit 1; }
done
tail -n 1 "$STATE"/worker-*.log

say "waiting for the consumers to catch up"
$BIN/sntrack status --wait-idle 180

say "spectral norm vs baseline"
$BIN/sntrack report --run "$STUDY" --plot "$STATE/$STUDY.png"

say "MLflow agrees with the read model?"
$BIN/sntrack reconcile --run "$STUDY" || echo "(divergence above: run 'sntrack reconcile --run $STUDY --repair')"

say "where to look next"
cat <<TEXT
  live dashboard     .venv/bin/sntrack dashboard   then open http://127.0.0.1:8050/ (verdict, trials by constraint, curves)
  MLflow UI          ${SNTRACK_MLFLOW_TRACKING_URI}  (experiment "sntrack/$STUDY"; runs sn-… and base-…, tagged trial_id, spectral_norm)
  plot               $STATE/$STUDY.png
  report as JSON     .venv/bin/sntrack report --run $STUDY --format json
  read model         psql -h 127.0.0.1 -U postgres sntrack -c "select id, spectral_norm, status, metrics->>'final_val_accuracy' from trials where model_run_id = '$STUDY'"
  queues, counts     .venv/bin/sntrack status
  rebuild a view     .venv/bin/sntrack replay trials
  more trials        .venv/bin/sntrack worker --study $STUDY --n-trials 4 --design paired --epochs $EPOCHS
  consumers          .venv/bin/sntrack consume all   (the demo stopped its own; the MLflow server keeps running:
                     bash infra/mlflow/serve.sh stop)
TEXT
