"""Baselines for the direction forecast, fitted on training rows only."""

from __future__ import annotations

import numpy as np
import polars as pl

from ml.labels import LabelConfig, direction_from_log_return


def climatology(train_labels: np.ndarray, n_rows: int, num_class: int = 3) -> np.ndarray:
    """Every row gets the training class frequencies (Laplace-smoothed)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_class) + 1.0
    return np.tile(counts / counts.sum(), (n_rows, 1))


class Persistence:
    """The direction of the trailing window predicts the next window's direction.

    The trailing class is computed with the label's own thresholds from `log_ret_<h>` (a
    backward-looking feature); its probabilities are the training rows' transition frequencies
    P(next class | trailing class), so the baseline is calibrated, not a hard guess.
    """

    def __init__(self, cfg: LabelConfig, num_class: int = 3) -> None:
        self.cfg = cfg
        self.num_class = num_class
        self.table = np.full((num_class, num_class), 1.0 / num_class)

    def trailing_class(self, df: pl.DataFrame) -> np.ndarray:
        col = f"log_ret_{self.cfg.direction_horizon}"
        if col not in df.columns:
            raise ValueError(f"Persistence needs the backward return feature {col!r}")
        cls = df.select(direction_from_log_return(pl.col(col), self.cfg)).to_series()
        return cls.fill_null(1).to_numpy().astype(np.int64)  # warm-up rows count as flat

    def fit(self, train: pl.DataFrame, target: str) -> Persistence:
        train = train.filter(pl.col(target).is_not_null())
        prev = self.trailing_class(train)
        nxt = train[target].to_numpy().astype(np.int64)
        counts = np.ones((self.num_class, self.num_class))
        np.add.at(counts, (prev, nxt), 1.0)
        self.table = counts / counts.sum(1, keepdims=True)
        return self

    def predict_proba(self, df: pl.DataFrame) -> np.ndarray:
        return self.table[self.trailing_class(df)]
