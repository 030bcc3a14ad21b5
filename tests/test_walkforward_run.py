"""Putting a fold's predictions together: seed means, and ensembles whose weights come from
earlier folds' out-of-sample rows only."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from ml.forecasters import TargetSpec
from ml.walkforward_run import prediction_columns, seed_means, with_ensembles

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
