"""The consumers' configuration, built by the command line from Settings (the library never reads the environment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "sntrack/{study}"  # a name, or a template: {study} = the model_run_id
    timeout_s: float = 10.0
    max_attempts: int = 8
    concurrency: int = 8  # trials whose MLflow calls are in flight at once (each sends up to two calls together)


@dataclass(frozen=True)
class ConsumerConfig:
    """What ConsumerRuntime and the consumer service need (`Settings.consumer()`)."""

    amqp_url: str
    database_url: str
    batch_size: int = 500
    prefetch: int = 1000
    max_message_bytes: int = 1_048_576
    memory_mb: int = 512  # bodies held at once: the effective prefetch is at most memory_mb MiB / max_message_bytes
    worker_id: str | None = None  # names the connection
    stage_log: Path | None = None  # a folder for each consumer's per-batch stage timestamps (consumers.stages)
    prune_every_s: float = 60.0  # how often a projection's redundant bookkeeping is pruned (consumers.pruning)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
