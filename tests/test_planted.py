"""The whole learning path can learn: a planted signal is recovered, and nothing is "found"
without it (`pytest -k mamba_planted`).

The synthetic market's planted option (warehouse/sources/synthetic.py) puts a known, modest
predictable component into BTC-USD's future returns and volatility, driven by a driver that
is published in the on-chain data (tx_count relative to active addresses). Everything runs
through the product's own path: the synthetic sources, `ml.features`, `ml.labels`, the
walk-forward purge (`fold_data`), the lanes, the TBPTT trainer, the heads and `predict`, with
Mamba2 as the mean of three seeds (as the evaluation compares neural models), LightGBM,
climatology and EWMA(0.94) on the same test rows, and the evaluation's tests (Diebold-Mariano
with HAC lags of 2(h-1), a moving-block bootstrap of the mean loss difference).

Sized for CI: one symbol, 10-bar labels (the synthetic market runs to 2040, so the test window
is long, 2028-2040, which costs only prediction), about half a minute per strength.
"""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.features import FeatureConfig, compute_features, model_feature_columns
from ml.forecasters import REGISTRY, TargetSpec, fold_data
from ml.forecasters.neural import SequenceForecaster, SequenceSettings
from ml.labels import LabelConfig, compute_labels
from ml.metrics import log_loss_per_row, sigma_qlike_per_row
from ml.significance import compare
from ml.walkforward import Fold
from ml.walkforward_run import seed_means, to_long
from warehouse.sources import make_source

START, END = datetime(2012, 1, 1), datetime(2041, 1, 1)
LABELS = LabelConfig(horizons=(1, 5, 10), direction_horizon=10, vol_window=10, path_horizon=10)
# train 2012-2026, validate (early stopping) on 2027, test 2028-2040
FOLD = Fold("2028", START, datetime(2027, 1, 1), datetime(2028, 1, 1), END, timedelta(days=2))
SEEDS = (0, 1, 2)
STRENGTH = 2.0  # the planted strength for the recovery test (1 = the documented default)


def _losses(planted: float) -> tuple[dict[str, dict[str, np.ndarray]], pl.DataFrame]:
    """Per-row test losses of every forecaster (direction log loss, sigma QLIKE) and the rows."""
    options = {"planted": planted}
    ohlcv = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), **options).fetch(START, END)
    onchain = make_source("onchain", "synthetic", **options).fetch(START, END)
    macro = make_source("macro", "synthetic", **options).fetch(START, END)
    features = compute_features(ohlcv, onchain, macro)
    columns = [c for c in model_feature_columns(FeatureConfig()) if c in features.columns]
    rows = (
        features.select(["symbol", "ts", *columns])
        .join(ohlcv.select(["symbol", "ts", "open", "high", "low", "close"]), on=["symbol", "ts"])
        .join(compute_labels(ohlcv, LABELS), on=["symbol", "ts"])
        .drop_nulls(columns)
        .sort(["symbol", "ts"])
    )
    targets = TargetSpec.from_label_config(LABELS)
    data = fold_data(rows, ohlcv, FOLD, columns, targets)
    long = []
    for name in ("climatology", "ewma", "lightgbm"):
        pred = REGISTRY[name]().fit(data).predict(data)
        long.append(to_long(pred, name, None, data.key, data.scored, targets))
    settings = SequenceSettings()  # the defaults: the recipe under test
    for seed in SEEDS:
        pred = SequenceForecaster("mamba2", seed, settings).fit(data).predict(data)
        long.append(to_long(pred, "mamba2", seed, data.key, data.scored, targets))
    long = pl.concat(long)
    long = pl.concat([long.filter(pl.col("seed").is_null()), seed_means(long)])
    test = (
        data.rows.filter(pl.col("split") == "test")
        .drop_nulls([targets.direction, targets.sigma])
        .select("symbol", "ts", targets.direction, targets.sigma)
    )
    losses: dict[str, dict[str, np.ndarray]] = {"direction": {}, "sigma": {}}
    for (name,), part in long.filter(pl.col("seed").is_null()).group_by(
        "forecaster", maintain_order=True
    ):
        d = test.join(part, on=["symbol", "ts"], how="left", maintain_order="left")
        assert d.height == test.height
        if d["p_up"].null_count() == 0:
            probs = d.select(["p_down", "p_flat", "p_up"]).to_numpy()
            losses["direction"][name] = log_loss_per_row(d[targets.direction].to_numpy(), probs)
        if d["sigma"].null_count() == 0:
            losses["sigma"][name] = sigma_qlike_per_row(
                d[targets.sigma].to_numpy(), d["sigma"].to_numpy()
            )
    return losses, test


def _comparisons(planted: float) -> pl.DataFrame:
    losses, test = _losses(planted)
    h = LABELS.direction_horizon  # = vol_window: both labels look 10 bars ahead
    frames = [
        compare(
            losses[target], model, [baseline], h, test["ts"], test["symbol"], seed=0
        ).with_columns(target=pl.lit(target))
        for target, baseline in (("direction", "climatology"), ("sigma", "ewma"))
        for model in ("mamba2", "lightgbm")
    ]
    out = pl.concat(frames)
    print(out.select("target", "model", "baseline", "mean_diff", "ci_low", "ci_high", "dm_p_value"))
    return out


def test_mamba_planted_signal_is_recovered_and_beats_the_baselines_significantly():
    """With the planted signal on, Mamba2 beats climatology on direction log loss and EWMA on
    sigma QLIKE, and so does LightGBM: the bootstrap interval of the mean loss difference lies
    below zero and the Diebold-Mariano test rejects equal loss at 5%. (LightGBM's sigma margin
    is the thinnest: p = 0.023 on this machine; see ml/forecasters/lightgbm.py for why its
    sigma trees are stumps.)"""
    rows = _comparisons(STRENGTH)
    assert rows.height == 4
    for r in rows.iter_rows(named=True):
        what = f"{r['model']} vs {r['baseline']} on {r['target']}: {r}"
        assert r["mean_diff"] < 0, what
        assert r["ci_high"] < 0, what
        assert r["dm_p_value"] < 0.05, what


def test_mamba_planted_off_no_model_claims_to_beat_the_baselines():
    """The same path on the unplanted market: no model's advantage is significant, so a
    significant result above is the signal, not an artefact of the path or the tests."""
    rows = _comparisons(0.0)
    for r in rows.iter_rows(named=True):
        what = f"{r['model']} vs {r['baseline']} on {r['target']}: {r}"
        claims = r["ci_high"] < 0 and r["dm_p_value"] < 0.05 and r["mean_diff"] < 0
        assert not claims, what


@pytest.mark.parametrize("planted", [0.0, STRENGTH])
def test_mamba_planted_fold_keeps_test_rows_out_of_training(planted):
    """The test window is scored only: the fold's training and validation rows end, with
    their whole label windows, before it (the purge the comparisons rely on)."""
    ohlcv = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), planted=planted).fetch(
        START, datetime(2030, 1, 1)
    )
    labels = compute_labels(ohlcv, LABELS)
    rows = ohlcv.join(labels, on=["symbol", "ts"]).with_columns(f=pl.lit(0.0))
    data = fold_data(rows, ohlcv, FOLD, ["f"], TargetSpec.from_label_config(LABELS))
    fitted = data.rows.filter(pl.col("split").is_in(["train", "val"]))
    assert fitted["label_end_ts"].max() < FOLD.test_start
    assert data.rows.filter(pl.col("split") == "test")["ts"].min() >= FOLD.test_start
