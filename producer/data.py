"""Datasets that ship inside scikit-learn, split with a seed and standardised on the training part only."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from producer.config import DATASETS

LOADERS = {"digits": load_digits, "wine": load_wine, "breast_cancer": load_breast_cancer}
assert tuple(LOADERS) == DATASETS


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val]).max()) + 1

    def to(self, device: torch.device) -> Split:
        return Split(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)))


@cache
def _arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    bunch = LOADERS[name]()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def load_split(name: str, seed: int, val_fraction: float = 0.25) -> Split:
    """A stratified train/validation split fixed by `seed`; features standardised with the training statistics."""
    x, y = _arrays(name)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)
    return Split(
        torch.from_numpy(scaler.transform(x_train).astype(np.float32)), torch.from_numpy(y_train),
        torch.from_numpy(scaler.transform(x_val).astype(np.float32)), torch.from_numpy(y_val),
    )
