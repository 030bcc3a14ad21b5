from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from ml.dataset import TEST, TRAIN, VAL, SplitConfig, Standardizer, assign_splits, split_boundaries
from ml.labels import compute_labels


@pytest.fixture(scope="module")
def split(synthetic_ohlcv):
    labels = compute_labels(synthetic_ohlcv)
    cfg = SplitConfig(val_fraction=0.2, test_fraction=0.2, embargo_days=5)
    bounds = split_boundaries(labels["ts"], cfg)
    return labels, bounds, assign_splits(labels, bounds)


def test_segments_are_in_time_order(split):
    _, b, data = split
    tr, va, te = (data.filter(pl.col("split") == s) for s in (TRAIN, VAL, TEST))
    assert tr["ts"].max() < b.val_start <= va["ts"].min()
    assert va["ts"].max() < b.test_start <= te["ts"].min()


def test_no_training_label_window_reaches_validation_or_test(split):
    _, b, data = split
    tr = data.filter(pl.col("split") == TRAIN)
    va = data.filter(pl.col("split") == VAL)
    assert tr["label_end_ts"].max() < b.val_start - timedelta(days=5)
    assert va["label_end_ts"].max() < b.test_start - timedelta(days=5)


def test_purge_removes_the_rows_just_before_each_boundary(split):
    labels, b, data = split
    purged = labels.join(data.select(["symbol", "ts"]), on=["symbol", "ts"], how="anti")
    before_val = purged.filter(pl.col("ts") < b.val_start)
    # every symbol loses at least its 90-bar label horizon before the validation start
    for (_symbol,), g in before_val.group_by("symbol"):
        assert g.height >= 90
    assert purged.filter(pl.col("ts") >= b.test_start).height == 0


def test_standardizer_uses_training_rows_only():
    train = pl.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]})
    test = pl.DataFrame({"a": [1000.0], "b": [7.0]})
    sc = Standardizer.fit(train, ["a", "b"])
    assert sc.mean == [2.0, 5.0]
    assert sc.std == [1.0, 1.0]  # constant column falls back to 1 instead of dividing by zero
    np.testing.assert_allclose(sc.transform(test), [[998.0, 2.0]])
    assert Standardizer.from_json(sc.to_json()) == sc


@pytest.mark.parametrize(
    "kwargs",
    [{"val_fraction": 0.0}, {"test_fraction": 0.6, "val_fraction": 0.4}, {"embargo_days": -1}],
)
def test_invalid_split_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        SplitConfig(**kwargs)


def test_too_little_data_is_refused(synthetic_ohlcv):
    few = synthetic_ohlcv.head(10)
    with pytest.raises(ValueError, match="at least 50"):
        split_boundaries(few["ts"], SplitConfig())
