"""Technical indicators as polars expressions with pandas-ta names and values.

Each helper is an expression over one entity's bars in time order (no `.over`): callers split
the bars by symbol first (`per_symbol`), which is much faster than windowed expressions.
Composite indicators (RSI, Bollinger bands, MACD, NATR) are built from their averages passed as
columns (`rsi_from_averages`, `bbands_from`, ...): polars does not reliably share a repeated
rolling or EWM subexpression, so computing the parts as columns in one `with_columns` stage and
combining them in the next is several times faster.

pandas-ta seeds its EMA and Wilder (RMA) averages with the simple mean of the first `length`
valid values and recurses from there; these helpers do the same, so values match
pandas-ta-classic after each indicator's warm-up.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl

EPSILON = float(np.finfo(float).eps)  # what pandas-ta puts in place of a zero range


def per_symbol(
    frame: pl.DataFrame, build: Callable[[pl.LazyFrame], pl.LazyFrame], by: str = "symbol"
) -> pl.DataFrame:
    """`build` applied to each `by` group's rows sorted by ts, run in parallel, concatenated in
    (`by`, ts) order. `build` sees one entity at a time, so its expressions need no `.over`."""
    ordered = frame.sort([by, "ts"])
    parts = ordered.partition_by(by, maintain_order=True) if ordered.height else [ordered]
    return pl.concat(pl.collect_all([build(part.lazy()) for part in parts]), how="vertical")


def seeded_ewm(x: pl.Expr, length: int, alpha: float) -> pl.Expr:
    """EMA of `x` seeded with the mean of its first `length` valid values (null before that)."""
    valid_count = x.is_not_null().cum_sum()
    seed = x.drop_nulls().head(length).mean()
    seeded = (
        pl.when(valid_count < length).then(None).when(valid_count == length).then(seed).otherwise(x)
    )
    return seeded.ewm_mean(alpha=alpha, adjust=False)


def ema(x: pl.Expr, length: int) -> pl.Expr:
    """pandas-ta `ema(length)`: alpha = 2 / (length + 1)."""
    return seeded_ewm(x, length, 2.0 / (length + 1))


def rma(x: pl.Expr, length: int) -> pl.Expr:
    """Wilder's moving average, pandas-ta `rma(length)`: alpha = 1 / length."""
    return seeded_ewm(x, length, 1.0 / length)


def rsi_from_averages(up: pl.Expr, down: pl.Expr) -> pl.Expr:
    """pandas-ta `rsi`, in 0..100, from the Wilder averages of the gains and of the losses."""
    return 100.0 * up / (up + down)


def sma(x: pl.Expr, length: int) -> pl.Expr:
    """pandas-ta `sma(length)`: mean of the last `length` values, null until `length` exist."""
    return x.rolling_mean(length)


def macd_names(fast: int, slow: int, signal: int) -> tuple[str, str, str]:
    """pandas-ta's names for the MACD line, histogram and signal."""
    suffix = f"{fast}_{slow}_{signal}"
    return f"MACD_{suffix}", f"MACDh_{suffix}", f"MACDs_{suffix}"


def _non_zero(x: pl.Expr) -> pl.Expr:
    """pandas-ta's `non_zero_range`: an exact zero range becomes machine epsilon."""
    return pl.when(x == 0.0).then(EPSILON).otherwise(x)


def rolling_pstd(x: pl.Expr, length: int) -> pl.Expr:
    """Population standard deviation of the last `length` values (pandas-ta's `stdev(ddof=0)`)."""
    return x.rolling_std(length, ddof=0)


def bbands_from(
    close: pl.Expr, middle: pl.Expr, sd: pl.Expr, length: int, std: float
) -> dict[str, pl.Expr]:
    """pandas-ta `bbands(length, std)` (SMA middle, population std) from the SMA and the rolling
    population std of the close: lower, middle, upper, bandwidth in percent of the middle and %B
    position, keyed by pandas-ta name. Pass columns: each output reuses them several times."""
    suffix = f"{length}_{float(std)}"
    lower, upper = middle - std * sd, middle + std * sd
    width = _non_zero(upper - lower)
    # a flat window (population std exactly 0): the close sits on the middle band of a
    # zero-width band, %B = 0.5, what pandas-ta gives where numpy's variance keeps an ulp of
    # residual (where it is exactly 0, pandas-ta's eps / eps gives 1; either is a convention).
    # The SMA's rounding residual (an ulp of the price) must not be divided by eps: that gave
    # %B = +-2048 and more on flat runs of bars
    position = pl.when(sd == 0.0).then(0.5).otherwise(_non_zero(close - lower) / width)
    return {
        f"BBL_{suffix}": lower,
        f"BBM_{suffix}": middle,
        f"BBU_{suffix}": upper,
        f"BBB_{suffix}": 100.0 * width / middle,
        f"BBP_{suffix}": position,
    }


def true_range(high: pl.Expr, low: pl.Expr, close: pl.Expr) -> pl.Expr:
    """pandas-ta `true_range`: max of the bar's range and the gaps to the previous close;
    null on the first bar, which has no previous close."""
    prev_close = close.shift(1)
    widest = pl.max_horizontal(
        _non_zero(high - low).abs(), (high - prev_close).abs(), (prev_close - low).abs()
    )
    return pl.when(prev_close.is_null()).then(None).otherwise(widest)


def atr(high: pl.Expr, low: pl.Expr, close: pl.Expr, length: int) -> pl.Expr:
    """pandas-ta `atr(length)` (`ATRr_<length>`): Wilder average of the true range."""
    return rma(true_range(high, low, close), length)


def natr_from_atr(atr_: pl.Expr, close: pl.Expr) -> pl.Expr:
    """pandas-ta `natr(length)`: ATR(length) in percent of the close."""
    return 100.0 / close * atr_


def mom(close: pl.Expr, length: int) -> pl.Expr:
    """pandas-ta `mom(length)`: close minus the close `length` bars earlier."""
    return close - close.shift(length)


def roc(close: pl.Expr, length: int) -> pl.Expr:
    """pandas-ta `roc(length)`: percent change over `length` bars."""
    return 100.0 * mom(close, length) / close.shift(length)
