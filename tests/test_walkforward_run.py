"""Putting a fold's predictions together: seed means, the ensemble whose weights come from
earlier folds' out-of-sample rows only, and the RF + XGB + LSTM ensemble fitted on the fold's
validation rows only (`-k ensemble`)."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.forecasters import TargetSpec
from ml.walkforward_run import prediction_columns, seed_means, with_ensembles, with_rf_xgb_lstm

SPEC = TargetSpec()


def _long(fold: str, start: datetime, n: int, members: dict[str, np.ndarray], seed=None):
    """Long rows of one fold: every member predicts sigma only (others null), half val half
    test."""
    ts = [start + timedelta(days=i) for i in range(n)]
    frames = []
    for name, sigma in members.items():
        cols = {c: [None] * n for c in prediction_columns(SPEC)}
        cols["sigma"] = sigma.tolist()
        frames.append(
            pl.DataFrame(
                {
                    "fold": fold,
                    "forecaster": name,
                    "seed": [seed] * n,
                    "symbol": "A",
                    "ts": ts,
                    "split": ["val"] * (n // 2) + ["test"] * (n - n // 2),
                    **cols,
                },
                schema_overrides={
                    "seed": pl.Int64,
                    **dict.fromkeys(prediction_columns(SPEC), pl.Float64),
                },
            )
        )
    return pl.concat(frames)


def _labels(start: datetime, n: int, sigma: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": "A",
            "ts": [start + timedelta(days=i) for i in range(n)],
            **{c: [None] * n for c in SPEC.label_columns() if c != SPEC.sigma},
            SPEC.sigma: sigma,
        },
        schema_overrides=dict.fromkeys(
            [c for c in SPEC.label_columns() if c != SPEC.sigma], pl.Float64
        ),
    )


def test_seed_means_average_variances_for_sigma_and_values_otherwise():
    a = _long("2021", datetime(2021, 1, 1), 4, {"m": np.full(4, 0.3)}, seed=0)
    b = _long("2021", datetime(2021, 1, 1), 4, {"m": np.full(4, 0.4)}, seed=1)
    mean = seed_means(pl.concat([a, b]))
    assert mean["seed"].is_null().all() and mean.height == 4
    np.testing.assert_allclose(mean["sigma"], np.sqrt((0.09 + 0.16) / 2))


def test_the_first_folds_ensemble_is_the_simple_average():
    rng = np.random.default_rng(0)
    start = datetime(2021, 1, 1)
    truth = rng.uniform(0.01, 0.05, 200)
    long = _long("2021", start, 200, {"good": truth, "bad": truth * 3})
    out, weights = with_ensembles(long, None, _labels(start, 200, truth), SPEC)
    ens = out.filter(pl.col("forecaster") == "ensemble")["sigma"]
    eq = out.filter(pl.col("forecaster") == "ensemble_equal")["sigma"]
    np.testing.assert_allclose(ens, eq)
    assert weights["ensemble_fitted_on_rows"] == 0


def test_ensemble_weights_come_from_earlier_folds_and_ignore_this_folds_validation_rows():
    rng = np.random.default_rng(1)
    past_start, start = datetime(2020, 1, 1), datetime(2021, 1, 1)
    past_truth = rng.uniform(0.01, 0.05, 300)
    # in the past, "good" was right and "tuned" was 3x off
    past = _long("2020", past_start, 300, {"good": past_truth, "tuned": 3 * past_truth})
    truth = rng.uniform(0.01, 0.05, 200)
    labels = pl.concat([_labels(past_start, 300, past_truth), _labels(start, 200, truth)])
    # in this fold's validation rows "tuned" looks perfect (as an early-stopped model would)
    cur = np.where(np.arange(200) < 100, truth, 3 * truth)
    long = _long("2021", start, 200, {"good": 3 * truth, "tuned": cur})
    _, weights = with_ensembles(long, past, labels, SPEC)
    w = weights["ensemble"]["weights"]["sigma"]
    assert w["good"] > 0.9  # chosen on the past, not on this fold's flattering validation rows
    assert weights["ensemble_fitted_on_rows"] == 300
    # changing this fold's validation rows changes nothing about the weights
    long2 = _long("2021", start, 200, {"good": 3 * truth, "tuned": truth})
    _, again = with_ensembles(long2, past, labels, SPEC)
    assert again["ensemble"] == weights["ensemble"]


def test_a_replaced_fold_does_not_reuse_the_old_rows_cached_segments(synthetic_fold):
    before = synthetic_fold.train.height  # fills the segment cache
    fewer = synthetic_fold.replace(rows=synthetic_fold.rows.filter(pl.col("symbol") == "ACME"))
    assert 0 < fewer.train.height < before
    assert synthetic_fold.train.height == before


def _tutorial_fold(rng, start, n, lstm_sigma=None, **extra):
    """A fold whose members are the tutorial ensemble's three (sigma only) plus `extra`; the
    LSTM's rows are given as seeds 0 and 1 and their mean, as the predictions asset has them."""
    truth = rng.uniform(0.01, 0.05, n)
    members = {"random_forest": 3 * truth, "xgboost": 2 * truth, **extra}
    lstm = truth if lstm_sigma is None else lstm_sigma
    long = pl.concat(
        [
            _long("2021", start, n, members),
            _long("2021", start, n, {"lstm": lstm * 0.5}, seed=0),
            _long("2021", start, n, {"lstm": lstm * 1.3}, seed=1),
        ]
    )
    return pl.concat([long, seed_means(long)]), truth


def test_rf_xgb_lstm_ensemble_weights_come_from_this_folds_validation_rows_only():
    rng = np.random.default_rng(2)
    start = datetime(2021, 1, 1)
    long, truth = _tutorial_fold(rng, start, 200, mamba2=np.full(200, 0.02))
    labels = _labels(start, 200, truth)
    out, info = with_rf_xgb_lstm(long, labels, SPEC)
    w = info["rf_xgb_lstm"]["weights"]["sigma"]
    assert set(w) == {"random_forest", "xgboost", "lstm"}  # only the three, not mamba2
    # the LSTM's seed mean is (nearly) the truth on the validation rows (that the member is the
    # seed mean, not one seed, is pinned by the exact simple average below)
    assert w["lstm"] > 0.9
    assert info["rf_xgb_lstm_fitted_on_rows"] == 100  # the validation half
    eq = info["rf_xgb_lstm_equal"]["weights"]["sigma"]
    assert eq == dict.fromkeys(["random_forest", "xgboost", "lstm"], 1 / 3)
    # both combinations predict every scored row of the fold, val and test
    for name in ("rf_xgb_lstm", "rf_xgb_lstm_equal"):
        rows = out.filter(pl.col("forecaster") == name)
        assert rows.height == 200 and rows["seed"].is_null().all()
        assert rows["split"].to_list() == ["val"] * 100 + ["test"] * 100
    mean_sigma = out.filter(pl.col("forecaster") == "rf_xgb_lstm_equal")["sigma"].to_numpy()
    lstm_mean = np.sqrt(((0.5 * truth) ** 2 + (1.3 * truth) ** 2) / 2)
    expected = np.sqrt(((3 * truth) ** 2 + (2 * truth) ** 2 + lstm_mean**2) / 3)
    np.testing.assert_allclose(mean_sigma, expected, rtol=1e-9)
    # the test rows take no part: any test-row predictions or labels give the same weights
    test = np.arange(200) >= 100
    lstm_changed = np.where(test, 7 * truth, truth)
    long2, _ = _tutorial_fold(np.random.default_rng(2), start, 200, lstm_sigma=lstm_changed)
    labels2 = _labels(start, 200, np.where(test, 0.5, truth))
    _, again = with_rf_xgb_lstm(long2, labels2, SPEC)
    assert again["rf_xgb_lstm"]["weights"] == info["rf_xgb_lstm"]["weights"]
    # while the validation rows decide them
    long3, _ = _tutorial_fold(np.random.default_rng(2), start, 200, lstm_sigma=5 * truth)
    _, moved = with_rf_xgb_lstm(long3, labels, SPEC)
    assert moved["rf_xgb_lstm"]["weights"]["sigma"]["lstm"] < 0.5


def test_rf_xgb_lstm_ensemble_is_skipped_with_a_reason_when_a_member_is_missing():
    rng = np.random.default_rng(3)
    start = datetime(2021, 1, 1)
    truth = rng.uniform(0.01, 0.05, 50)
    long = _long("2021", start, 50, {"random_forest": truth, "xgboost": truth})
    out, info = with_rf_xgb_lstm(long, _labels(start, 50, truth), SPEC)
    assert out.equals(long)
    assert info["rf_xgb_lstm"] is None and "lstm" in info["rf_xgb_lstm_skipped"]


def test_rf_xgb_lstm_ensemble_falls_back_to_the_average_without_labelled_validation_rows():
    rng = np.random.default_rng(4)
    start = datetime(2021, 1, 1)
    long, truth = _tutorial_fold(rng, start, 60)
    # every validation label missing (say, windows past a gap): nothing to fit the weights on
    labels = _labels(start, 60, np.where(np.arange(60) < 30, np.nan, truth))
    out, info = with_rf_xgb_lstm(long, labels, SPEC)
    assert "No validation row" in info["rf_xgb_lstm_fallback"]
    assert info["rf_xgb_lstm_fitted_on_rows"] == 0
    fitted = out.filter(pl.col("forecaster") == "rf_xgb_lstm")["sigma"]
    average = out.filter(pl.col("forecaster") == "rf_xgb_lstm_equal")["sigma"]
    np.testing.assert_allclose(fitted, average)


def test_rf_xgb_lstm_ensemble_lets_a_real_error_through():
    """Only "no validation rows" falls back; a malformed member (duplicate keys) still fails."""
    rng = np.random.default_rng(5)
    start = datetime(2021, 1, 1)
    long, truth = _tutorial_fold(rng, start, 40)
    dup = long.filter((pl.col("forecaster") == "xgboost") & pl.col("seed").is_null()).head(1)
    with pytest.raises(ValueError, match="duplicate"):
        with_rf_xgb_lstm(pl.concat([long, dup]), _labels(start, 40, truth), SPEC)
