"""Technical indicators as polars expressions with pandas-ta names and values.

pandas-ta seeds its EMA and Wilder (RMA) averages with the simple mean of the first `length`
valid values and recurses from there; these helpers do the same, per entity, so values match
pandas-ta-classic after each indicator's warm-up.
"""

from __future__ import annotations

import polars as pl


def seeded_ewm(x: pl.Expr, length: int, alpha: float, by: str) -> pl.Expr:
    """EMA of `x` seeded with the SMA of its first `length` valid values (null before that)."""
    valid_count = x.is_not_null().cast(pl.Int64).cum_sum().over(by)
    seeded = (
        pl.when(valid_count < length)
        .then(None)
        .when(valid_count == length)
        .then(x.rolling_mean(length).over(by))
        .otherwise(x)
    )
    return seeded.ewm_mean(alpha=alpha, adjust=False).over(by)


def ema(x: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `ema(length)`: alpha = 2 / (length + 1)."""
    return seeded_ewm(x, length, 2.0 / (length + 1), by)


def rma(x: pl.Expr, length: int, by: str) -> pl.Expr:
    """Wilder's moving average, pandas-ta `rma(length)`: alpha = 1 / length."""
    return seeded_ewm(x, length, 1.0 / length, by)


def rsi(close: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `rsi(length)`, in 0..100."""
    change = close.diff().over(by)
    up = rma(change.clip(lower_bound=0.0), length, by)
    down = rma(change.clip(upper_bound=0.0).abs(), length, by)
    return 100.0 * up / (up + down)
