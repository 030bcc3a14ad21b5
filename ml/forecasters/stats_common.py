"""What the statistical baselines share: per-symbol series computed causally over a fold's bars,
per-symbol fits with the all-training-rows fallback, predictions laid onto the scored rows, and
the driftless normal random walk that the zero-return and EWMA baselines predict with."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import polars as pl
from scipy.stats import norm

from ml.forecasters.base import DIRECTION_COLUMNS, FoldData, TargetSpec
from ml.labels import LabelConfig

T = TypeVar("T")

# a symbol with fewer training rows than this (none, typically: one listed after fit_end) is
# fitted on every symbol's training rows instead
MIN_SYMBOL_ROWS = 30

LOG_RETURN = pl.col("close").log().diff()


def label_config(spec: TargetSpec) -> LabelConfig:
    """The label settings the targets were built with: `spec`'s horizons and direction
    thresholds."""
    h = spec.direction_horizon
    return LabelConfig(
        horizons=(h,),
        direction_horizon=h,
        vol_window=spec.sigma_window,
        up_threshold=spec.up_threshold,
        down_threshold=spec.down_threshold,
    )


def bar_series(data: FoldData, **exprs: pl.Expr) -> pl.DataFrame:
    """`symbol`, `ts` of every bar plus one column per keyword: the expression evaluated over
    each symbol's bars in time order, so shifts, diffs and rolling windows only look back."""
    return (
        data.bars.sort(["symbol", "ts"])
        .with_columns(**{name: e.over("symbol") for name, e in exprs.items()})
        .select(["symbol", "ts", *exprs])
    )


def on_scored(data: FoldData, frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """`symbol`, `ts` of `data.scored` in its order with `columns` taken from `frame` (one row
    per symbol and ts, or one row per symbol for per-symbol constants); every scored row must
    get a value in every column."""
    keys = data.scored.select(["symbol", "ts"])
    on = ["symbol", "ts"] if "ts" in frame.columns else ["symbol"]
    out = keys.join(frame.select([*on, *columns]), on=on, how="left", maintain_order="left")
    if out.height != keys.height:
        raise ValueError(f"Predictions hold duplicate {on} keys; give one row per key")
    missing = out.filter(pl.any_horizontal(pl.col(columns).is_null()))
    if missing.height:
        first = missing.row(0, named=True)
        raise ValueError(
            f"No prediction for {missing.height} scored rows of fold {data.key} (first: "
            f"{first['symbol']} at {first['ts']}): the symbol was not fitted, or its bars are "
            "too short for the filter's warm-up; fit on this FoldData and give bars from the "
            "start of each symbol's history"
        )
    return out


def fit_per_symbol(
    data: FoldData,
    columns: list[str],
    fit: Callable[[pl.DataFrame], T],
    train: pl.DataFrame | None = None,
) -> dict[str, T]:
    """`fit` applied to each symbol's training rows (those with every one of `columns` set);
    symbols with fewer than `MIN_SYMBOL_ROWS` such rows share one fit on all training rows.
    `train` is `data.train` unless given (the training rows with derived columns joined).
    Covers every symbol of `data.rows`, so every scored symbol has its fit."""
    train = (data.train if train is None else train).drop_nulls(columns)
    if train.height < MIN_SYMBOL_ROWS:
        raise ValueError(
            f"Fold {data.key} has {train.height} training rows with {columns} set; a fit needs "
            f"at least {MIN_SYMBOL_ROWS}: use a fold with a longer training window"
        )
    fits: dict[str, T] = {}
    pooled: list[T] = []  # fitted once, the first time a symbol needs it
    for symbol in data.rows["symbol"].unique(maintain_order=True):
        part = train.filter(pl.col("symbol") == symbol)
        if part.height >= MIN_SYMBOL_ROWS:
            fits[symbol] = fit(part)
        else:
            if not pooled:
                pooled.append(fit(train))
            fits[symbol] = pooled[0]
    return fits


def fitted(fits: dict[str, T], symbol: str) -> T:
    """The fit of `symbol`, or an error saying the forecaster was fitted on another fold."""
    if symbol not in fits:
        raise KeyError(
            f"Symbol {symbol!r} was not in the fold this forecaster was fitted on; call fit on "
            "the same FoldData before predict"
        )
    return fits[symbol]


def normal_quantiles(mean: np.ndarray, sd: np.ndarray, spec: TargetSpec) -> dict[str, np.ndarray]:
    """The quantile columns of `spec` for normal distributions with these means and sds."""
    return {
        col: mean + norm.ppf(level) * sd
        for col, level in zip(spec.quantile_columns, spec.quantile_levels, strict=True)
    }


def normal_direction(mean: np.ndarray, sd: np.ndarray, cfg: LabelConfig) -> dict[str, np.ndarray]:
    """p_down, p_flat, p_up of a normal log return: below log(1 + down_threshold), between,
    above log(1 + up_threshold) -- the label's own classes."""
    p_down = norm.cdf((math.log1p(cfg.down_threshold) - mean) / sd)
    p_up = norm.sf((math.log1p(cfg.up_threshold) - mean) / sd)
    return dict(zip(DIRECTION_COLUMNS, (p_down, 1.0 - p_down - p_up, p_up), strict=True))
