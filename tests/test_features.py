import warnings
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.features import (
    MACRO_SERIES,
    FeatureConfig,
    compute_features,
    macro_series_of,
    model_feature_columns,
    onchain_feature_columns,
    onchain_symbols_of,
    select_model_columns,
)
from tests.conftest import NO_SHARED_DATA, SHARED_DATA
from warehouse.schema import MACRO, ONCHAIN
from warehouse.sources import make_source

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pandas_ta_classic as ta


@pytest.fixture(scope="module")
def feats(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    return compute_features(synthetic_ohlcv, synthetic_onchain, synthetic_macro)


def _pandas_ta_reference(bars) -> dict:
    """Every indicator we share with pandas-ta-classic, computed by pandas-ta-classic."""
    close, high, low = (bars[c].to_pandas() for c in ("close", "high", "low"))
    return {
        **{f"EMA_{n}": ta.ema(close, n) for n in (12, 26, 50)},
        **{f"SMA_{n}": ta.sma(close, n) for n in (10, 20, 50)},
        "RSI_14": ta.rsi(close, 14),
        **ta.macd(close, 12, 26, 9).to_dict("series"),
        **ta.bbands(close, 20, 2.0).to_dict("series"),
        "ATRr_14": ta.atr(high, low, close, 14),
        "NATR_14": ta.natr(high, low, close, 14),
        "ROC_10": ta.roc(close, 10),
        "MOM_10": ta.mom(close, 10),
    }


def _assert_matches_after_warm_up(got: pl.Series, ref, close: pl.Series, name: str) -> None:
    """Same nulls as pandas-ta, then equal to rtol 1e-9.

    MACD, its histogram and MOM are differences of price-level terms that cross zero, where
    rtol alone fails on rounding; for them an atol of 1e-12 of the largest close (about 1e-13
    in price units here, the float64 rounding of the terms) is allowed as well.
    """
    ref = ref.to_numpy()
    got = got.to_numpy().astype(float)
    assert np.array_equal(np.isnan(ref), np.isnan(got)), f"{name}: warm-up length differs"
    atol = 1e-12 * close.max() if name.startswith(("MACD", "MOM")) else 0.0
    np.testing.assert_allclose(
        got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-9, atol=atol, err_msg=name
    )


@pytest.mark.parametrize("symbol", ["BTC-USD", "ACME"])
def test_indicators_match_pandas_ta_classic(feats, synthetic_ohlcv, symbol):
    bars = synthetic_ohlcv.filter(pl.col("symbol") == symbol).sort("ts")
    ours = feats.filter(pl.col("symbol") == symbol).sort("ts")
    reference = _pandas_ta_reference(bars)
    assert len(reference) == 19
    for name, ref in reference.items():
        assert ref.name == name, f"pandas-ta calls it {ref.name}, we call it {name}"
        _assert_matches_after_warm_up(ours[name], ref, bars["close"], name)


# --- bars with high == low: pandas-ta's zero-range branch -------------------------------------

FLAT_START = 40  # the first 40 bars flat: RSI's seed has no gain and no loss (0 / 0)
EXACT_FLAT_PRICE = 4000.0  # a flat window numpy's variance gets exactly 0 for
INEXACT_FLAT_PRICE = 2205.4315846393924  # one it leaves a rounding residual for (2e-25)


def _zero_range_reference(bars) -> dict:
    """`_pandas_ta_reference`, with the 20-bar range position as pandas-ta's Williams %R has
    it (range_position = WILLR / 100 + 1: no zero-range branch, 0 / 0 on a flat window)."""
    close, high, low = (bars[c].to_pandas() for c in ("close", "high", "low"))
    return {
        **_pandas_ta_reference(bars),
        "range_position_20": ta.willr(high, low, close, 20) / 100 + 1,
    }


def _flat_windows(bars, length: int = 20) -> np.ndarray:
    """Rows whose last `length` closes are all equal: the Bollinger bands have zero width."""
    close = bars["close"]
    return (close.rolling_max(length) == close.rolling_min(length)).fill_null(False).to_numpy()


def _assert_matches_with_zero_ranges(got, ref, warm_up, bars, name) -> None:
    """Equal to pandas-ta-classic on bars with zero ranges, missing values included.

    Ours is null in the warm-up (the leading values pandas-ta has no value for on ordinary
    bars) and nowhere after it; an undefined value after the warm-up (0 / 0: RSI over a flat
    seed, the range position of a flat window) is NaN where pandas-ta has NaN, infinities are
    where pandas-ta has them. %B of a flat window (zero-width bands) is 0.5, the close on the
    middle band: pandas-ta gives 0.5 where numpy's rolling variance leaves a rounding residual
    (an ulp-sized standard deviation, the close then sits halfway between bands an ulp apart)
    and 1 (its zero-range branch, eps / eps) where that variance is exactly 0. The bandwidth of such bands is 0 up to that
    residual (1e-13 percent), hence an atol for BBB.
    """
    ref = np.asarray(ref, dtype=float)
    values = got.to_numpy().astype(float)  # null -> NaN
    assert got[:warm_up].is_null().all(), f"{name}: not null in the warm-up"
    assert got[warm_up:].null_count() == 0, f"{name}: null after the warm-up"
    assert np.array_equal(np.isnan(ref), np.isnan(values)), f"{name}: NaN rows differ"
    for inf in (np.inf, -np.inf):
        assert np.array_equal(ref == inf, values == inf), f"{name}: {inf} rows differ"
    compared = np.isfinite(ref)
    if name.startswith("BBP"):
        flat = _flat_windows(bars)
        assert (values[flat] == 0.5).all(), f"{name} of a flat window: {set(values[flat])}"
        assert np.isin(ref[flat], (0.5, 1.0)).all(), f"pandas-ta {name}: {set(ref[flat])}"
        compared &= ~flat
    atol = 0.0
    if name.startswith(("MACD", "MOM")):  # as in _assert_matches_after_warm_up
        atol = 1e-12 * bars["close"].max()
    elif name.startswith(("BBB", "range_position")):  # percent of the price, 0..1
        atol = 1e-12
    np.testing.assert_allclose(values[compared], ref[compared], rtol=1e-9, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def warm_ups(synthetic_ohlcv) -> dict[str, int]:
    """Each indicator's warm-up: the leading bars pandas-ta has no value for on ordinary bars."""
    bars = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD").sort("ts").head(300)
    return {
        name: int(np.argmax(~np.isnan(np.asarray(ref, dtype=float))))
        for name, ref in _zero_range_reference(bars).items()
    }


def _plant_flat_bars(bars: pl.DataFrame) -> pl.DataFrame:
    """`bars` with flat bars (open = high = low = close) planted: a flat start, single flat
    bars (gapping from the previous close, at the previous close, at the bar's open) and two
    runs of 30 flat bars, each making whole 20-bar (and 14-bar) windows zero-range."""
    close, open_ = bars["close"].to_list(), bars["open"].to_list()
    flat = dict.fromkeys(range(FLAT_START), close[0])
    flat |= {60: close[60], 61: close[60], 100: open_[100]}
    flat |= dict.fromkeys(range(150, 180), EXACT_FLAT_PRICE)
    flat |= dict.fromkeys(range(250, 280), INEXACT_FLAT_PRICE)
    price = pl.Series(list(flat.values()), dtype=pl.Float64)
    planted = pl.DataFrame(
        {"_row": list(flat), "_flat": price}, schema_overrides={"_row": pl.UInt32}
    )
    return (
        bars.with_row_index("_row")
        .join(planted, on="_row", how="left")
        .with_columns([pl.coalesce("_flat", c).alias(c) for c in ("open", "high", "low", "close")])
        .drop("_row", "_flat")
    )


def test_indicators_match_pandas_ta_classic_on_bars_with_high_equal_to_low(
    synthetic_ohlcv, warm_ups
):
    ordinary = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD").sort("ts").head(400)
    bars = _plant_flat_bars(ordinary)
    flat_bar = (bars["high"] == bars["low"]).to_numpy()
    assert flat_bar.sum() == FLAT_START + 3 + 60 and not (ordinary["high"] == ordinary["low"]).any()
    empty_onchain, empty_macro = (pl.DataFrame(schema=t.columns) for t in (ONCHAIN, MACRO))
    ours = compute_features(bars, empty_onchain, empty_macro)
    reference = _zero_range_reference(bars)
    assert len(reference) == 20
    for name, ref in reference.items():
        _assert_matches_with_zero_ranges(ours[name], ref, warm_ups[name], bars, name)

    # the planted bars reach each zero-range branch
    rsi = reference["RSI_14"].to_numpy()
    assert np.isnan(rsi[:FLAT_START]).all() and not np.isnan(rsi[FLAT_START:]).any()
    assert ours["RSI_14"][14:FLAT_START].is_nan().all()  # 0 / 0, after the warm-up
    eps = np.finfo(float).eps
    assert ours["ATRr_14"][14:FLAT_START].to_numpy() == pytest.approx(eps)  # true range eps
    bbp = reference["BBP_20_2.0"].to_numpy()
    assert (bbp[169:180] == 1.0).all() and (bbp[269:280] == 0.5).all()  # pandas-ta's two
    assert (ours["BBP_20_2.0"].to_numpy()[[*range(169, 180), *range(269, 280)]] == 0.5).all()
    flat = _flat_windows(bars)
    assert flat.sum() == (FLAT_START - 19) + 11 + 11
    assert np.array_equal(
        ours["range_position_20"].is_nan().fill_null(False).to_numpy(), flat
    )  # 0 / 0


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED_DATA)
@pytest.mark.parametrize(
    ("name", "symbol", "flat_bars", "flat_windows"),
    [
        ("btc_usd_1h_bitstamp.csv", "BTC-USD", 6, 0),
        ("btc_usdt_1h_binance.csv", "BTC-USDT", 118, 15),
    ],
)
def test_indicators_match_pandas_ta_classic_on_the_real_hourly_files(
    warm_ups, name, symbol, flat_bars, flat_windows
):
    """The real hourly files have bars with high == low (Binance's a 34-hour flat run, whose
    %B was +-4096 before flat windows took pandas-ta's zero-range branch)."""
    src = make_source("ohlcv", "file", path=str(SHARED_DATA / name), symbols=(symbol,))
    bars = src.fetch(datetime(2000, 1, 1), datetime(2030, 1, 1)).sort("ts")
    assert (bars["high"] == bars["low"]).sum() == flat_bars
    assert _flat_windows(bars).sum() == flat_windows
    empty_onchain, empty_macro = (pl.DataFrame(schema=t.columns) for t in (ONCHAIN, MACRO))
    ours = compute_features(bars, empty_onchain, empty_macro)
    for ind, ref in _zero_range_reference(bars).items():
        _assert_matches_with_zero_ranges(ours[ind], ref, warm_ups[ind], bars, ind)


def test_intraday_indicators_match_pandas_ta_classic_and_hour_is_cyclical():
    bars = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1m").fetch(
        datetime(2021, 1, 1), datetime(2021, 1, 2)
    )
    empty_onchain, empty_macro = (pl.DataFrame(schema=t.columns) for t in (ONCHAIN, MACRO))
    ours = compute_features(bars, empty_onchain, empty_macro)
    assert ours.height == 1440
    for name, ref in _pandas_ta_reference(bars).items():
        _assert_matches_after_warm_up(ours[name], ref, bars["close"], name)
    six_thirty = ours.filter((pl.col("ts").dt.hour() == 6) & (pl.col("ts").dt.minute() == 30))
    angle = 2 * np.pi * 6.5 / 24
    assert six_thirty["hour_sin"][0] == pytest.approx(np.sin(angle))
    assert six_thirty["hour_cos"][0] == pytest.approx(np.cos(angle))
    assert ours["fees_per_tx"].null_count() == ours.height


def test_scale_free_price_features(feats, synthetic_ohlcv):
    btc = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD").sort("ts")
    got = feats.filter(pl.col("symbol") == "BTC-USD").sort("ts")
    t = 400
    lo, hi = btc["low"][t - 19 : t + 1].min(), btc["high"][t - 19 : t + 1].max()
    assert got["range_position_20"][t] == pytest.approx((btc["close"][t] - lo) / (hi - lo))
    assert got["range_position_20"][:19].null_count() == 19
    assert got["range_position_20"].drop_nulls().is_between(0.0, 1.0).all()
    log_ret = np.diff(np.log(btc["close"].to_numpy()))
    assert got["realized_vol_30"][t] == pytest.approx(np.std(log_ret[t - 30 : t], ddof=1))
    assert got["close_over_sma_20"][t] == pytest.approx(btc["close"][t] / got["SMA_20"][t] - 1)
    price_levels = {"close", "log_close", "EMA_12", "SMA_20", "BBM_20_2.0", "ATRr_14", "MOM_10"}
    assert not price_levels & set(model_feature_columns(FeatureConfig()))


def test_onchain_ratios_and_difficulty_ribbon(feats, synthetic_onchain):
    oc = synthetic_onchain.sort("date")
    btc = feats.filter(pl.col("symbol") == "BTC-USD")
    d = date(2019, 6, 10)
    row = btc.filter(pl.col("ts").dt.date() == d)
    i = oc["date"].to_list().index(date(2019, 6, 9))
    ribbon = [oc["difficulty"][i - n + 1 : i + 1].mean() for n in (9, 14, 25, 40, 60, 90, 128, 200)]
    assert row["difficulty_sma_9"][0] == pytest.approx(ribbon[0])
    assert row["difficulty_ratio_9_200"][0] == pytest.approx(ribbon[0] / ribbon[-1])
    assert row["difficulty_ribbon_compression"][0] == pytest.approx(
        np.std(ribbon) / np.mean(ribbon)
    )
    prev = oc[i]
    assert row["fees_per_active_address"][0] == pytest.approx(
        prev["fees_native"][0] / prev["active_addresses"][0]
    )
    assert row["tx_per_active_address"][0] == pytest.approx(
        prev["tx_count"][0] / prev["active_addresses"][0]
    )
    weekly = oc["active_addresses"].rolling_mean(7)
    assert row["active_addresses_growth_30"][0] == pytest.approx(np.log(weekly[i] / weekly[i - 30]))


TRUNCATION_CUTS = (datetime(2018, 6, 30), datetime(2020, 1, 15))


def _known_before(cut: datetime, ohlcv, onchain, macro):
    """The raw data as known before `cut`: bars opened before it, macro values published before
    its day, and on-chain days whose totals were complete before the last bar kept: day d's
    totals are known only when d is over and feed bar d + 1, so the bar of the day before the
    cut (the last one kept) must not see the totals of its own day (date + 1 < the cut's day)."""
    day = cut.date()
    return (
        ohlcv.filter(pl.col("ts") < cut),
        onchain.filter(pl.col("date") + pl.duration(days=1) < day),
        macro.filter(pl.col("published") < day),
    )


def _changed_by_truncation(compute, ohlcv, onchain, macro) -> list[datetime]:
    """The cuts at which the features of the rows before the cut change when the raw data is
    cut there."""
    cols = ["symbol", "ts", *model_feature_columns(FeatureConfig())]
    full = compute(ohlcv, onchain, macro)
    changed = []
    for cut in TRUNCATION_CUTS:
        truncated = compute(*_known_before(cut, ohlcv, onchain, macro)).select(cols)
        if not truncated.equals(full.filter(pl.col("ts") < cut).select(cols)):
            changed.append(cut)
    return changed


def test_features_do_not_change_when_future_rows_are_removed(
    synthetic_ohlcv, synthetic_onchain, synthetic_macro
):
    changed = _changed_by_truncation(
        compute_features, synthetic_ohlcv, synthetic_onchain, synthetic_macro
    )
    assert not changed, f"features before {changed} depend on later data"


def test_the_truncation_cut_sees_a_same_day_onchain_total(
    synthetic_ohlcv, synthetic_onchain, synthetic_macro
):
    """The cut above is tight enough for the on-chain rule: features that use day d's totals at
    bar d (every on-chain row moved a day earlier) change at every cut. With the totals of the
    cut's own day kept (`date <= day`), this leak went unseen (issue 15, finding 2)."""

    def same_day(o, c, m):
        return compute_features(o, c.with_columns(date=pl.col("date") - pl.duration(days=1)), m)

    changed = _changed_by_truncation(same_day, synthetic_ohlcv, synthetic_onchain, synthetic_macro)
    assert changed == list(TRUNCATION_CUTS)


def test_macro_values_are_used_only_once_published(
    synthetic_ohlcv, synthetic_onchain, synthetic_macro, feats
):
    btc = feats.filter(pl.col("symbol") == "BTC-USD")
    dgs10 = synthetic_macro.filter(pl.col("series") == "DGS10")
    # Tuesday's bar sees Monday's value (published Tuesday), never Tuesday's own observation
    tue = date(2019, 3, 5)
    row = btc.filter(pl.col("ts").dt.date() == tue)
    assert row["DGS10"][0] == dgs10.filter(pl.col("date") == date(2019, 3, 4))["value"][0]
    # Monday's bar sees Friday's value (published Saturday)
    mon = btc.filter(pl.col("ts").dt.date() == date(2019, 3, 4))
    assert mon["DGS10"][0] == dgs10.filter(pl.col("date") == date(2019, 3, 1))["value"][0]


def test_onchain_totals_join_from_the_previous_day(feats, synthetic_onchain):
    btc = feats.filter(pl.col("symbol") == "BTC-USD")
    d = date(2019, 6, 10)
    prev = synthetic_onchain.filter(pl.col("date") == date(2019, 6, 9))
    expected = prev["fees_native"][0] / prev["tx_count"][0]
    assert btc.filter(pl.col("ts").dt.date() == d)["fees_per_tx"][0] == pytest.approx(expected)
    assert (
        feats.filter(pl.col("symbol") == "ACME")["fees_per_tx"].null_count()
        == feats.filter(pl.col("symbol") == "ACME").height
    )


def test_log_returns_and_cyclical_time(feats, synthetic_ohlcv):
    btc = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD").sort("ts")
    got = feats.filter(pl.col("symbol") == "BTC-USD").sort("ts")
    lc = np.log(btc["close"].to_numpy())
    np.testing.assert_allclose(got["log_ret_5"].to_numpy()[5:], lc[5:] - lc[:-5])
    assert got["log_ret_5"][:5].null_count() == 5
    assert np.allclose(got["dow_sin"] ** 2 + got["dow_cos"] ** 2, 1.0)
    monday = got.filter(pl.col("ts").dt.weekday() == 1)
    assert np.allclose(monday["dow_sin"], 0.0) and np.allclose(monday["dow_cos"], 1.0)


def test_rsi_stays_within_0_and_100(feats):
    rsi = feats["RSI_14"].drop_nulls()
    assert rsi.min() >= 0 and rsi.max() <= 100


def test_feature_version_follows_parameters_and_definitions(monkeypatch):
    import ml.features

    base = FeatureConfig().version()
    assert FeatureConfig().version() == base  # stable
    assert FeatureConfig(rsi_length=21).version() != base
    assert FeatureConfig(ema_lengths=(12, 26)).version() != base
    # a changed definition comes with a bumped FEATURES_CODE_VERSION, which changes the version
    monkeypatch.setattr(ml.features, "FEATURES_CODE_VERSION", "next")
    assert FeatureConfig().version() != base


# --- the feature set follows the inputs; carried values and their age ------------------------


def test_default_synthetic_sources_keep_the_model_columns_as_before(
    feats, synthetic_onchain, synthetic_macro
):
    cfg = FeatureConfig()
    assert macro_series_of(synthetic_macro) == MACRO_SERIES
    assert onchain_symbols_of(synthetic_onchain) == ["BTC-USD"]
    chosen = select_model_columns(feats, cfg, MACRO_SERIES, ["BTC-USD"])
    assert chosen.dropped == []
    assert chosen.columns == model_feature_columns(cfg)
    assert len(chosen.columns) == 44  # as before the ragged-edge rule
    assert chosen.columns[-16:] == [
        *[c for s in MACRO_SERIES for c in (s, f"{s}_chg_5")],
        *onchain_feature_columns(cfg),
    ]
    assert chosen.onchain_columns == onchain_feature_columns(cfg)
    assert chosen.carried_columns == chosen.columns[-16:]


def test_macro_columns_follow_the_series_present(synthetic_ohlcv, synthetic_onchain):
    macro = make_source("macro", "synthetic", series=("DGS2", "DGS10")).fetch(
        datetime(2015, 10, 1), datetime(2022, 1, 1)
    )
    extra = macro.filter(pl.col("series") == "DGS2").with_columns(series=pl.lit("VIXCLS"))
    macro = pl.concat([macro, extra])
    assert macro_series_of(macro) == ("DGS10", "DGS2", "VIXCLS")  # known order, then sorted
    got = compute_features(
        synthetic_ohlcv.filter(pl.col("symbol") == "ACME"), synthetic_onchain, macro
    )
    macro_cols = [c for c in got.columns if c.split("_")[0] in (*MACRO_SERIES, "VIXCLS")]
    assert macro_cols == [
        "DGS10",
        "DGS10_chg_5",
        "DGS2",
        "DGS2_chg_5",
        "VIXCLS",
        "VIXCLS_chg_5",
        "DGS10_age_days",
        "DGS2_age_days",
        "VIXCLS_age_days",
    ]
    assert got["VIXCLS"].equals(got["DGS2"], check_names=False)


def test_a_macro_series_named_like_a_feature_column_is_rejected(synthetic_ohlcv, synthetic_onchain):
    macro = pl.DataFrame(
        {"series": ["RSI_14"], "date": [date(2020, 1, 2)], "value": [1.0]},
    ).with_columns(published=pl.col("date"))
    with pytest.raises(ValueError, match=r"Macro series \['RSI_14'\] have the name"):
        compute_features(synthetic_ohlcv, synthetic_onchain, macro)


def test_macro_age_counts_days_since_publication_up_to_the_limit(synthetic_onchain):
    bars = make_source("ohlcv", "synthetic", symbols=("BTC-USD",)).fetch(
        datetime(2020, 1, 1), datetime(2020, 2, 1)
    )
    # a weekly release: Monday 6 January publishes the five observations of the week before
    week = [date(2019, 12, 30) + timedelta(days=i) for i in range(5)]
    macro = pl.DataFrame(
        {"series": "X", "date": week, "value": [1.0, 2.0, 3.0, 4.0, 5.0]}
    ).with_columns(published=pl.lit(date(2020, 1, 6)))
    got = compute_features(bars, synthetic_onchain, macro).with_columns(day=pl.col("ts").dt.date())
    by_day = {r["day"]: (r["X"], r["X_age_days"]) for r in got.iter_rows(named=True)}
    assert by_day[date(2020, 1, 5)] == (None, None)  # not published yet
    assert by_day[date(2020, 1, 6)] == (5.0, 0)  # the newest observation of the release
    assert by_day[date(2020, 1, 16)] == (5.0, 10)  # carried up to the 10-day limit
    assert by_day[date(2020, 1, 17)] == (None, None)


def test_a_missing_on_chain_day_is_carried_a_long_hole_is_not(synthetic_ohlcv, synthetic_onchain):
    bars = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD")
    holes = synthetic_onchain.filter(
        (pl.col("date") != date(2019, 6, 9))
        & ~pl.col("date").is_between(date(2020, 3, 1), date(2020, 3, 10))
    )
    got = compute_features(bars, holes, pl.DataFrame(schema=MACRO.columns))
    day = {r["ts"].date(): r for r in got.iter_rows(named=True)}
    before = synthetic_onchain.filter(pl.col("date") == date(2019, 6, 8)).row(0, named=True)
    assert day[date(2019, 6, 10)]["onchain_age_days"] == 1
    assert day[date(2019, 6, 10)]["fees_per_tx"] == pytest.approx(
        before["fees_native"] / before["tx_count"]
    )
    # 29 February's row is complete on 1 March: carried to bars up to 4 March, then missing
    assert day[date(2020, 3, 4)]["onchain_age_days"] == 3
    assert day[date(2020, 3, 5)]["fees_per_tx"] is None
    assert day[date(2020, 3, 5)]["onchain_age_days"] is None
