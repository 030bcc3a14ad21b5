from datetime import datetime

import numpy as np
import polars as pl
import pytest

from warehouse.schema import MACRO, OHLCV, ONCHAIN, conform
from warehouse.sources import SourceError, make_source
from warehouse.sources.synthetic import RETARGET_DAYS, SyntheticMarket


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


def test_windows_outside_the_generated_horizon_are_refused():
    src = make_source("macro", "synthetic")
    with pytest.raises(SourceError, match="covers"):
        src.fetch(datetime(2005, 1, 1), datetime(2005, 2, 1))
    with pytest.raises(SourceError, match="not before"):
        src.fetch(datetime(2020, 2, 1), datetime(2020, 1, 1))
