"""Training datasets: features joined to labels, a time split with purge and embargo, scalers
fitted on training rows only."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

TRAIN, VAL, TEST = "train", "val", "test"


@dataclass(frozen=True)
class SplitConfig:
    """Chronological train / validation / test split by calendar date.

    A row is purged when any of its label windows (recorded as `label_end_ts`) reaches the next
    segment's start minus the embargo, so no training label overlaps validation or test data.
    """

    val_fraction: float = 0.15
    test_fraction: float = 0.25
    embargo_days: int = 5

    def __post_init__(self) -> None:
        if not (
            0 < self.val_fraction < 1
            and 0 < self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 0.9
        ):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction="
                f"{self.test_fraction} must be in (0, 1) and leave >= 10% for training"
            )
        if self.embargo_days < 0:
            raise ValueError(f"embargo_days must be >= 0, got {self.embargo_days}")


@dataclass(frozen=True)
class SplitBoundaries:
    val_start: datetime
    test_start: datetime
    embargo: timedelta

    def to_json(self) -> dict[str, str]:
        return {
            "val_start": self.val_start.isoformat(),
            "test_start": self.test_start.isoformat(),
            "embargo_days": str(self.embargo.days),
        }


def split_boundaries(ts: pl.Series, cfg: SplitConfig) -> SplitBoundaries:
    days = ts.dt.truncate("1d").unique().sort()
    if days.len() < 50:
        raise ValueError(
            f"Only {days.len()} distinct days of data; a train/val/test split needs "
            "at least 50. Ingest a longer range."
        )
    n = days.len()
    val_start = days[int(n * (1 - cfg.test_fraction - cfg.val_fraction))]
    test_start = days[int(n * (1 - cfg.test_fraction))]
    return SplitBoundaries(val_start, test_start, timedelta(days=cfg.embargo_days))


def assign_splits(rows: pl.DataFrame, b: SplitBoundaries) -> pl.DataFrame:
    """Add `split` (train / val / test) and drop purged rows.

    `rows` needs `ts` and `label_end_ts` (null when the label window runs past the data).
    Training rows must have label windows ending before val_start - embargo; validation rows
    before test_start - embargo. Test rows are kept whole: they are only ever predicted.
    """
    ts, end = pl.col("ts"), pl.col("label_end_ts")
    split = (
        pl.when(ts < b.val_start)
        .then(pl.lit(TRAIN))
        .when(ts < b.test_start)
        .then(pl.lit(VAL))
        .otherwise(pl.lit(TEST))
    )
    keep = (
        pl.when(pl.col("split") == TRAIN)
        .then(end.is_not_null() & (end < b.val_start - b.embargo))
        .when(pl.col("split") == VAL)
        .then(end.is_not_null() & (end < b.test_start - b.embargo))
        .otherwise(True)
    )
    return rows.with_columns(split=split).filter(keep)


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


def join_features_labels(features: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    missing = {"symbol", "ts"} - set(features.columns) | {"symbol", "ts"} - set(labels.columns)
    if missing:
        raise ValueError(f"features and labels both need columns symbol and ts; missing {missing}")
    return features.join(labels, on=["symbol", "ts"], how="inner").sort(["symbol", "ts"])
