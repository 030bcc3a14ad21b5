"""Leak-free features: each row at time t uses bars up to t and macro values published by t.

Every indicator pandas-ta has keeps its pandas-ta name and value (see `ml.indicators`); the
rest are named for what they measure. docs/FEATURES_AND_LABELS.md lists each one.

Macro and on-chain inputs have ragged edges (a series that starts late, ends early, or lags
the price): their values are carried forward up to a limit with their age, and
`select_model_columns` drops an input from the model columns when it is missing at the end
of the data or on too many bars (docs/FEATURES_AND_LABELS.md, "Ragged edges").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import numpy as np
import polars as pl

from ml.indicators import (
    bbands_from,
    ema,
    macd_names,
    mom,
    natr_from_atr,
    per_symbol,
    rma,
    roc,
    rolling_pstd,
    rsi_from_averages,
    sma,
    true_range,
)

# 3: hour of day counts seconds; 4: macro columns follow the series present, ages, on-chain carry;
# 5: a macro change uses only observations public when its newest one was, an observation
# published after a newer one never becomes the series' current value, %B of a flat window is 0.5
FEATURES_CODE_VERSION = "5"
# the default macro series, in the order of their columns; other series present follow, sorted
MACRO_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
ONCHAIN_AGE_COLUMN = "onchain_age_days"
# Willy Woo's difficulty ribbon: simple moving averages of difficulty over these many days
DIFFICULTY_RIBBON_DAYS = (9, 14, 25, 40, 60, 90, 128, 200)
CALENDAR_COLUMNS = ("hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos")


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
    macro_change_window: int = 5  # observations (business days for the daily H.15 rates)
    # carry limits, in calendar days since publication: an older value is treated as missing
    macro_max_staleness_days: int = 10
    # day d's totals are published at the end of d; a source lagging the price by up to this
    # many more days still feeds the newest bars
    onchain_max_staleness_days: int = 3
    # the ragged-edge rule judges each input on the bars after this many bars of each symbol
    warmup_bars: int = 250
    # an input missing on more than this share of those bars is dropped from the model columns
    max_missing_share: float = 0.05

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


def macro_series_of(macro: pl.DataFrame) -> tuple[str, ...]:
    """The series with at least one value in `macro` (the warehouse's macro table), in column
    order: those of MACRO_SERIES first, in that order, then the others sorted."""
    present = set(macro.filter(pl.col("value").is_not_null())["series"].unique().to_list())
    return (*[s for s in MACRO_SERIES if s in present], *sorted(present - set(MACRO_SERIES)))


def onchain_symbols_of(onchain: pl.DataFrame) -> list[str]:
    """The bar symbols that receive on-chain rows: `<asset>-USD` for each asset in `onchain`."""
    return sorted(f"{a}-USD" for a in onchain["asset"].unique().to_list())


def macro_feature_columns(cfg: FeatureConfig, series: Sequence[str] = MACRO_SERIES) -> list[str]:
    """Each macro series as of the bar date and its change over the last `macro_change_window` observations."""
    return [c for s in series for c in (s, f"{s}_chg_{cfg.macro_change_window}")]


def model_feature_columns(cfg: FeatureConfig, series: Sequence[str] = MACRO_SERIES) -> list[str]:
    """Scale-free columns a model may use (price-level indicators are kept for people, not
    models), with macro columns for `series`: the candidates. `select_model_columns` applies
    the ragged-edge rule to them and gives the columns a features snapshot hands to models."""
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
        *CALENDAR_COLUMNS,
    ]
    cols += macro_feature_columns(cfg, series)
    # null for symbols without on-chain data: the training dataset exempts them from its
    # warm-up null filter, LightGBM splits on missing values and the sequence models see 0
    # (the training mean) after scaling
    return cols + onchain_feature_columns(cfg)


@dataclass(frozen=True)
class InputVerdict:
    """How one ragged input (a macro series, or an on-chain feature column) fared under the
    ragged-edge rule, judged on the bars after each symbol's warm-up."""

    source: str  # "macro" | "onchain"
    name: str  # the series id, or the on-chain column
    columns: tuple[str, ...]  # its model columns
    bars: int  # bars judged: after the warm-up, of the symbols the input applies to
    missing_share: float  # share of those bars where a column is null
    stale_at_end: tuple[str, ...]  # symbols whose newest bar lacks it
    last_carried: str | None  # the newest bar date with a value, ISO
    reasons: tuple[str, ...] = ()  # why it was dropped; empty when kept

    @property
    def kept(self) -> bool:
        return not self.reasons

    def message(self) -> str:
        """One line for a log: what was dropped and why."""
        return (
            f"{self.source} input {self.name} dropped from the model columns "
            f"({', '.join(self.columns)}): {'; '.join(self.reasons)}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "kept": self.kept}


@dataclass(frozen=True)
class ModelColumns:
    """The model columns of a features frame after the ragged-edge rule."""

    columns: list[str]  # what models use, in `model_feature_columns` order
    onchain_columns: list[str]  # the kept on-chain columns: null on symbols without on-chain data
    carried_columns: list[str]  # the kept macro and on-chain columns: carried values
    verdicts: list[InputVerdict] = field(default_factory=list)

    @property
    def dropped(self) -> list[InputVerdict]:
        return [v for v in self.verdicts if not v.kept]


def select_model_columns(
    features: pl.DataFrame,
    cfg: FeatureConfig,
    macro_series: Sequence[str],
    onchain_symbols: Sequence[str],
) -> ModelColumns:
    """The ragged-edge rule: which macro series and on-chain columns models may use.

    `features` is `compute_features` output with macro columns for `macro_series`;
    `onchain_symbols` are the symbols that receive on-chain rows (`onchain_symbols_of`). Each
    input is judged on the bars after the first `cfg.warmup_bars` of each symbol it applies to
    (every symbol for macro series, `onchain_symbols` for on-chain columns) and dropped when

    - it is null on the newest such bar of any symbol (its newest value is older than the carry
      limit at the end of the data: models could not use it on the bars that matter most), or
    - it is null on more than `cfg.max_missing_share` of those bars (it starts too late, or
      has holes longer than the carry limit).

    Kept inputs may still be null on up to that share of bars (the training dataset drops
    those rows). With no bar past the warm-up there is nothing to judge and all are kept.
    Price and calendar columns are always kept.
    """
    w = cfg.macro_change_window
    judged = [*macro_feature_columns(cfg, macro_series), *onchain_feature_columns(cfg)]
    warm = (
        features.select("symbol", "ts", *judged)  # narrow first: minute bars are many
        .sort(["symbol", "ts"])
        .with_columns(_bar=pl.int_range(pl.len()).over("symbol"))
        .filter(pl.col("_bar") >= cfg.warmup_bars)
        .drop("_bar")
    )
    chain = warm.filter(pl.col("symbol").is_in(list(onchain_symbols)))
    macro_limit = f"{cfg.macro_max_staleness_days}-day carry limit"
    onchain_limit = f"{cfg.onchain_max_staleness_days}-day carry limit after day d-1"
    # no bars to judge: every input is kept while no symbol is past its warm-up (too early to
    # tell), but on-chain columns are dropped when no symbol past it has on-chain data
    no_chain = () if warm.is_empty() else ("no bars of a symbol with on-chain data",)
    inputs = [("macro", s, (s, f"{s}_chg_{w}"), warm, macro_limit, ()) for s in macro_series]
    inputs += [
        ("onchain", c, (c,), chain, onchain_limit, no_chain) for c in onchain_feature_columns(cfg)
    ]
    verdicts = [_judge(*i, cfg) for i in inputs]
    dropped = {c for v in verdicts if not v.kept for c in v.columns}
    columns = [c for c in model_feature_columns(cfg, macro_series) if c not in dropped]
    onchain = [c for c in onchain_feature_columns(cfg) if c not in dropped]
    carried = [c for v in verdicts if v.kept for c in v.columns]
    return ModelColumns(columns, onchain, carried, verdicts)


def _judge(
    source: str,
    name: str,
    columns: tuple[str, ...],
    rows: pl.DataFrame,
    limit: str,
    if_no_rows: tuple[str, ...],
    cfg: FeatureConfig,
) -> InputVerdict:
    """One input's verdict under the ragged-edge rule (see `select_model_columns`)."""
    present = pl.all_horizontal([pl.col(c).is_not_null() for c in columns])
    if rows.is_empty():
        return InputVerdict(source, name, columns, 0, 0.0, (), None, if_no_rows)
    d = rows.select("symbol", "ts", present.alias("present"))
    missing = 1.0 - d["present"].mean()
    newest = d.group_by("symbol", maintain_order=True).last()
    stale = tuple(sorted(newest.filter(~pl.col("present"))["symbol"].to_list()))
    last = d.filter(pl.col("present"))["ts"].max()
    last_carried = None if last is None else last.date().isoformat()
    reasons = []
    if stale:
        end = newest.filter(~pl.col("present"))["ts"].max().date().isoformat()
        since = f"last carried to {last_carried}" if last_carried else "no value on any bar"
        reasons.append(
            f"no value within the {limit} on the newest bar of {list(stale)} ({end}); {since}"
        )
    if missing > cfg.max_missing_share:
        reasons.append(
            f"missing on {missing:.1%} of the {d.height} bars after the warm-up "
            f"(at most {cfg.max_missing_share:.0%} allowed)"
        )
    return InputVerdict(
        source, name, columns, d.height, float(missing), stale, last_carried, tuple(reasons)
    )


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
        A row is carried to later bars for up to `onchain_max_staleness_days` more days.
    macro: series, date, value, published (joined as of `published` <= bar date for daily
        bars, <= the day before for intraday bars that close before the day ends; carried for
        up to `macro_max_staleness_days`). May be empty. Every series with a value here gets
        its columns (`macro_series_of`), so the features follow what was ingested.

    Each symbol's bars are computed apart and in parallel (no windowed `.over` expressions), in
    stages so that every intermediate (EMA, true range, MACD line) is computed once.
    """
    series = macro_series_of(macro)
    names = feature_columns(cfg, series)
    clash = sorted(set(series) & (set(ohlcv.columns) | set(feature_columns(cfg, ()))))
    if clash:
        raise ValueError(
            f"Macro series {clash} have the name of a bar or feature column; rename them in "
            "the macro table (e.g. with a prefix) so their columns do not collide"
        )
    # a bar's date, and the day before it: the newest publication day an intraday bar may use
    days = ohlcv.lazy().select(
        pl.concat([pl.col("ts").dt.date(), pl.col("ts").dt.date() - timedelta(days=1)])
        .unique()
        .alias("date")
    )
    daily = _by_day(days, macro, series, cfg).collect()
    calendar = daily.select("date", *[c for c in CALENDAR_COLUMNS if c in daily.columns])
    macro_daily = daily.drop(*calendar.columns[1:]).rename({"date": "_macro_date"})
    bar_days = ohlcv.select("symbol", pl.col("ts").dt.date().alias("date")).unique()
    daily_onchain = _onchain_by_day(onchain, bar_days, cfg)

    def build(bars: pl.LazyFrame) -> pl.LazyFrame:
        lf = _price_features(bars, cfg).with_columns(
            *_hour_of_day(), date=pl.col("ts").dt.date(), _macro_date=_macro_date()
        )
        lf = lf.join(calendar.lazy(), on="date", how="left", maintain_order="left")
        lf = lf.join(macro_daily.lazy(), on="_macro_date", how="left", maintain_order="left")
        lf = lf.join(daily_onchain.lazy(), on=["symbol", "date"], how="left", maintain_order="left")
        return lf.select(*ohlcv.columns, *names)

    return per_symbol(ohlcv, build)


def feature_columns(cfg: FeatureConfig, series: Sequence[str] = MACRO_SERIES) -> list[str]:
    """Every column `compute_features` adds to the bars, in output order, with macro columns
    for `series` (`compute_features` uses the series present in its macro input)."""
    bb = f"{cfg.bbands_length}_{float(cfg.bbands_std)}"
    suffix = "_".join(map(str, cfg.macd))
    return [
        "log_close",
        "log1p_volume",
        *[f"log_ret_{w}" for w in cfg.return_windows],
        *[f"EMA_{n}" for n in cfg.ema_lengths],
        *[f"SMA_{n}" for n in cfg.sma_lengths],
        f"RSI_{cfg.rsi_length}",
        *macd_names(*cfg.macd),
        *[f"{b}_{bb}" for b in ("BBL", "BBM", "BBU", "BBB", "BBP")],
        f"ATRr_{cfg.atr_length}",
        f"NATR_{cfg.atr_length}",
        f"ROC_{cfg.roc_length}",
        f"MOM_{cfg.roc_length}",
        f"realized_vol_{cfg.realized_vol_window}",
        f"range_position_{cfg.range_window}",
        "log1p_volume_z",
        *[f"close_over_ema_{n}" for n in cfg.ema_lengths],
        *[f"close_over_sma_{n}" for n in cfg.sma_lengths],
        *[f"{name.lower()}_over_close_{suffix}" for name in ("MACD", "MACDh", "MACDs")],
        *CALENDAR_COLUMNS,
        *macro_feature_columns(cfg, series),
        *[f"{s}_age_days" for s in series],
        *[f"difficulty_sma_{n}" for n in DIFFICULTY_RIBBON_DAYS],
        *onchain_feature_columns(cfg),
        ONCHAIN_AGE_COLUMN,
    ]


def feature_schema(
    cfg: FeatureConfig, series: Sequence[str] = MACRO_SERIES
) -> dict[str, pl.DataType]:
    """The columns and types of a features snapshot, in order: the bars as stored in the
    warehouse (symbol, ts, OHLCV), then `feature_columns`. Ages in days (since a macro value's
    publication, since the on-chain row) are integers; every other feature is a float."""
    from warehouse.schema import OHLCV

    return {
        **OHLCV.columns,
        **{
            c: pl.Int64() if c.endswith("_age_days") else pl.Float64()
            for c in feature_columns(cfg, series)
        },
    }


def _price_features(bars: pl.LazyFrame, cfg: FeatureConfig) -> pl.LazyFrame:
    """Indicators on one symbol's bars in time order, in pandas-ta units where pandas-ta has
    them, then the price-level ones divided by the close for models."""
    close, high, low = pl.col("close"), pl.col("high"), pl.col("low")
    fast, slow, sig = cfg.macd
    ema_lengths = sorted({*cfg.ema_lengths, fast, slow})
    bb_middle = f"SMA_{cfg.bbands_length}"
    sma_lengths = sorted({*cfg.sma_lengths, cfg.bbands_length})
    vz, n_atr = cfg.volume_z_window, cfg.atr_length
    line, hist, signal = macd_names(*cfg.macd)
    suffix = "_".join(map(str, cfg.macd))

    # stage 1: inputs several indicators share
    lf = bars.with_columns(
        close.log().alias("log_close"),
        pl.col("volume").log1p().alias("log1p_volume"),
        close.diff().alias("_change"),
        true_range(high, low, close).alias("_true_range"),
    )
    # stage 2: the averages and windows
    log_close, log1p_volume, change = pl.col("log_close"), pl.col("log1p_volume"), pl.col("_change")
    lf = lf.with_columns(
        *[log_close.diff(w).alias(f"log_ret_{w}") for w in cfg.return_windows],
        *[ema(close, n).alias(f"EMA_{n}") for n in ema_lengths],
        *[sma(close, n).alias(f"SMA_{n}") for n in sma_lengths],
        rolling_pstd(close, cfg.bbands_length).alias("_bb_sd"),
        rma(change.clip(lower_bound=0.0), cfg.rsi_length).alias("_rsi_up"),
        rma(change.clip(upper_bound=0.0).abs(), cfg.rsi_length).alias("_rsi_down"),
        rma(pl.col("_true_range"), n_atr).alias(f"ATRr_{n_atr}"),
        roc(close, cfg.roc_length).alias(f"ROC_{cfg.roc_length}"),
        mom(close, cfg.roc_length).alias(f"MOM_{cfg.roc_length}"),
        log_close.diff()
        .rolling_std(cfg.realized_vol_window)
        .alias(f"realized_vol_{cfg.realized_vol_window}"),
        _range_position(cfg.range_window).alias(f"range_position_{cfg.range_window}"),
        ((log1p_volume - log1p_volume.rolling_mean(vz)) / log1p_volume.rolling_std(vz)).alias(
            "log1p_volume_z"
        ),
    )
    # stage 3: what is built from those
    up, down = pl.col("_rsi_up"), pl.col("_rsi_down")
    bands = bbands_from(
        close, pl.col(bb_middle), pl.col("_bb_sd"), cfg.bbands_length, cfg.bbands_std
    )
    lf = lf.with_columns(
        (pl.col(f"EMA_{fast}") - pl.col(f"EMA_{slow}")).alias(line),
        rsi_from_averages(up, down).alias(f"RSI_{cfg.rsi_length}"),
        natr_from_atr(pl.col(f"ATRr_{n_atr}"), close).alias(f"NATR_{n_atr}"),
        *[e.alias(name) for name, e in bands.items()],
    )
    lf = lf.with_columns(ema(pl.col(line), sig).alias(signal))
    lf = lf.with_columns((pl.col(line) - pl.col(signal)).alias(hist))
    # stage 4: scale-free versions for models
    return lf.with_columns(
        *[(close / pl.col(f"EMA_{n}") - 1.0).alias(f"close_over_ema_{n}") for n in cfg.ema_lengths],
        *[(close / pl.col(f"SMA_{n}") - 1.0).alias(f"close_over_sma_{n}") for n in cfg.sma_lengths],
        *[
            (pl.col(name) / close).alias(f"{kind.lower()}_over_close_{suffix}")
            for kind, name in zip(("MACD", "MACDh", "MACDs"), (line, hist, signal), strict=True)
        ],
    )


def _range_position(window: int) -> pl.Expr:
    """Where the close sits in the last `window` bars' low..high range: 0 at the low, 1 at the high."""
    lowest = pl.col("low").rolling_min(window)
    highest = pl.col("high").rolling_max(window)
    return (pl.col("close") - lowest) / (highest - lowest)


def _macro_date() -> pl.Expr:
    """Per bar of one symbol: the newest publication day whose macro values the bar may use.
    `published` is a day, and a value may come out at any time of it (H.10 at 4:15 pm ET), so
    it is known only to bars that close at or after the end of that day: a daily bar on its own
    date, an hourly bar only from the day's last hour (23:00-24:00) on, the other hours of the
    day use the day before's publications. A bar's length is the shortest step between the
    symbol's bars, at most a day (a day for a symbol of one bar)."""
    day = timedelta(days=1)
    step = pl.col("ts").diff().filter(pl.col("ts").diff() > timedelta(0)).min()
    step = pl.min_horizontal(step.fill_null(day), pl.lit(day))
    return (pl.col("ts") + step - day).dt.date()


def _hour_of_day() -> list[pl.Expr]:
    """Hour of day with minutes on the circle (constant on daily bars), per bar."""
    # seconds into the (UTC) day from the epoch: several times faster than hour() + minute()
    hour = (pl.col("ts").dt.epoch("s") % 86_400).cast(pl.Float64) / 3600.0
    return [
        (2 * math.pi * hour / 24).sin().alias("hour_sin"),
        (2 * math.pi * hour / 24).cos().alias("hour_cos"),
    ]


def _calendar(date: pl.Expr) -> list[pl.Expr]:
    """Day of week and day of year on the circle, per date (computed once per day, not per bar)."""
    dow = (date.dt.weekday() - 1).cast(pl.Float64)  # Monday = 0
    doy = (date.dt.ordinal_day() - 1).cast(pl.Float64)
    year_len = pl.when(date.dt.is_leap_year()).then(366.0).otherwise(365.0)
    return [
        (2 * math.pi * dow / 7).sin().alias("dow_sin"),
        (2 * math.pi * dow / 7).cos().alias("dow_cos"),
        (2 * math.pi * doy / year_len).sin().alias("doy_sin"),
        (2 * math.pi * doy / year_len).cos().alias("doy_cos"),
    ]


def _by_day(
    days: pl.LazyFrame, macro: pl.DataFrame, series: Sequence[str], cfg: FeatureConfig
) -> pl.LazyFrame:
    """Per bar date: the calendar features and each macro series as of that date, joined on its
    publication date (a value is used only once public, and not at all when older than
    `macro_max_staleness_days`), with its age in days since publication."""
    w = cfg.macro_change_window
    lf = days.sort("date").with_columns(_calendar(pl.col("date")))
    for name in series:
        # a missing value is no observation: it neither becomes current nor enters a change
        one = macro.filter((pl.col("series") == name) & pl.col("value").is_not_null()).sort("date")
        s = (
            one.lazy()
            .with_columns(_change_as_published(one, w).alias(f"{name}_chg_{w}"))
            .select(
                pl.col("published").alias("date"),
                pl.col("published").alias("_published"),
                pl.col("date").alias("_observed"),
                pl.col("value").alias(name),
                f"{name}_chg_{w}",
            )
            # publication order, observations of one day (a weekly release) oldest first, so
            # that the filter below keeps each day's newest for the as-of join
            .sort(["date", "_observed"])
            # an observation first published after a newer one (a value first released as
            # missing and filled in later, or a file's own `published`) is history for later
            # changes, never the series' current value
            .filter(pl.col("_observed") == pl.col("_observed").cum_max())
            .drop("_observed")
        )
        lf = lf.join_asof(
            s,
            on="date",
            strategy="backward",
            tolerance=timedelta(days=cfg.macro_max_staleness_days),
        )
        lf = lf.with_columns(
            (pl.col("date") - pl.col("_published")).dt.total_days().alias(f"{name}_age_days")
        ).drop("_published")
    return lf


def _change_as_published(one: pl.DataFrame, w: int) -> pl.Series:
    """Per observation of one macro series (rows sorted by observation date): its value minus
    the value of the `w`-th earlier observation among those published by its own publication
    date, so the change uses nothing that was not public when the row itself became public
    (null with fewer than `w` such observations). Where publication follows observation order,
    as with the next-business-day rule, that is `value - value.shift(w)`."""
    value = one["value"].cast(pl.Float64).to_numpy().astype(float)  # null -> nan
    published = one["published"].to_physical().to_numpy()
    out = np.full(len(value), np.nan)
    if w < 1 or len(value) <= w:
        return pl.Series(out).fill_nan(None)
    # rows whose `w` previous observations were all published by their own date: a plain shift
    window = np.lib.stride_tricks.sliding_window_view(published[:-1], w).max(axis=1)
    in_order = window <= published[w:]
    out[w:] = np.where(in_order, value[w:] - value[:-w], np.nan)
    for row in np.flatnonzero(~in_order) + w:  # rare: walk back over the public ones
        public = np.flatnonzero(published[:row] <= published[row])
        if len(public) >= w:
            out[row] = value[row] - value[public[-w]]
    return pl.Series(out).fill_nan(None)


def _onchain_by_day(
    onchain: pl.DataFrame, bar_days: pl.DataFrame, cfg: FeatureConfig
) -> pl.DataFrame:
    """On-chain features per (symbol, bar date). Daily totals for day d are complete at the end
    of d: bar d uses day d-1's row, or the newest earlier row up to `onchain_max_staleness_days`
    older (a source that lags the price), with its age in days since it was complete.

    Rolling windows count rows, one per day of the on-chain table.
    """
    by = "asset"
    difficulty, hash_rate = pl.col("difficulty"), pl.col("hash_rate")
    active, tx = pl.col("active_addresses"), pl.col("tx_count")
    ribbon = [difficulty.rolling_mean(n).over(by) for n in DIFFICULTY_RIBBON_DAYS]
    g = cfg.activity_growth_days
    values = [
        *[f"difficulty_sma_{n}" for n in DIFFICULTY_RIBBON_DAYS],
        *onchain_feature_columns(cfg),
    ]

    def growth(x: pl.Expr) -> pl.Expr:
        # a 7-day mean first, so the weekly cycle of activity does not show up as growth
        weekly = x.rolling_mean(7).over(by)
        return (weekly / weekly.shift(g).over(by)).log()

    rows = (
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
            (pl.col("date") + pl.duration(days=1)).alias("_complete"),
            (pl.col(by) + "-USD").alias("symbol"),
        )
        .select("symbol", "_complete", *values)
        .collect()
    )
    parts = []
    # one as-of join per symbol: few symbols have on-chain data, and a join without `by`
    # can check that both sides are sorted
    for (symbol,), right in rows.partition_by("symbol", as_dict=True, maintain_order=True).items():
        left = bar_days.filter(pl.col("symbol") == symbol).sort("date")
        parts.append(
            left.join_asof(
                right.drop("symbol").sort("_complete"),
                left_on="date",
                right_on="_complete",
                strategy="backward",
                tolerance=timedelta(days=cfg.onchain_max_staleness_days),
            )
        )
    if not parts:  # no on-chain rows: the columns exist, all null
        parts = [bar_days.head(0).join(rows.drop("symbol"), how="cross")]
    return pl.concat(parts).select(
        "symbol",
        "date",
        *values,
        (pl.col("date") - pl.col("_complete")).dt.total_days().alias(ONCHAIN_AGE_COLUMN),
    )
