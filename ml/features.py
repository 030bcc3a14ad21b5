"""Leak-free features: each row at time t uses bars up to t and macro values published by t.

Every indicator pandas-ta has keeps its pandas-ta name and value (see `ml.indicators`); the
rest are named for what they measure. docs/FEATURES_AND_LABELS.md lists each one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta

import polars as pl

from ml.indicators import atr, bbands, ema, macd, mom, natr, roc, rsi, sma

FEATURES_CODE_VERSION = "2"
MACRO_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
# Willy Woo's difficulty ribbon: simple moving averages of difficulty over these many days
DIFFICULTY_RIBBON_DAYS = (9, 14, 25, 40, 60, 90, 128, 200)


@dataclass(frozen=True)
class FeatureConfig:
    return_windows: tuple[int, ...] = (1, 5, 10, 30, 90)
    ema_lengths: tuple[int, ...] = (12, 26, 50)
    sma_lengths: tuple[int, ...] = (10, 20, 50)
    rsi_length: int = 14
    macd: tuple[int, int, int] = (12, 26, 9)
    bbands_length: int = 20
    bbands_std: float = 2.0
    atr_length: int = 14
    roc_length: int = 10
    realized_vol_window: int = 30
    range_window: int = 20
    volume_z_window: int = 90
    activity_growth_days: int = 30
    macro_change_window: int = 5  # business days
    macro_max_staleness_days: int = 10  # an as-of macro value older than this is treated as missing

    def version(self) -> str:
        from warehouse.artifacts import content_version

        return content_version("features", FEATURES_CODE_VERSION, asdict(self))


def onchain_feature_columns(cfg: FeatureConfig) -> list[str]:
    """Scale-free on-chain columns: null for symbols without on-chain data (only BTC-* has)."""
    return [
        "hash_rate_ratio_30_60",
        "difficulty_ratio_9_200",
        "difficulty_ribbon_compression",
        "fees_per_tx",
        "fees_per_active_address",
        "tx_per_active_address",
        f"active_addresses_growth_{cfg.activity_growth_days}",
        f"tx_count_growth_{cfg.activity_growth_days}",
    ]


def model_feature_columns(cfg: FeatureConfig) -> list[str]:
    """Scale-free columns a model may use (price-level indicators are kept for people, not models)."""
    fast, slow, sig = cfg.macd
    bb = f"{cfg.bbands_length}_{float(cfg.bbands_std)}"
    cols = [f"log_ret_{w}" for w in cfg.return_windows]
    cols += [f"close_over_ema_{n}" for n in cfg.ema_lengths]
    cols += [f"close_over_sma_{n}" for n in cfg.sma_lengths]
    cols += [
        f"RSI_{cfg.rsi_length}",
        f"macd_over_close_{fast}_{slow}_{sig}",
        f"macdh_over_close_{fast}_{slow}_{sig}",
        f"macds_over_close_{fast}_{slow}_{sig}",
        f"BBB_{bb}",
        f"BBP_{bb}",
        f"NATR_{cfg.atr_length}",
        f"ROC_{cfg.roc_length}",
        f"realized_vol_{cfg.realized_vol_window}",
        f"range_position_{cfg.range_window}",
        "log1p_volume_z",
        "hour_sin",
        "hour_cos",
        "dow_sin",
        "dow_cos",
        "doy_sin",
        "doy_cos",
    ]
    for s in MACRO_SERIES:
        cols += [s, f"{s}_chg_{cfg.macro_change_window}"]
    # only the on-chain columns that assets/training.py exempts from its null filter: the others
    # are null for non-BTC symbols and would drop those rows until it uses onchain_feature_columns
    cols += ["hash_rate_ratio_30_60", "fees_per_tx"]
    return cols


def compute_features(
    ohlcv: pl.DataFrame,
    onchain: pl.DataFrame,
    macro: pl.DataFrame,
    cfg: FeatureConfig = FeatureConfig(),
) -> pl.DataFrame:
    """Features per (symbol, ts) for every bar in `ohlcv` (daily or intraday bars).

    ohlcv: symbol, ts, open, high, low, close, volume (one row per bar).
    onchain: asset, date, tx_count, active_addresses, fees_native, hash_rate, difficulty
        (daily; bar d of BTC-* symbols gets day d-1's row, since a day's on-chain totals are
        known only when the day ends). May be empty.
    macro: series, date, value, published (joined as of `published` <= bar date). May be empty.
    """
    lf = ohlcv.lazy().sort(["symbol", "ts"]).with_columns(date=pl.col("ts").dt.date())
    lf = lf.with_columns(_price_indicators(cfg)).with_columns(_price_ratios(cfg))
    lf = lf.with_columns(_cyclical_time())
    lf = _join_macro(lf, macro, cfg)
    lf = _join_onchain(lf, onchain, cfg)
    return lf.drop("date").sort(["symbol", "ts"]).collect()


def _price_indicators(cfg: FeatureConfig) -> list[pl.Expr]:
    """Indicators on the bars of each symbol, in pandas-ta units where pandas-ta has them."""
    by = "symbol"
    close, high, low = pl.col("close"), pl.col("high"), pl.col("low")
    log_close = close.log()
    log1p_volume = pl.col("volume").log1p()
    log_ret_1 = log_close.diff().over(by)
    vz = cfg.volume_z_window
    exprs = {
        "log_close": log_close,
        "log1p_volume": log1p_volume,
        **{f"log_ret_{w}": log_close.diff(w).over(by) for w in cfg.return_windows},
        **{f"EMA_{n}": ema(close, n, by) for n in cfg.ema_lengths},
        **{f"SMA_{n}": sma(close, n, by) for n in cfg.sma_lengths},
        f"RSI_{cfg.rsi_length}": rsi(close, cfg.rsi_length, by),
        **macd(close, *cfg.macd, by),
        **bbands(close, cfg.bbands_length, cfg.bbands_std, by),
        f"ATRr_{cfg.atr_length}": atr(high, low, close, cfg.atr_length, by),
        f"NATR_{cfg.atr_length}": natr(high, low, close, cfg.atr_length, by),
        f"ROC_{cfg.roc_length}": roc(close, cfg.roc_length, by),
        f"MOM_{cfg.roc_length}": mom(close, cfg.roc_length, by),
        f"realized_vol_{cfg.realized_vol_window}": log_ret_1.rolling_std(
            cfg.realized_vol_window
        ).over(by),
        f"range_position_{cfg.range_window}": _range_position(cfg.range_window, by),
        "log1p_volume_z": (
            (log1p_volume - log1p_volume.rolling_mean(vz).over(by))
            / log1p_volume.rolling_std(vz).over(by)
        ),
    }
    return [e.alias(name) for name, e in exprs.items()]


def _range_position(window: int, by: str) -> pl.Expr:
    """Where the close sits in the last `window` bars' low..high range: 0 at the low, 1 at the high."""
    lowest = pl.col("low").rolling_min(window).over(by)
    highest = pl.col("high").rolling_max(window).over(by)
    return (pl.col("close") - lowest) / (highest - lowest)


def _price_ratios(cfg: FeatureConfig) -> list[pl.Expr]:
    """Price-level indicators divided by the close, so a model sees them without the price scale."""
    close = pl.col("close")
    suffix = "_".join(map(str, cfg.macd))
    return (
        [(close / pl.col(f"EMA_{n}") - 1.0).alias(f"close_over_ema_{n}") for n in cfg.ema_lengths]
        + [(close / pl.col(f"SMA_{n}") - 1.0).alias(f"close_over_sma_{n}") for n in cfg.sma_lengths]
        + [
            (pl.col(f"{name}_{suffix}") / close).alias(f"{name.lower()}_over_close_{suffix}")
            for name in ("MACD", "MACDh", "MACDs")
        ]
    )


def _cyclical_time() -> list[pl.Expr]:
    """Hour of day (with minutes; constant on daily bars), day of week and day of year on the circle."""
    ts = pl.col("ts")
    hour = ts.dt.hour().cast(pl.Float64) + ts.dt.minute().cast(pl.Float64) / 60.0
    dow = (ts.dt.weekday() - 1).cast(pl.Float64)  # Monday = 0
    doy = (ts.dt.ordinal_day() - 1).cast(pl.Float64)
    year_len = pl.when(ts.dt.is_leap_year()).then(366.0).otherwise(365.0)
    return [
        (2 * math.pi * hour / 24).sin().alias("hour_sin"),
        (2 * math.pi * hour / 24).cos().alias("hour_cos"),
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


def _join_onchain(lf: pl.LazyFrame, onchain: pl.DataFrame, cfg: FeatureConfig) -> pl.LazyFrame:
    """On-chain daily totals for day d are complete at the end of d: bar d uses day d-1's row.

    Rolling windows count rows, one per day of the on-chain table.
    """
    by = "asset"
    difficulty, hash_rate = pl.col("difficulty"), pl.col("hash_rate")
    active, tx = pl.col("active_addresses"), pl.col("tx_count")
    ribbon = [difficulty.rolling_mean(n).over(by) for n in DIFFICULTY_RIBBON_DAYS]
    g = cfg.activity_growth_days

    def growth(x: pl.Expr) -> pl.Expr:
        # a 7-day mean first, so the weekly cycle of activity does not show up as growth
        weekly = x.rolling_mean(7).over(by)
        return (weekly / weekly.shift(g).over(by)).log()

    oc = (
        onchain.lazy()
        .sort([by, "date"])
        .with_columns(
            [
                m.alias(f"difficulty_sma_{n}")
                for m, n in zip(ribbon, DIFFICULTY_RIBBON_DAYS, strict=True)
            ]
        )
        .with_columns(
            (hash_rate.rolling_mean(30) / hash_rate.rolling_mean(60))
            .over(by)
            .alias("hash_rate_ratio_30_60"),
            (ribbon[0] / ribbon[-1]).alias("difficulty_ratio_9_200"),
            # spread of the ribbon relative to its level: small when the averages bunch up
            (
                pl.concat_list([f"difficulty_sma_{n}" for n in DIFFICULTY_RIBBON_DAYS]).list.std(
                    ddof=0
                )
                / pl.mean_horizontal([f"difficulty_sma_{n}" for n in DIFFICULTY_RIBBON_DAYS])
            ).alias("difficulty_ribbon_compression"),
            (pl.col("fees_native") / tx).alias("fees_per_tx"),
            (pl.col("fees_native") / active).alias("fees_per_active_address"),
            (tx / active).alias("tx_per_active_address"),
            growth(active).alias(f"active_addresses_growth_{g}"),
            growth(tx).alias(f"tx_count_growth_{g}"),
            (pl.col("date") + pl.duration(days=1)).alias("date"),
            (pl.col(by) + "-USD").alias("symbol"),
        )
        .select(
            "symbol",
            "date",
            *[f"difficulty_sma_{n}" for n in DIFFICULTY_RIBBON_DAYS],
            *onchain_feature_columns(cfg),
        )
    )
    return lf.join(oc, on=["symbol", "date"], how="left")
