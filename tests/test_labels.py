import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.labels import DOWN, FLAT, UP, LabelConfig, compute_labels


def _bars(closes, symbol="X"):
    n = len(closes)
    return pl.DataFrame(
        {
            "symbol": symbol,
            "ts": [datetime(2020, 1, 1) + timedelta(days=i) for i in range(n)],
            "close": np.asarray(closes, dtype=float),
        }
    )


def test_forward_returns_use_only_later_bars_and_end_in_nulls(synthetic_ohlcv):
    labels = compute_labels(synthetic_ohlcv)
    for (symbol,), g in labels.group_by("symbol"):
        closes = synthetic_ohlcv.filter(pl.col("symbol") == symbol).sort("ts")["close"].to_numpy()
        g = g.sort("ts")
        for h in (1, 5, 10, 30, 90):
            r = g[f"fwd_ret_{h}"].to_numpy()
            np.testing.assert_allclose(r[:-h], np.log(closes[h:] / closes[:-h]))
            assert g[f"fwd_ret_{h}"][-h:].null_count() == h
            assert g[f"fwd_ret_{h}"][:-h].null_count() == 0


def test_direction_thresholds_are_simple_returns():
    cfg = LabelConfig(horizons=(1, 2), direction_horizon=2, vol_window=2)
    closes = [100, 100, 104.9, 100, 95.2, 100, 94.8, 100, 105.1]
    lab = compute_labels(_bars(closes), cfg)["direction_2"].to_list()
    # r2 from bar t to t+2: 4.9% flat, -4.8% flat, +5.04% up... as exp(r) - 1 vs +-5%
    expected = []
    for t in range(len(closes)):
        if t + 2 >= len(closes):
            expected.append(None)
            continue
        simple = closes[t + 2] / closes[t] - 1
        expected.append(UP if simple > 0.05 else DOWN if simple < -0.05 else FLAT)
    assert lab == expected
    assert {UP, DOWN, FLAT} <= set(lab)


def test_forward_volatility_is_std_of_the_next_window():
    rng = np.random.default_rng(0)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 200)))
    cfg = LabelConfig()
    lab = compute_labels(_bars(closes), cfg)
    r = np.diff(np.log(closes))
    t = 50
    assert lab["fwd_vol_30"][t] == pytest.approx(np.std(r[t : t + 30], ddof=1))
    assert lab["fwd_vol_30"][-30:].null_count() == 30
    assert lab["fwd_vol_30"][:-30].null_count() == 0


def test_label_end_is_the_last_bar_any_label_looks_at():
    lab = compute_labels(_bars(np.linspace(100, 200, 200)))
    assert lab["label_end_ts"][0] == lab["ts"][90]
    assert lab["label_end_ts"][-90:].null_count() == 90


def test_labels_never_cross_symbols():
    a = _bars(np.full(100, 100.0), "A")
    b = _bars(np.full(100, 200.0), "B")
    lab = compute_labels(pl.concat([a, b]))
    assert lab.filter(pl.col("symbol") == "A")["fwd_ret_1"].drop_nulls().abs().max() == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"up_threshold": -0.1}, {"down_threshold": 0.02}, {"direction_horizon": 7}]
)
def test_invalid_label_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        LabelConfig(**kwargs)


def test_thresholds_change_the_version():
    assert LabelConfig().version() != LabelConfig(up_threshold=0.1).version()
    assert math.isclose(LabelConfig().up_threshold, 0.05)


def test_path_quantiles_are_quantiles_of_the_forward_cumulative_returns():
    rng = np.random.default_rng(1)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 300)))
    lab = compute_labels(_bars(closes))
    lc = np.log(closes)
    for t in (0, 17, 209):
        path = lc[t + 1 : t + 91] - lc[t]  # k = 1..90
        assert lab["fwd_ret_p10_90"][t] == pytest.approx(np.quantile(path, 0.1), rel=1e-12)
        assert lab["fwd_ret_p90_90"][t] == pytest.approx(np.quantile(path, 0.9), rel=1e-12)
    assert lab["fwd_ret_p10_90"][-90:].null_count() == 90
    assert lab["fwd_ret_p90_90"][:-90].null_count() == 0
    assert (lab["fwd_ret_p10_90"] <= lab["fwd_ret_p90_90"]).all()


def test_path_quantiles_never_cross_symbols():
    a = _bars(np.linspace(100, 50, 120), "A")
    b = _bars(np.full(120, 200.0), "B")
    lab = compute_labels(pl.concat([a, b])).filter(pl.col("symbol") == "A")
    assert lab["fwd_ret_p90_90"].drop_nulls().max() < 0.0
    assert lab["fwd_ret_p10_90"].null_count() == 90


def test_label_version_follows_the_code_version(monkeypatch):
    import ml.labels

    base = LabelConfig().version()
    monkeypatch.setattr(ml.labels, "LABELS_CODE_VERSION", "next")
    assert LabelConfig().version() != base
