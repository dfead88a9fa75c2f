"""What `sntrack worker --no-mlflow` imports before its first trial, in CPU and wall seconds.

    PYTHONPATH=. .venv/bin/python bench/worker_imports.py

CPU time is the figure to compare on a shared machine: wall time there mostly measures the other processes."""

import sys
import time

started, cpu = time.perf_counter(), time.process_time()
import optuna  # noqa: E402, F401
import torch  # noqa: E402, F401

import producer.emitter  # noqa: E402, F401
import producer.publisher  # noqa: E402, F401
import producer.study  # noqa: E402, F401
import producer.tracking  # noqa: E402, F401
import sntrack.cli  # noqa: E402, F401

print(f"cpu {time.process_time() - cpu:.2f} s  wall {time.perf_counter() - started:.2f} s  "
      f"mlflow imported: {'mlflow' in sys.modules}")
