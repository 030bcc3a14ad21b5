"""Technical indicators as polars expressions with pandas-ta names and values.

pandas-ta seeds its EMA and Wilder (RMA) averages with the simple mean of the first `length`
valid values and recurses from there; these helpers do the same, per entity, so values match
pandas-ta-classic after each indicator's warm-up.
"""

from __future__ import annotations

import numpy as np
import polars as pl

EPSILON = float(np.finfo(float).eps)  # what pandas-ta puts in place of a zero range


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


def sma(x: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `sma(length)`: mean of the last `length` values, null until `length` exist."""
    return x.rolling_mean(length).over(by)


def macd(close: pl.Expr, fast: int, slow: int, signal: int, by: str) -> dict[str, pl.Expr]:
    """pandas-ta `macd(fast, slow, signal)`: line, histogram and signal, keyed by pandas-ta name.

    The signal EMA is seeded on the first `signal` valid MACD values, as pandas-ta does.
    """
    suffix = f"{fast}_{slow}_{signal}"
    line = ema(close, fast, by) - ema(close, slow, by)
    signal_line = ema(line, signal, by)
    return {
        f"MACD_{suffix}": line,
        f"MACDh_{suffix}": line - signal_line,
        f"MACDs_{suffix}": signal_line,
    }


def _non_zero(x: pl.Expr) -> pl.Expr:
    """pandas-ta's `non_zero_range`: an exact zero range becomes machine epsilon."""
    return pl.when(x == 0.0).then(EPSILON).otherwise(x)


def bbands(close: pl.Expr, length: int, std: float, by: str) -> dict[str, pl.Expr]:
    """pandas-ta `bbands(length, std)` (SMA middle, population std): lower, middle, upper,
    bandwidth in percent of the middle and %B position, keyed by pandas-ta name."""
    suffix = f"{length}_{float(std)}"
    middle = sma(close, length, by)
    half_width = std * close.rolling_std(length, ddof=0).over(by)
    lower, upper = middle - half_width, middle + half_width
    width = _non_zero(upper - lower)
    return {
        f"BBL_{suffix}": lower,
        f"BBM_{suffix}": middle,
        f"BBU_{suffix}": upper,
        f"BBB_{suffix}": 100.0 * width / middle,
        f"BBP_{suffix}": _non_zero(close - lower) / width,
    }


def true_range(high: pl.Expr, low: pl.Expr, close: pl.Expr, by: str) -> pl.Expr:
    """pandas-ta `true_range`: max of the bar's range and the gaps to the previous close;
    null on each entity's first bar, which has no previous close."""
    prev_close = close.shift(1).over(by)
    widest = pl.max_horizontal(
        _non_zero(high - low).abs(), (high - prev_close).abs(), (prev_close - low).abs()
    )
    return pl.when(prev_close.is_null()).then(None).otherwise(widest)


def atr(high: pl.Expr, low: pl.Expr, close: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `atr(length)` (`ATRr_<length>`): Wilder average of the true range."""
    return rma(true_range(high, low, close, by), length, by)


def natr(high: pl.Expr, low: pl.Expr, close: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `natr(length)`: ATR in percent of the close."""
    return 100.0 / close * atr(high, low, close, length, by)


def mom(close: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `mom(length)`: close minus the close `length` bars earlier."""
    return close - close.shift(length).over(by)


def roc(close: pl.Expr, length: int, by: str) -> pl.Expr:
    """pandas-ta `roc(length)`: percent change over `length` bars."""
    return 100.0 * mom(close, length, by) / close.shift(length).over(by)
