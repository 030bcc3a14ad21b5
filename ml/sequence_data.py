"""Per-symbol sequences ("lanes") for stateful models, built without leaking the future.

Each symbol is one lane: its bars in time order, padded at the end to the longest lane. Every
bar is an input; only bars of the segment being fitted or scored carry targets, so a model's
state is warmed up on everything before them. Purged rows stay in as inputs without targets.
Features are standardized with statistics of the training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.trainer import Sequences

SEGMENT_CODE = {TRAIN: 1, VAL: 2, TEST: 3}  # 0: input only (warm-up, purged), -1: padding


@dataclass
class Lanes:
    symbols: list[str]
    ts: list[pl.Series]  # bar times of each lane, unpadded
    x: torch.Tensor  # (B, T, F) standardized features, 0 where missing or padded
    targets: dict[str, torch.Tensor]  # direction (B, T) int64 (-1 none); others float, NaN none
    segment: torch.Tensor  # (B, T) int8 codes, see SEGMENT_CODE
    scaler: Standardizer

    def sequences(self, segment: str) -> Sequences:
        """Inputs up to the last bar of `segment` in any lane; targets on that segment only."""
        code = SEGMENT_CODE[segment]
        mask = self.segment == code
        cols = torch.nonzero(mask.any(0))
        if cols.numel() == 0:
            raise ValueError(f"No {segment} rows in any lane")
        end = int(cols.max()) + 1
        return Sequences(
            self.x[:, :end],
            {k: v[:, :end] for k, v in self.targets.items()},
            loss_mask=mask[:, :end],
        )


def build_lanes(
    features: pl.DataFrame,
    labels: pl.DataFrame,
    splits: pl.DataFrame,
    feature_columns: list[str],
    horizons: tuple[int, ...],
    direction_col: str,
    quantile_col: str,
    sigma_col: str,
    scaler: Standardizer | None = None,
) -> Lanes:
    """features/labels: per (symbol, ts); splits: (symbol, ts, split) of the rows with a segment.

    The scaler is fitted on the training rows unless one is given (for inference).
    """
    rows = (
        features.select(["symbol", "ts", *feature_columns])
        .join(labels, on=["symbol", "ts"], how="left")
        .join(splits.select(["symbol", "ts", "split"]), on=["symbol", "ts"], how="left")
        .sort(["symbol", "ts"])
    )
    if scaler is None:
        scaler = Standardizer.fit(rows.filter(pl.col("split") == TRAIN), feature_columns)
    symbols = rows["symbol"].unique(maintain_order=True).to_list()
    groups = [rows.filter(pl.col("symbol") == s) for s in symbols]
    T = max(g.height for g in groups)
    B, F, H = len(symbols), len(feature_columns), len(horizons)
    x = np.zeros((B, T, F), dtype=np.float32)
    direction = np.full((B, T), -1, dtype=np.int64)
    returns = np.full((B, T, H), np.nan, dtype=np.float32)
    quant = np.full((B, T), np.nan, dtype=np.float32)
    sigma = np.full((B, T), np.nan, dtype=np.float32)
    segment = np.full((B, T), -1, dtype=np.int8)
    for b, g in enumerate(groups):
        n = g.height
        x[b, :n] = np.nan_to_num(scaler.transform(g), nan=0.0)
        d = g[direction_col].to_numpy()
        direction[b, :n] = np.where(np.isnan(d.astype(float)), -1, d).astype(np.int64)
        for j, h in enumerate(horizons):
            returns[b, :n, j] = g[f"fwd_ret_{h}"].to_numpy().astype(np.float32)
        quant[b, :n] = g[quantile_col].to_numpy().astype(np.float32)
        sigma[b, :n] = g[sigma_col].to_numpy().astype(np.float32)
        segment[b, :n] = (
            g["split"].replace_strict(SEGMENT_CODE, default=0, return_dtype=pl.Int8).to_numpy()
        )
    return Lanes(
        symbols=symbols,
        ts=[g["ts"] for g in groups],
        x=torch.from_numpy(x),
        targets={
            "direction": torch.from_numpy(direction),
            "returns": torch.from_numpy(returns),
            "quantiles": torch.from_numpy(quant),
            "sigma": torch.from_numpy(sigma),
        },
        segment=torch.from_numpy(segment),
        scaler=scaler,
    )
