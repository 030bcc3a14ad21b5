import functools
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from ml.features import compute_features
from ml.labels import LabelConfig, compute_labels
from tests.conftest import SHARED_DATA
from warehouse.schema import MACRO, OHLCV, ONCHAIN, conform
from warehouse.sources import SourceError, make_source
from warehouse.sources.synthetic import (
    BTC_SHOCKS,
    HORIZON_END,
    ORIGIN,
    PLANTED_C_OBS,
    PLANTED_PHI,
    RETARGET_DAYS,
    SyntheticMarket,
    _skewed_t,
    _soft_limit,
)


def test_same_seed_gives_same_history_and_other_seed_differs():
    a = SyntheticMarket(7).ohlcv("BTC-USD")
    b = SyntheticMarket(7).ohlcv("BTC-USD")
    c = SyntheticMarket(8).ohlcv("BTC-USD")
    assert a.equals(b)
    assert not a["close"].equals(c["close"])


def test_a_window_equals_the_slice_of_a_larger_window():
    src = make_source("ohlcv", "synthetic")
    big = src.fetch(datetime(2018, 1, 1), datetime(2019, 1, 1))
    small = src.fetch(datetime(2018, 3, 1), datetime(2018, 3, 8))
    cut = big.filter((pl.col("ts") >= datetime(2018, 3, 1)) & (pl.col("ts") < datetime(2018, 3, 8)))
    assert small.equals(cut)
    assert small.height == 7 + 5 + 5  # crypto every day, two stocks on business days


def test_output_matches_declared_schemas(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    assert conform(synthetic_ohlcv, OHLCV, "synthetic").height == synthetic_ohlcv.height
    assert conform(synthetic_onchain, ONCHAIN, "synthetic").height == synthetic_onchain.height
    assert conform(synthetic_macro, MACRO, "synthetic").height == synthetic_macro.height


def test_prices_have_fat_tails_and_volatility_clustering(synthetic_ohlcv):
    btc = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD")["close"].to_numpy()
    r = np.diff(np.log(btc))
    kurtosis = ((r - r.mean()) ** 4).mean() / r.var() ** 2
    abs_autocorr = np.corrcoef(np.abs(r[1:]), np.abs(r[:-1]))[0, 1]
    raw_autocorr = np.corrcoef(r[1:], r[:-1])[0, 1]
    assert kurtosis > 5
    assert abs_autocorr > 0.1
    assert abs(raw_autocorr) < abs_autocorr


def test_ohlc_is_consistent_and_prices_positive(synthetic_ohlcv):
    df = synthetic_ohlcv
    assert (df["low"] > 0).all()
    assert (df["high"] >= df[["open", "close"]].max_horizontal()).all()
    assert (df["low"] <= df[["open", "close"]].min_horizontal()).all()
    assert (df["volume"] >= 0).all()


def test_stocks_trade_on_business_days_and_crypto_every_day(synthetic_ohlcv):
    weekday = synthetic_ohlcv.with_columns(wd=pl.col("ts").dt.weekday())
    stocks = weekday.filter(pl.col("symbol") != "BTC-USD")
    assert stocks["wd"].max() <= 5
    btc = weekday.filter(pl.col("symbol") == "BTC-USD")
    assert set(btc["wd"].unique().to_list()) == set(range(1, 8))
    # stocks gap overnight: opens differ from the previous close
    acme = stocks.filter(pl.col("symbol") == "ACME")
    assert (acme["open"][1:] != acme["close"][:-1]).mean() > 0.9


def test_difficulty_retargets_every_two_weeks_and_follows_hash_rate(synthetic_onchain):
    diff = synthetic_onchain["difficulty"].to_numpy()
    changes = np.flatnonzero(np.diff(diff) != 0) + 1
    assert len(changes) > 100
    assert set(np.diff(changes)) == {RETARGET_DAYS}
    hr = synthetic_onchain["hash_rate"].to_numpy()
    assert np.corrcoef(np.log(diff), np.log(hr))[0, 1] > 0.9


def test_onchain_activity_is_coupled_to_price(synthetic_ohlcv, synthetic_onchain):
    btc = synthetic_ohlcv.filter(pl.col("symbol") == "BTC-USD")
    log_px = np.log(btc["close"].to_numpy())
    log_aa = np.log(synthetic_onchain["active_addresses"].to_numpy())
    assert np.corrcoef(log_px, log_aa)[0, 1] > 0.5
    assert (np.diff(synthetic_onchain["utxo_count"].to_numpy()) >= 0).mean() > 0.95


def test_macro_is_published_one_day_after_observation_and_spread_is_consistent(synthetic_macro):
    assert (
        synthetic_macro["published"] - synthetic_macro["date"]
    ).dt.total_days().unique().to_list() == [1]
    assert synthetic_macro["date"].dt.weekday().max() <= 5
    wide = synthetic_macro.pivot(on="series", index="date", values="value")
    assert np.allclose(wide["T10Y2Y"], wide["DGS10"] - wide["DGS2"], atol=0.011)


@pytest.mark.parametrize(
    ("table", "options", "message"),
    [
        ("ohlcv", {"symbols": ("BTC-USD", "DOGE-XYZ")}, "Unknown symbols ['DOGE-XYZ']"),
        ("onchain", {"assets": ("ETH",)}, "Unknown on-chain assets ['ETH']"),
        ("macro", {"series": ("CPI",)}, "Unknown macro series ['CPI']"),
        ("ohlcv", {"seed": -1}, "non-negative integer"),
        ("ohlcv", {"symbols": ()}, "No symbols given for source 'synthetic'; choose from ["),
        ("macro", {"series": ("DGS10", "DGS10")}, "Duplicate macro series in ['DGS10', 'DGS10']"),
        ("ohlcv", {"timeframe": "5m"}, "Unsupported timeframe '5m' for source 'synthetic'"),
    ],
)
def test_bad_options_fail_with_a_message_naming_the_input(table, options, message):
    with pytest.raises(SourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_source(table, "synthetic", **options)


def test_a_lone_symbol_string_counts_as_one_symbol():
    assert make_source("ohlcv", "synthetic", symbols="ACME").entities == ("ACME",)


def test_unknown_source_name_lists_the_available_ones():
    with pytest.raises(
        SourceError, match=r"Unknown ohlcv source 'bloomberg'; available: \[.*'synthetic'"
    ):
        make_source("ohlcv", "bloomberg")


def test_windows_past_the_generated_horizon_are_refused_and_before_it_are_empty():
    src = make_source("macro", "synthetic")
    with pytest.raises(SourceError, match="covers"):
        src.fetch(datetime(2040, 12, 1), datetime(2041, 2, 1))
    assert src.fetch(datetime(2005, 1, 1), datetime(2005, 2, 1)).height == 0
    before = src.fetch(datetime(2011, 1, 1), datetime(2012, 2, 1))
    assert before.height and before["date"].min() >= ORIGIN
    with pytest.raises(SourceError, match="not before"):
        src.fetch(datetime(2020, 2, 1), datetime(2020, 1, 1))


# --- BTC-USD calibrated to the real daily series ---------------------------------------------
# Measured on ../shared/data/btc_usd_daily_bitstamp.csv (Bitstamp BTC/USD UTC day candles): the
# 3,834 daily log returns of 2015-01-01..2025-06-30 (closes of 2014-12-31..2025-06-30).
# Annualized volatility sqrt(365) * std; skew and excess kurtosis from the biased central
# moments (scipy.stats' defaults); ACF(x, k) = Pearson correlation of x_t with x_{t-k}.
# `test_real_btc_figures_are_those_of_the_shared_file` recomputes them when the file is there.
REAL_BTC = {
    "ann_vol": 0.6999,
    "skew": -0.7993,
    "excess_kurtosis": 13.086,
    "max_up": 0.23840,  # 2017-07-20
    "max_down": -0.49397,  # 2020-03-12
    "acf_abs": (0.211, 0.169, 0.088),  # lags 1, 5, 20
    "acf_ret_1": -0.049,
}
ACF_LAGS = (1, 5, 20)
STATS_WINDOW = (datetime(2014, 12, 31), datetime(2025, 7, 1))  # closes; returns from 2015-01-01


def _daily_stats(closes: np.ndarray) -> dict:
    r = np.diff(np.log(closes))
    d = r - r.mean()
    m2 = (d**2).mean()
    a = np.abs(r)

    def acf(x, k):
        return np.corrcoef(x[k:], x[:-k])[0, 1]

    return {
        "n": len(r),
        "ann_vol": np.sqrt(365) * r.std(ddof=1),
        "skew": (d**3).mean() / m2**1.5,
        "excess_kurtosis": (d**4).mean() / m2**2 - 3,
        "max_up": r.max(),
        "max_down": r.min(),
        "acf_abs": tuple(acf(a, k) for k in ACF_LAGS),
        "acf_ret_1": acf(r, 1),
    }


def _synthetic_btc_stats(seed: int, planted: float = 0.0) -> dict:
    btc = SyntheticMarket(seed, planted).ohlcv("BTC-USD")
    lo, hi = STATS_WINDOW
    return _daily_stats(btc.filter(pl.col("ts").is_between(lo, hi, closed="left"))["close"])


def test_synthetic_btc_matches_the_real_daily_statistics():
    s = _synthetic_btc_stats(42)
    assert s["n"] == 3834
    assert abs(s["ann_vol"] / REAL_BTC["ann_vol"] - 1) < 0.25
    assert s["skew"] < 0
    assert (
        0.5 * REAL_BTC["excess_kurtosis"] <= s["excess_kurtosis"] <= 2 * REAL_BTC["excess_kurtosis"]
    )
    # no day beyond the real records: a +67% day (the former generator's) wipes out any short
    assert REAL_BTC["max_down"] <= s["max_down"] and s["max_up"] <= REAL_BTC["max_up"]
    # volatility clustering: |r| as persistent as the real one at a day, a week and a month
    for got, real in zip(s["acf_abs"], REAL_BTC["acf_abs"], strict=True):
        assert abs(got - real) < 0.07, (s["acf_abs"], REAL_BTC["acf_abs"])
    assert abs(s["acf_ret_1"]) < 0.1  # returns themselves barely autocorrelate


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
def test_other_seeds_keep_the_shape_and_the_limits(seed):
    s = _synthetic_btc_stats(seed)
    assert s["skew"] < 0
    assert s["excess_kurtosis"] > 3  # fat tails
    assert abs(s["ann_vol"] / REAL_BTC["ann_vol"] - 1) < 0.35
    assert s["acf_abs"][0] > 0.1
    # the soft limit holds on every day of the whole path, not only in the window measured
    r = np.diff(np.log(SyntheticMarket(seed).ohlcv("BTC-USD")["close"].to_numpy()))
    assert REAL_BTC["max_down"] < r.min() and r.max() < REAL_BTC["max_up"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_btc_figures_are_those_of_the_shared_file():
    real = pl.read_csv(SHARED_DATA / "btc_usd_daily_bitstamp.csv", try_parse_dates=True)
    lo, hi = (d.date() for d in STATS_WINDOW)
    s = _daily_stats(real.filter(pl.col("date").is_between(lo, hi, closed="left"))["close"])
    assert s["n"] == 3834
    for key in ("ann_vol", "skew", "excess_kurtosis", "max_up", "max_down", "acf_ret_1"):
        assert s[key] == pytest.approx(REAL_BTC[key], abs=1e-3), key
    assert s["acf_abs"] == pytest.approx(REAL_BTC["acf_abs"], abs=1e-3)


def test_soft_limit_keeps_ordinary_moves_and_saturates_below_the_limit():
    m = BTC_SHOCKS
    assert _soft_limit(0.1, m.knee_up, m.limit_up) == 0.1
    assert _soft_limit(-3.0, m.knee_up, m.limit_up) == -3.0  # only the upper side is limited
    big = [_soft_limit(x, m.knee_up, m.limit_up) for x in (0.15, 0.3, 1.0, 10.0)]
    assert all(np.diff(big) >= 0) and big[0] < big[1] < big[2] < m.limit_up
    assert max(big) <= m.limit_up  # tanh rounds to 1 in floating point far out
    assert m.limit_up < REAL_BTC["max_up"] and m.limit_down < -REAL_BTC["max_down"]


def test_skewed_t_shocks_have_zero_mean_unit_variance_and_a_longer_left_tail():
    z = _skewed_t(np.random.default_rng(0), 400_000, BTC_SHOCKS.df, BTC_SHOCKS.skew)
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1) < 0.03
    assert np.quantile(z, 0.001) < -np.quantile(z, 0.999)


# --- the planted signal ------------------------------------------------------------------------
FRAMES = ("BTC-USD", "ACME", "GLBX", "onchain", "macro")


def _frames(m: SyntheticMarket) -> dict[str, pl.DataFrame]:
    return {
        **{s: m.ohlcv(s) for s in ("BTC-USD", "ACME", "GLBX")},
        "onchain": m.onchain,
        "macro": m.macro,
    }


def _bumped(planted: float, day: int, by: float = 3.0) -> SyntheticMarket:
    """The market with the driver moved on one calendar day only."""

    class Bumped(SyntheticMarket):
        @functools.cached_property
        def _driver(self) -> np.ndarray:
            s = SyntheticMarket._driver.func(self).copy()
            s[day] += by
            return s

    return Bumped(42, planted)


def test_planted_zero_is_the_default_market_and_the_driver_enters_nothing():
    default = _frames(SyntheticMarket(42))
    off = _frames(SyntheticMarket(42, planted=0.0))
    bumped = _frames(_bumped(0.0, day=3000))
    for name in FRAMES:
        assert off[name].equals(default[name]), name
        assert bumped[name].equals(default[name]), name
    window = (datetime(2019, 1, 1), datetime(2019, 3, 1))
    for table in ("ohlcv", "onchain", "macro"):
        assert (
            make_source(table, "synthetic", planted=0.0)
            .fetch(*window)
            .equals(make_source(table, "synthetic").fetch(*window))
        )


def test_planted_driver_is_a_unit_ar1_from_its_own_stream():
    d = SyntheticMarket(42).planted_driver()
    assert d.columns == ["date", "driver"] and d.schema["date"] == pl.Date
    assert d["date"][0] == ORIGIN and d.height == (HORIZON_END - ORIGIN).days
    s = d["driver"].to_numpy()
    assert 0.75 < s.std() < 1.25
    assert abs(np.corrcoef(s[1:], s[:-1])[0, 1] - PLANTED_PHI) < 0.01
    on = SyntheticMarket(42, planted=1.0)
    assert on.planted_driver().equals(d)  # the strength scales effects, not the driver
    assert not SyntheticMarket(43).planted_driver()["driver"].equals(d["driver"])


def test_planted_signal_changes_no_other_draws():
    off, on = _frames(SyntheticMarket(42)), _frames(SyntheticMarket(42, planted=1.0))
    for name in ("ACME", "GLBX", "macro"):
        assert on[name].equals(off[name]), name
    assert not on["BTC-USD"]["close"].equals(off["BTC-USD"]["close"])

    # the on-chain ratio's own noise is the same draw: on minus off is the published driver
    def log_ratio(oc: pl.DataFrame) -> np.ndarray:
        return np.log(oc["tx_count"].to_numpy() / oc["active_addresses"].to_numpy())

    s = SyntheticMarket(42).planted_driver()["driver"].to_numpy()
    gap = log_ratio(on["onchain"]) - log_ratio(off["onchain"]) - PLANTED_C_OBS * s
    assert np.abs(gap).max() < 1e-3  # integer rounding of the counts


def _planted_rows(planted: float) -> pl.DataFrame:
    """BTC-USD bars of 2013-2024: the on-chain feature, the labels, next 30 days' mean |r|."""
    opts = {"seed": 42, "planted": planted}
    lo, hi = datetime(2012, 6, 1), datetime(2025, 6, 1)  # labels of 2024's bars are complete
    bars = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), **opts).fetch(lo, hi)
    onchain = make_source("onchain", "synthetic", **opts).fetch(lo, hi)
    macro = make_source("macro", "synthetic", **opts).fetch(lo, hi)
    feats = compute_features(bars, onchain, macro)
    # the timing the planted lag relies on: bar d reads on-chain day d-1
    day_before = onchain.select(
        date=pl.col("date") + pl.duration(days=1),
        expected=pl.col("tx_count") / pl.col("active_addresses"),
    )
    check = feats.with_columns(date=pl.col("ts").dt.date()).join(day_before, on="date")
    assert check.height > 4000
    assert (check["tx_per_active_address"] == check["expected"]).all()

    abs_ret = (pl.col("close").log().diff()).abs()
    next_30 = abs_ret.rolling_mean(30).shift(-30)  # mean |r| of bars d+1..d+30
    return (
        feats.select("ts", x=pl.col("tx_per_active_address").log())
        .join(compute_labels(bars, LabelConfig()), on="ts")
        .join(bars.select("ts", next_abs_30=next_30), on="ts")
        .filter(pl.col("ts").is_between(datetime(2013, 1, 1), datetime(2025, 1, 1), closed="left"))
        .drop_nulls(["x", "fwd_ret_5", "fwd_vol_30", "next_abs_30"])
    )


def _corr(df: pl.DataFrame, y: str) -> float:
    return float(np.corrcoef(df["x"].to_numpy(), df[y].to_numpy())[0, 1])


def test_planted_feature_predicts_forward_return_and_volatility():
    on = _planted_rows(1.0)
    assert on.height == 4383
    c5 = _corr(on, "fwd_ret_5")
    # an honest t-statistic: every fifth bar, so the 5-day returns do not overlap
    sparse = on.gather_every(5)
    c5_sparse = _corr(sparse, "fwd_ret_5")
    t_stat = c5_sparse * np.sqrt((sparse.height - 2) / (1 - c5_sparse**2))
    assert c5 > 0.05 and t_stat > 3, (c5, t_stat)
    assert _corr(on, "next_abs_30") > 0.1
    assert _corr(on, "fwd_vol_30") > 0.1
    assert _corr(on, "fwd_ret_90") > _corr(on, "fwd_ret_5")  # persistent: builds with horizon
    # Off, the feature is independent of prices: the standard error of these correlations is
    # about sqrt(2.2 / n) = 0.023 for 5-day returns (overlapping, against an AR(1) 0.5 feature)
    # and sqrt(3 / n) = 0.026 for 30-day windows; 0.08 is three of those.
    off = _planted_rows(0.0)
    for y in ("fwd_ret_5", "next_abs_30", "fwd_vol_30"):
        assert abs(_corr(off, y)) < 0.08, y


def test_a_published_driver_value_moves_no_return_up_to_the_close_of_the_bar_that_sees_it():
    """The innovation of on-chain day T is first in the features of bar T+1, whose forward
    return starts with day T+2: bumping it changes nothing up to the close of T+1."""
    t = 3000
    base, bumped = SyntheticMarket(42, planted=1.0), _bumped(1.0, day=t)
    a, b = base.ohlcv("BTC-USD"), bumped.ohlcv("BTC-USD")
    assert a.head(t + 2).equals(b.head(t + 2))  # bars of days 0..T+1
    assert a["close"][t + 2] != b["close"][t + 2]
    oa, ob = base.onchain, bumped.onchain
    assert oa.head(t).equals(ob.head(t))
    assert oa["tx_count"][t] != ob["tx_count"][t]  # published on day T


@pytest.mark.parametrize("seed", [42, 1])
def test_returns_do_not_correlate_with_driver_innovations_not_yet_visible(seed):
    """u_t = s_t - phi s_{t-1} is published on on-chain day t: neither the return of day t nor
    that of day t+1 may move with it; the return of day t+2 does (shown at strength 4, where
    the effect is large enough to see)."""
    m = SyntheticMarket(seed, planted=4.0)
    s = m.planted_driver()["driver"].to_numpy()
    u = s[1:] - PLANTED_PHI * s[:-1]  # u[i] is the innovation of day i+1
    r = np.diff(np.log(m.ohlcv("BTC-USD")["close"].to_numpy()))  # r[i]: return of day i+1
    lo, hi = 366, 366 + 12 * 365  # 2013-2024

    def corr(x, lag):
        return np.corrcoef(x[lo:hi], u[lo - lag : hi - lag])[0, 1]

    bound = 3 / np.sqrt(hi - lo)  # three standard errors under independence
    for x in (r, np.abs(r)):
        assert abs(corr(x, 0)) < bound and abs(corr(x, 1)) < bound
        assert corr(x, 2) > bound
    r1 = np.diff(np.log(SyntheticMarket(seed, planted=1.0).ohlcv("BTC-USD")["close"].to_numpy()))
    assert abs(corr(r1, 0)) < bound and abs(corr(r1, 1)) < bound


@pytest.mark.parametrize("table", ["ohlcv", "onchain", "macro"])
@pytest.mark.parametrize("planted", [-1.0, -1e-9, float("nan"), float("inf"), "1", True])
def test_bad_planted_strength_fails_with_a_message_naming_the_option(table, planted):
    with pytest.raises(SourceError, match=r"'planted'.*finite number >= 0"):
        make_source(table, "synthetic", planted=planted)


def test_planted_strength_is_validated_by_the_market_and_passed_by_the_sources_resource():
    with pytest.raises(SourceError, match="'planted'"):
        SyntheticMarket(42, planted=float("nan"))
    from assets.resources import MarketSourcesResource

    res = MarketSourcesResource(synthetic_planted_signal=1.0)
    for table in ("ohlcv", "onchain", "macro"):
        assert res.source(table).planted == 1.0
    assert MarketSourcesResource().source("ohlcv").planted == 0.0
