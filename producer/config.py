"""What determines a trial: its configuration, free of torch so the command line can load it quickly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("digits", "wine", "breast_cancer")  # bundled with scikit-learn: nothing is downloaded


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines a trial. Two trials with equal configs (the flag aside) are a pair."""

    spectral_norm: bool
    lr: float
    hidden: int
    depth: int
    dropout: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int
    dataset: str = "digits"
    split_seed: int = 0
    sn_output_layer: bool = True

    def hyperparams(self) -> dict[str, float | int | bool]:
        """The flat hyper-parameters recorded with the trial (flag, seed and dataset have their own fields)."""
        values = dataclasses.asdict(self)
        for own_field in ("spectral_norm", "seed", "dataset"):
            del values[own_field]
        return values


@dataclass(frozen=True)
class PublisherConfig:
    """What EventPublisher needs; the command line builds it from Settings (`Settings.publisher()`)."""

    amqp_url: str
    spool_dir: Path
    buffer: int = 10_000  # events held in memory while the broker confirms; beyond it they go to the spool
    confirm_timeout_s: float = 10.0
    worker_id: str | None = None  # names the connection; None: this host and process
