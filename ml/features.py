"""Leak-free features: each row at time t uses bars up to t and macro values published by t."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta

import polars as pl

from ml.indicators import ema, rsi

FEATURES_CODE_VERSION = "1"
MACRO_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")


@dataclass(frozen=True)
class FeatureConfig:
    return_windows: tuple[int, ...] = (1, 5, 10, 30, 90)
    ema_lengths: tuple[int, ...] = (12, 26)
    rsi_length: int = 14
    macd: tuple[int, int, int] = (12, 26, 9)
    realized_vol_window: int = 30
    macro_change_window: int = 5  # business days
    macro_max_staleness_days: int = 10  # an as-of macro value older than this is treated as missing

    def version(self) -> str:
        from warehouse.artifacts import content_version

        return content_version("features", FEATURES_CODE_VERSION, asdict(self))


def model_feature_columns(cfg: FeatureConfig) -> list[str]:
    """Scale-free columns a model may use (price-level indicators are kept for people, not models)."""
    fast, slow, sig = cfg.macd
    cols = [f"log_ret_{w}" for w in cfg.return_windows]
    cols += [f"close_over_ema_{n}" for n in cfg.ema_lengths]
    cols += [
        f"RSI_{cfg.rsi_length}",
        f"macd_over_close_{fast}_{slow}_{sig}",
        f"macdh_over_close_{fast}_{slow}_{sig}",
        f"realized_vol_{cfg.realized_vol_window}",
        "log1p_volume_z",
        "dow_sin",
        "dow_cos",
        "doy_sin",
        "doy_cos",
    ]
    for s in MACRO_SERIES:
        cols += [s, f"{s}_chg_{cfg.macro_change_window}"]
    cols += ["hash_rate_ratio_30_60", "fees_per_tx"]
    return cols


def compute_features(
    ohlcv: pl.DataFrame,
    onchain: pl.DataFrame,
    macro: pl.DataFrame,
    cfg: FeatureConfig = FeatureConfig(),
) -> pl.DataFrame:
    """Features per (symbol, ts) for every bar in `ohlcv`.

    ohlcv: symbol, ts, open, high, low, close, volume (one row per bar).
    onchain: asset, date, ... (daily; joined to BTC-* symbols on the same UTC date's row of
        the previous day, since a day's on-chain totals are known only when the day ends).
    macro: series, date, value, published (joined as of `published` <= bar date).
    """
    by = "symbol"
    fast, slow, sig = cfg.macd
    close = pl.col("close")
    lf = (
        ohlcv.lazy()
        .sort(["symbol", "ts"])
        .with_columns(
            log_close=close.log(),
            log1p_volume=pl.col("volume").log1p(),
            date=pl.col("ts").dt.date(),
        )
    )
    lf = lf.with_columns(
        [
            (pl.col("log_close") - pl.col("log_close").shift(w).over(by)).alias(f"log_ret_{w}")
            for w in cfg.return_windows
        ]
        + [ema(close, n, by).alias(f"EMA_{n}") for n in cfg.ema_lengths]
        + [
            ema(close, fast, by).alias("_ema_fast"),
            ema(close, slow, by).alias("_ema_slow"),
            rsi(close, cfg.rsi_length, by).alias(f"RSI_{cfg.rsi_length}"),
        ]
    )
    macd_name = f"MACD_{fast}_{slow}_{sig}"
    lf = lf.with_columns((pl.col("_ema_fast") - pl.col("_ema_slow")).alias(macd_name))
    lf = lf.with_columns(ema(pl.col(macd_name), sig, by).alias(f"MACDs_{fast}_{slow}_{sig}"))
    lf = lf.with_columns(
        (pl.col(macd_name) - pl.col(f"MACDs_{fast}_{slow}_{sig}")).alias(
            f"MACDh_{fast}_{slow}_{sig}"
        ),
        pl.col("log_ret_1")
        .rolling_std(cfg.realized_vol_window)
        .over(by)
        .alias(f"realized_vol_{cfg.realized_vol_window}"),
        (
            (pl.col("log1p_volume") - pl.col("log1p_volume").rolling_mean(90).over(by))
            / pl.col("log1p_volume").rolling_std(90).over(by)
        ).alias("log1p_volume_z"),
    )
    lf = lf.with_columns(
        [(close / pl.col(f"EMA_{n}") - 1.0).alias(f"close_over_ema_{n}") for n in cfg.ema_lengths]
        + [
            (pl.col(macd_name) / close).alias(f"macd_over_close_{fast}_{slow}_{sig}"),
            (pl.col(f"MACDh_{fast}_{slow}_{sig}") / close).alias(
                f"macdh_over_close_{fast}_{slow}_{sig}"
            ),
        ]
        + _cyclical_time()
    ).drop(["_ema_fast", "_ema_slow"])
    lf = _join_macro(lf, macro, cfg)
    lf = _join_onchain(lf, onchain)
    return lf.drop("date").sort(["symbol", "ts"]).collect()


def _cyclical_time() -> list[pl.Expr]:
    dow = (pl.col("ts").dt.weekday() - 1).cast(pl.Float64)  # Monday = 0
    doy = (pl.col("ts").dt.ordinal_day() - 1).cast(pl.Float64)
    year_len = pl.when(pl.col("ts").dt.is_leap_year()).then(366.0).otherwise(365.0)
    return [
        (2 * math.pi * dow / 7).sin().alias("dow_sin"),
        (2 * math.pi * dow / 7).cos().alias("dow_cos"),
        (2 * math.pi * doy / year_len).sin().alias("doy_sin"),
        (2 * math.pi * doy / year_len).cos().alias("doy_cos"),
    ]


def _join_macro(lf: pl.LazyFrame, macro: pl.DataFrame, cfg: FeatureConfig) -> pl.LazyFrame:
    """As-of join each macro series on its publication date: a value is used only once public."""
    w = cfg.macro_change_window
    for series in MACRO_SERIES:
        s = (
            macro.lazy()
            .filter(pl.col("series") == series)
            .sort("date")
            .with_columns((pl.col("value") - pl.col("value").shift(w)).alias(f"{series}_chg_{w}"))
            .select(
                pl.col("published").alias("date"),
                pl.col("value").alias(series),
                f"{series}_chg_{w}",
            )
            .sort("date")
        )
        lf = lf.sort("date").join_asof(
            s,
            on="date",
            strategy="backward",
            tolerance=timedelta(days=cfg.macro_max_staleness_days),
        )
    return lf


def _join_onchain(lf: pl.LazyFrame, onchain: pl.DataFrame) -> pl.LazyFrame:
    """On-chain daily totals for day d are complete at the end of d: bar d uses day d-1's row."""
    oc = (
        onchain.lazy()
        .sort(["asset", "date"])
        .with_columns(
            (pl.col("hash_rate").rolling_mean(30) / pl.col("hash_rate").rolling_mean(60))
            .over("asset")
            .alias("hash_rate_ratio_30_60"),
            (pl.col("fees_native") / pl.col("tx_count")).alias("fees_per_tx"),
            (pl.col("date") + pl.duration(days=1)).alias("date"),
            (pl.col("asset") + "-USD").alias("symbol"),
        )
        .select("symbol", "date", "hash_rate_ratio_30_60", "fees_per_tx")
    )
    return lf.join(oc, on=["symbol", "date"], how="left")
