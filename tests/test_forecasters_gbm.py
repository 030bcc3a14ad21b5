"""The LightGBM forecaster: the contract on a real fold, skill on a planted signal for every
target, and that it never reads test labels."""

import dataclasses
import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from ml.forecasters import ALL_TARGETS, REGISTRY, FoldData, TargetSpec
from ml.forecasters.lightgbm import EWMA_INPUT, LightGBMForecastConfig, LightGBMForecaster
from ml.gbm import GBMConfig
from ml.metrics import log_loss

SPEC = TargetSpec()
LABELS = SPEC.label_columns()
QUICK = LightGBMForecastConfig(
    trees=GBMConfig(learning_rate=0.1, max_rounds=120, early_stopping_rounds=20)
)
N_TRAIN, N_VAL, N_TEST = 2500, 700, 1500


def _planted_fold(seed: int = 0) -> FoldData:
    """Rows whose next 90 one-bar returns have drift 0.01 * `drift` and volatility
    0.01 * exp(0.4 * `vol`), labelled the way `ml.labels` labels bars, plus two noise features
    (one with gaps). The last 90 test rows are unlabelled, as at the end of the data."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL + N_TEST
    drift, vol = rng.normal(size=n), rng.normal(size=n)
    mu, s = 0.01 * drift, 0.01 * np.exp(0.4 * vol)
    path = mu[:, None] + s[:, None] * rng.normal(size=(n, 90))
    cum = np.cumsum(path, axis=1)
    fwd_ret_90 = cum[:, 89]
    direction = np.where(
        fwd_ret_90 > math.log1p(0.05), 2, np.where(fwd_ret_90 < math.log1p(-0.05), 0, 1)
    )
    gappy = rng.normal(size=n)
    gappy[rng.random(n) < 0.3] = np.nan
    split = ["train"] * N_TRAIN + ["val"] * N_VAL + ["test"] * N_TEST
    start = datetime(2000, 1, 1)
    rows = pl.DataFrame(
        {
            "symbol": ["AAA"] * n,
            "ts": [start + timedelta(days=i) for i in range(n)],
            "split": split,
            "drift": drift,
            "vol": vol,
            "noise": rng.normal(size=n),
            "gappy": gappy,
            "true_sigma": s,
            **{SPEC.return_label(h): cum[:, h - 1] for h in SPEC.return_horizons},
            SPEC.quantile: fwd_ret_90,
            SPEC.direction: direction,
            SPEC.sigma: path[:, :30].std(axis=1, ddof=1),
        }
    ).with_columns(pl.col("gappy").fill_nan(None), pl.col(SPEC.direction).cast(pl.Int8))
    unlabelled = pl.int_range(pl.len()) >= n - 90
    rows = rows.with_columns(
        [pl.when(unlabelled).then(None).otherwise(pl.col(c)).alias(c) for c in LABELS]
    )
    return FoldData(
        key="planted",
        rows=rows,
        bars=rows.select("symbol", "ts"),
        feature_columns=["drift", "vol", "noise", "gappy"],
        targets=SPEC,
        fit_end=start + timedelta(days=N_TRAIN),
        val_end=start + timedelta(days=N_TRAIN + N_VAL),
    )


@pytest.fixture(scope="module")
def planted() -> FoldData:
    return _planted_fold()


@pytest.fixture(scope="module")
def planted_predictions(planted) -> pl.DataFrame:
    return LightGBMForecaster(QUICK).fit(planted).predict(planted)


def _labelled_test(data: FoldData, pred: pl.DataFrame) -> pl.DataFrame:
    """The labelled test rows joined to their predictions."""
    joined = data.scored.join(pred, on=["symbol", "ts"], maintain_order="left")
    return joined.filter((pl.col("split") == "test") & pl.col(SPEC.quantile).is_not_null())


def _pinball(y: np.ndarray, q: np.ndarray, level: float) -> float:
    d = y - q
    return float(np.mean(np.maximum(level * d, (level - 1) * d)))


def test_lightgbm_is_registered_for_every_target():
    model = REGISTRY["lightgbm"]()
    assert isinstance(model, LightGBMForecaster)
    assert set(model.targets) == {"direction", "quantiles", "sigma", "returns"}


def test_predicts_exactly_the_scored_rows_of_a_real_fold_with_valid_columns(synthetic_fold):
    model = LightGBMForecaster(QUICK).fit(synthetic_fold)
    pred = model.predict(synthetic_fold)
    assert pred.select("symbol", "ts").equals(synthetic_fold.scored.select("symbol", "ts"))
    columns = [c for t in model.targets for c in SPEC.prediction_columns(t)]
    assert pred.columns == ["symbol", "ts", *columns]
    values = pred.select(columns).to_numpy()
    assert np.isfinite(values).all()
    p = pred.select("p_down", "p_flat", "p_up").to_numpy()
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (pred["q10"] <= pred["q90"]).all()
    assert (pred["sigma"] > 0).all()
    importance = model.feature_importance()
    assert set(importance) == set(model.targets)
    for shares in importance.values():
        assert list(shares) != []
        assert set(shares) <= {*synthetic_fold.feature_columns, EWMA_INPUT}
        assert math.isclose(sum(shares.values()), 1.0) or sum(shares.values()) == 0.0
    assert EWMA_INPUT in importance["sigma"]  # the sigma booster reads the EWMA level


def test_direction_beats_the_training_class_frequencies_out_of_sample(planted, planted_predictions):
    test, train = _labelled_test(planted, planted_predictions), planted.train
    y = test[SPEC.direction].to_numpy()
    freq = np.bincount(train[SPEC.direction].drop_nulls().to_numpy(), minlength=3) / len(
        train[SPEC.direction].drop_nulls()
    )
    model_loss = log_loss(y, test.select("p_down", "p_flat", "p_up").to_numpy())
    constant_loss = log_loss(y, np.tile(freq, (len(y), 1)))
    assert model_loss < 0.8 * constant_loss


def test_quantile_band_covers_about_80_percent_and_beats_unconditional_quantiles(
    planted, planted_predictions
):
    test, train = _labelled_test(planted, planted_predictions), planted.train
    y = test[SPEC.quantile].to_numpy()
    q10, q90 = test["q10"].to_numpy(), test["q90"].to_numpy()
    coverage = float(np.mean((y >= q10) & (y <= q90)))
    assert 0.65 <= coverage <= 0.95
    y_train = train[SPEC.quantile].drop_nulls().to_numpy()
    for level, q in ((0.1, q10), (0.9, q90)):
        constant = np.full_like(y, np.quantile(y_train, level))
        assert _pinball(y, q, level) < _pinball(y, constant, level)


def test_sigma_tracks_the_planted_volatility(planted, planted_predictions):
    test, train = _labelled_test(planted, planted_predictions), planted.train
    corr = np.corrcoef(test["sigma"].to_numpy(), test["true_sigma"].to_numpy())[0, 1]
    assert corr > 0.5
    realized = test[SPEC.sigma].to_numpy() ** 2
    constant = float(np.mean(train[SPEC.sigma].drop_nulls().to_numpy() ** 2))

    def qlike(variance):
        return float(np.mean(realized / variance + np.log(variance)))

    assert qlike(test["sigma"].to_numpy() ** 2) < qlike(np.full_like(realized, constant))


@pytest.mark.parametrize("h", SPEC.return_horizons)
def test_returns_rank_correlate_with_the_realized_return(planted, planted_predictions, h):
    test = _labelled_test(planted, planted_predictions)
    rho = spearmanr(test[SPEC.return_column(h)], test[SPEC.return_label(h)]).statistic
    assert rho > 0.3


def test_test_labels_never_reach_the_fit(planted, planted_predictions):
    rng = np.random.default_rng(1)
    is_test = pl.col("split") == "test"
    noise = pl.Series(rng.normal(size=planted.rows.height))
    scrambled = planted.rows.with_columns(
        *[
            pl.when(is_test).then(noise).otherwise(c).alias(c)
            for c in LABELS
            if c != SPEC.direction
        ],
        pl.when(is_test).then(pl.lit(0, pl.Int8)).otherwise(SPEC.direction).alias(SPEC.direction),
    )
    assert not scrambled.equals(planted.rows)
    data = planted.replace(rows=scrambled)
    again = LightGBMForecaster(QUICK).fit(data).predict(data)
    assert again.equals(planted_predictions)


def test_fit_is_deterministic_for_a_seed_and_the_seed_matters(planted, planted_predictions):
    """QUICK keeps GBMConfig's row and column sampling (bagging_fraction and feature_fraction
    0.8, bagging every round), which the seed draws: every booster's predictions move with it
    (here by up to ~0.001 for sigma, 0.003-0.03 for the returns, over 0.1 for the rest)."""
    again = LightGBMForecaster(QUICK).fit(planted).predict(planted)
    assert again.equals(planted_predictions)
    assert QUICK.trees.bagging_fraction < 1 and QUICK.trees.feature_fraction < 1
    trees = dataclasses.replace(QUICK.trees, seed=QUICK.trees.seed + 1)
    reseeded = LightGBMForecaster(dataclasses.replace(QUICK, trees=trees)).fit(planted)
    other = reseeded.predict(planted)
    for column in (c for t in ALL_TARGETS for c in SPEC.prediction_columns(t)):
        assert not np.allclose(other[column], planted_predictions[column]), column


def test_predict_before_fit_names_the_fix(planted):
    with pytest.raises(RuntimeError, match="call fit"):
        LightGBMForecaster(QUICK).predict(planted)


def test_a_target_with_too_few_training_labels_is_rejected(planted):
    rows = planted.rows.with_columns(
        pl.when(pl.col("split") == "train")
        .then(None)
        .otherwise(pl.col(SPEC.sigma))
        .alias(SPEC.sigma)
    )
    data = planted.replace(key="sparse", rows=rows)
    with pytest.raises(ValueError, match="fwd_vol_30"):
        LightGBMForecaster(QUICK).fit(data)
