"""The segments of a walk-forward fold (see ml/walkforward.py) and the feature scaler, fitted
on training rows only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

TRAIN, VAL, TEST = "train", "val", "test"


@dataclass
class Standardizer:
    """Per-column mean and standard deviation, fitted on training rows only."""

    columns: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, train: pl.DataFrame, columns: list[str]) -> Standardizer:
        if train.is_empty():
            raise ValueError("Cannot fit a scaler on zero training rows")
        stats = train.select(
            [pl.col(c).mean().alias(f"m_{c}") for c in columns]
            + [pl.col(c).std().alias(f"s_{c}") for c in columns]
        ).row(0, named=True)
        mean = [float(stats[f"m_{c}"] or 0.0) for c in columns]
        std = [float(stats[f"s_{c}"]) if stats[f"s_{c}"] else 1.0 for c in columns]
        return cls(columns, mean, [s if s > 0 else 1.0 for s in std])

    def transform(self, df: pl.DataFrame) -> np.ndarray:
        x = df.select(self.columns).to_numpy().astype(np.float64)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Standardizer:
        return cls(**json.loads(text))
