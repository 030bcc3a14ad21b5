import warnings
from datetime import date, datetime

import numpy as np
import polars as pl
import pytest

from ml.features import FeatureConfig, compute_features, model_feature_columns

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pandas_ta_classic as ta


@pytest.fixture(scope="module")
def feats(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    return compute_features(synthetic_ohlcv, synthetic_onchain, synthetic_macro)


@pytest.mark.parametrize("symbol", ["BTC-USD", "ACME"])
def test_indicators_match_pandas_ta_classic(feats, synthetic_ohlcv, symbol):
    close = synthetic_ohlcv.filter(pl.col("symbol") == symbol).sort("ts")["close"].to_pandas()
    ours = feats.filter(pl.col("symbol") == symbol).sort("ts").to_pandas()
    reference = {
        "EMA_12": ta.ema(close, 12),
        "EMA_26": ta.ema(close, 26),
        "RSI_14": ta.rsi(close, 14),
        **{
            c: ta.macd(close, 12, 26, 9)[c]
            for c in ("MACD_12_26_9", "MACDh_12_26_9", "MACDs_12_26_9")
        },
    }
    for name, ref in reference.items():
        ref = ref.to_numpy()
        got = ours[name].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(ref), np.isnan(got)), f"{name}: warm-up length differs"
        np.testing.assert_allclose(
            got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-9, err_msg=name
        )


def test_features_do_not_change_when_future_rows_are_removed(
    synthetic_ohlcv, synthetic_onchain, synthetic_macro, feats
):
    cols = ["symbol", "ts", *model_feature_columns(FeatureConfig())]
    for cut in (datetime(2018, 6, 30), datetime(2020, 1, 15)):
        ohlcv = synthetic_ohlcv.filter(pl.col("ts") <= cut)
        onchain = synthetic_onchain.filter(pl.col("date") <= cut.date())
        macro = synthetic_macro.filter(pl.col("published") <= cut.date())
        truncated = compute_features(ohlcv, onchain, macro).select(cols)
        full = feats.filter(pl.col("ts") <= cut).select(cols)
        assert truncated.equals(full), f"features up to {cut} depend on later data"


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
