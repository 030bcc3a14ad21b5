"""The random forest and XGBoost forecasters: the contract on a real fold, skill on a planted
signal for every target, that they are fitted on training rows only (the forest) or never read
test labels (XGBoost), determinism, the quantile regression forest against a brute-force
weighted quantile, a direction class missing from training, and the too-few-rows errors."""

import dataclasses
import math

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr
from sklearn.ensemble import RandomForestRegressor

from ml.forecasters import ALL_TARGETS, REGISTRY, FoldData
from ml.forecasters.lightgbm import EWMA_INPUT
from ml.forecasters.random_forest import (
    RandomForestForecastConfig,
    RandomForestForecaster,
    forest_quantiles,
    training_leaf_weights,
)
from ml.forecasters.xgboost import XGBoostForecastConfig, XGBoostForecaster
from ml.metrics import log_loss
from tests.test_forecasters_gbm import LABELS, SPEC, _labelled_test, _pinball, _planted_fold

# every feature at every split: the planted fold has 4 columns, 2 of them noise, and the default
# "sqrt" (2 a split) puts half the splits on noise, so a leaf spans a wide range of the drift and
# the quantile forest's 80% band covers ~96% (on 40 columns "sqrt" tries 6)
RF_QUICK = RandomForestForecastConfig(n_estimators=60, max_features=1.0)
RF_CONTRACT = RandomForestForecastConfig(n_estimators=30)  # the default "sqrt" on a real fold
XGB_QUICK = XGBoostForecastConfig(learning_rate=0.1, max_rounds=120, early_stopping_rounds=20)


@pytest.fixture(scope="module")
def planted() -> FoldData:
    return _planted_fold()


@pytest.fixture(scope="module")
def random_forest_planted(planted) -> pl.DataFrame:
    return RandomForestForecaster(RF_QUICK).fit(planted).predict(planted)


@pytest.fixture(scope="module")
def xgboost_planted(planted) -> pl.DataFrame:
    return XGBoostForecaster(XGB_QUICK).fit(planted).predict(planted)


def _scramble(data: FoldData, splits: tuple[str, ...], seed: int = 1) -> FoldData:
    """`data` with every label of the rows in `splits` replaced by noise (direction by 0)."""
    rng = np.random.default_rng(seed)
    hit = pl.col("split").is_in(list(splits))
    noise = pl.Series(np.abs(rng.normal(size=data.rows.height)))  # positive: valid vol labels
    rows = data.rows.with_columns(
        *[pl.when(hit).then(noise).otherwise(c).alias(c) for c in LABELS if c != SPEC.direction],
        pl.when(hit).then(pl.lit(0, pl.Int8)).otherwise(SPEC.direction).alias(SPEC.direction),
    )
    assert not rows.equals(data.rows)
    return data.replace(rows=rows)


def _check_contract(model, data: FoldData) -> pl.DataFrame:
    pred = model.predict(data)
    assert pred.select("symbol", "ts").equals(data.scored.select("symbol", "ts"))
    columns = [c for t in model.targets for c in SPEC.prediction_columns(t)]
    assert pred.columns == ["symbol", "ts", *columns]
    assert all(pred[c].dtype == pl.Float64 for c in columns)
    assert np.isfinite(pred.select(columns).to_numpy()).all()
    p = pred.select("p_down", "p_flat", "p_up").to_numpy()
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (pred["q10"] <= pred["q90"]).all()
    assert (pred["sigma"] > 0).all()
    importance = model.feature_importance()
    assert set(importance) == set(model.targets)
    for shares in importance.values():
        assert set(shares) <= {*data.feature_columns, EWMA_INPUT}
        assert math.isclose(sum(shares.values()), 1.0) or sum(shares.values()) == 0.0
    assert EWMA_INPUT in importance["sigma"]  # the sigma model reads the EWMA level
    assert model.fit_info()
    return pred


def _check_skill(data: FoldData, pred: pl.DataFrame) -> None:
    """Every target beats the training-row climatology on the labelled test rows."""
    test, train = _labelled_test(data, pred), data.train
    # direction: log loss below half that of the training class frequencies
    y = test[SPEC.direction].to_numpy()
    counts = np.bincount(train[SPEC.direction].drop_nulls().to_numpy(), minlength=3)
    constant = log_loss(y, np.tile(counts / counts.sum(), (len(y), 1)))
    assert log_loss(y, test.select("p_down", "p_flat", "p_up").to_numpy()) < 0.5 * constant
    # quantiles: a plausible band and lower pinball loss than the training quantiles
    yq = test[SPEC.quantile].to_numpy()
    q10, q90 = test["q10"].to_numpy(), test["q90"].to_numpy()
    assert 0.65 <= float(np.mean((yq >= q10) & (yq <= q90))) <= 0.95
    y_train = train[SPEC.quantile].drop_nulls().to_numpy()
    for level, q in ((0.1, q10), (0.9, q90)):
        flat = np.full_like(yq, np.quantile(y_train, level))
        assert _pinball(yq, q, level) < 0.5 * _pinball(yq, flat, level)
    # sigma: tracks the planted volatility and beats the constant on QLIKE
    assert np.corrcoef(test["sigma"].to_numpy(), test["true_sigma"].to_numpy())[0, 1] > 0.8
    realized = test[SPEC.sigma].to_numpy() ** 2
    flat_var = float(np.mean(train[SPEC.sigma].drop_nulls().to_numpy() ** 2))

    def qlike(variance):
        return float(np.mean(realized / variance + np.log(variance)))

    assert qlike(test["sigma"].to_numpy() ** 2) < qlike(np.full_like(realized, flat_var)) - 0.1
    # returns: rank-correlate with the realized return at every horizon, and on its scale (ranks
    # cannot see a lost or wrong scale factor or offset): lower MSE than predicting zero and a
    # calibration slope (realized on predicted) near 1
    for h in SPEC.return_horizons:
        pred_h, real_h = test[SPEC.return_column(h)].to_numpy(), test[SPEC.return_label(h)]
        real_h = real_h.to_numpy()
        rho = spearmanr(pred_h, real_h).statistic
        assert rho > 0.5, h
        assert np.mean((real_h - pred_h) ** 2) < 0.8 * np.mean(real_h**2), h
        slope = np.cov(pred_h, real_h)[0, 1] / np.var(pred_h, ddof=1)
        assert 0.5 < slope < 1.5, (h, slope)


def test_random_forest_and_xgboost_are_registered_for_every_target():
    for name, cls in (("random_forest", RandomForestForecaster), ("xgboost", XGBoostForecaster)):
        model = REGISTRY[name]()
        assert isinstance(model, cls)
        assert set(model.targets) == {"direction", "quantiles", "sigma", "returns"}


def test_random_forest_contract_on_a_real_fold(synthetic_fold):
    model = RandomForestForecaster(RF_CONTRACT).fit(synthetic_fold)
    _check_contract(model, synthetic_fold)
    assert set(model.fit_info()["train_rows"]) == set(model.targets)


def test_xgboost_contract_on_a_real_fold(synthetic_fold):
    model = XGBoostForecaster(XGB_QUICK).fit(synthetic_fold)
    _check_contract(model, synthetic_fold)
    info = model.fit_info()
    assert set(info["best_rounds"]) == {"direction", "quantiles", "sigma", "ret_1", "ret_5",
                                        "ret_10", "ret_30"}  # fmt: skip
    for name, best in info["best_rounds"].items():
        assert 1 <= best <= info["rounds_trained"][name] <= XGB_QUICK.max_rounds


def test_random_forest_beats_climatology_on_a_planted_signal(planted, random_forest_planted):
    _check_skill(planted, random_forest_planted)


def test_xgboost_beats_climatology_on_a_planted_signal(planted, xgboost_planted):
    _check_skill(planted, xgboost_planted)


def test_random_forest_reads_training_labels_only(planted, random_forest_planted):
    data = _scramble(planted, ("val", "test"))
    again = RandomForestForecaster(RF_QUICK).fit(data).predict(data)
    assert again.equals(random_forest_planted)


def test_xgboost_never_reads_test_labels(planted, xgboost_planted):
    data = _scramble(planted, ("test",))
    again = XGBoostForecaster(XGB_QUICK).fit(data).predict(data)
    assert again.equals(xgboost_planted)


def test_random_forest_is_deterministic_for_a_seed_and_the_seed_matters(
    planted, random_forest_planted
):
    again = RandomForestForecaster(RF_QUICK).fit(planted).predict(planted)
    assert again.equals(random_forest_planted)
    other = dataclasses.replace(RF_QUICK, seed=RF_QUICK.seed + 1)
    reseeded = RandomForestForecaster(other).fit(planted).predict(planted)
    for column in ("p_up", "q10", "sigma", "ret_30"):
        assert not np.allclose(reseeded[column], random_forest_planted[column]), column


def test_xgboost_is_deterministic_for_a_seed_and_the_seed_matters(planted, xgboost_planted):
    """XGB_QUICK keeps the default subsample and colsample_bytree 0.8, which the seed draws:
    every booster's predictions move with it."""
    again = XGBoostForecaster(XGB_QUICK).fit(planted).predict(planted)
    assert again.equals(xgboost_planted)
    assert XGB_QUICK.subsample < 1 and XGB_QUICK.colsample_bytree < 1
    other = dataclasses.replace(XGB_QUICK, seed=XGB_QUICK.seed + 1)
    reseeded = XGBoostForecaster(other).fit(planted).predict(planted)
    for column in (c for t in ALL_TARGETS for c in SPEC.prediction_columns(t)):
        assert not np.allclose(reseeded[column], xgboost_planted[column]), column


def test_random_forest_quantiles_match_a_brute_force_weighted_quantile():
    rng = np.random.default_rng(3)
    x_train, x = rng.normal(size=(40, 2)), rng.normal(size=(9, 2))
    x_train[rng.random(x_train.shape) < 0.1] = np.nan
    y = rng.normal(size=40)  # noise, so the leaves mix labels
    y[:4] = y[4:8]  # ties
    forest = RandomForestRegressor(
        n_estimators=7, min_samples_leaf=3, max_samples=0.5, random_state=0
    ).fit(x_train, y)
    levels = [0.1, 0.37, 0.5, 0.9]
    got = forest_quantiles(forest, training_leaf_weights(forest, x_train), y, x, levels)
    # Meinshausen's weights, one tree and one row at a time
    weights = np.zeros((len(x), len(y)))
    for tree in forest.estimators_:
        train_leaf, leaf = tree.apply(x_train), tree.apply(x)
        for r in range(len(x)):
            same = train_leaf == leaf[r]
            weights[r, same] += 1.0 / same.sum() / len(forest.estimators_)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    for r in range(len(x)):
        for j, level in enumerate(levels):
            cdf = np.array([weights[r, y <= v].sum() for v in y])
            expected = min(v for v, f in zip(y, cdf, strict=True) if f >= level - 1e-12)
            assert got[r, j] == expected, (r, level)
    assert (np.diff(got, axis=1) >= 0).all()


def _without_flat_training_rows(data: FoldData) -> FoldData:
    drop = (pl.col("split") == "train") & (pl.col(SPEC.direction) == 1)
    rows = data.rows.with_columns(
        pl.when(drop).then(None).otherwise(pl.col(SPEC.direction)).alias(SPEC.direction)
    )
    assert rows.filter(pl.col("split") == "test")[SPEC.direction].eq(1).any()
    return data.replace(key="no-flat", rows=rows)


@pytest.mark.parametrize(
    "model",
    [RandomForestForecaster(RF_QUICK), XGBoostForecaster(XGB_QUICK)],
    ids=["random_forest", "xgboost"],
)
def test_random_forest_and_xgboost_handle_a_direction_class_missing_from_training(planted, model):
    data = _without_flat_training_rows(planted)
    pred = model.fit(data).predict(data)
    p = pred.select("p_down", "p_flat", "p_up").to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (p > 0).all()
    assert (p[:, 1] < 0.02).all()  # the unseen class gets about the floor
    test = _labelled_test(data, pred)
    loss = log_loss(
        test[SPEC.direction].to_numpy(), test.select("p_down", "p_flat", "p_up").to_numpy()
    )
    assert math.isfinite(loss) and loss < 3.0


@pytest.mark.parametrize(
    "make", [lambda: RandomForestForecaster(RF_QUICK), lambda: XGBoostForecaster(XGB_QUICK)],
    ids=["random_forest", "xgboost"],
)  # fmt: skip
def test_random_forest_and_xgboost_reject_too_few_training_labels(planted, make):
    rows = planted.rows.with_columns(
        pl.when(pl.col("split") == "train").then(None).otherwise(SPEC.sigma).alias(SPEC.sigma)
    )
    with pytest.raises(ValueError, match="fwd_vol_30.*longer history"):
        make().fit(planted.replace(key="sparse", rows=rows))


def test_xgboost_rejects_too_few_validation_labels(planted):
    rows = planted.rows.with_columns(
        pl.when(pl.col("split") == "val").then(None).otherwise(SPEC.quantile).alias(SPEC.quantile)
    )
    with pytest.raises(ValueError, match="fwd_ret_90.*0 validation rows.*longer history"):
        XGBoostForecaster(XGB_QUICK).fit(planted.replace(key="sparse", rows=rows))


def test_random_forest_and_xgboost_predict_before_fit_name_the_fix(planted):
    for model in (RandomForestForecaster(RF_QUICK), XGBoostForecaster(XGB_QUICK)):
        with pytest.raises(RuntimeError, match="call fit"):
            model.predict(planted)
