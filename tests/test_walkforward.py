"""Walk-forward folds: consecutive test windows, validation before them, whole label windows
purged, and every prediction made by a model that never saw its rows."""

from datetime import datetime, timedelta

import polars as pl
import pytest

from ml.dataset import TEST, TRAIN, VAL
from ml.walkforward import (
    WalkForwardConfig,
    assign_fold,
    fold_for_key,
    walk_forward_folds,
)


def _rows(start="2015-01-01", days=3000, horizon=90, symbols=("A", "B")) -> pl.DataFrame:
    frames = []
    for s in symbols:
        ts = pl.datetime_range(
            datetime.fromisoformat(start),
            datetime.fromisoformat(start) + timedelta(days=days - 1),
            "1d",
            eager=True,
        )
        frames.append(
            pl.DataFrame({"symbol": s, "ts": ts}).with_columns(
                label_end_ts=pl.col("ts").shift(-horizon)
            )
        )
    return pl.concat(frames)


def test_folds_tile_the_test_period_and_every_test_row_is_in_exactly_one_fold():
    rows = _rows()
    folds = walk_forward_folds(rows, WalkForwardConfig())
    keys = [f.key for f in folds]
    assert keys == [str(y) for y in range(int(keys[0]), 2023 + 1)]
    tested = pl.concat(
        [assign_fold(rows, f).filter(pl.col("split") == TEST).select("symbol", "ts") for f in folds]
    )
    assert tested.is_unique().all()
    first_test = datetime(int(keys[0]), 1, 1)
    assert tested.height == rows.filter(pl.col("ts") >= first_test).height


def test_training_and_validation_label_windows_end_before_the_next_segment_minus_embargo():
    rows = _rows()
    cfg = WalkForwardConfig(embargo_days=7)
    for fold in walk_forward_folds(rows, cfg):
        part = assign_fold(rows, fold)
        train = part.filter(pl.col("split") == TRAIN)
        val = part.filter(pl.col("split") == VAL)
        test = part.filter(pl.col("split") == TEST)
        assert train["label_end_ts"].max() < fold.val_start - timedelta(days=7)
        assert val["label_end_ts"].max() < fold.test_start - timedelta(days=7)
        # the gap is at least the label horizon (90 daily bars) plus the embargo
        assert (fold.val_start - train["ts"].max()).days >= 90 + 7
        assert (fold.test_start - val["ts"].max()).days >= 90 + 7
        assert test["ts"].min() >= fold.test_start and test["ts"].max() < fold.test_end
        assert val["ts"].min() >= fold.val_start


def test_a_rolling_window_starts_train_days_before_validation():
    rows = _rows()
    cfg = WalkForwardConfig(window="rolling", train_days=900)
    fold = fold_for_key("2021", cfg, rows["ts"].min())
    train = assign_fold(rows, fold).filter(pl.col("split") == TRAIN)
    assert train["ts"].min() == datetime(2021, 1, 1) - timedelta(days=365 + 900)


def test_quarterly_folds_are_keyed_by_their_first_month():
    rows = _rows(days=2200)
    folds = walk_forward_folds(rows, WalkForwardConfig(step_months=3))
    assert folds[0].key.endswith(("-01", "-04", "-07", "-10"))
    assert all(
        (b.test_start - a.test_start).days in (90, 91, 92)
        for a, b in zip(folds, folds[1:], strict=False)
    )


def test_folds_without_enough_training_rows_are_left_out():
    rows = _rows(days=900)
    folds = walk_forward_folds(rows, WalkForwardConfig(min_train_rows=400))
    # 2015-01-01 + 900 days: only 2017 has 365 validation days and >= 400 training rows before
    assert [f.key for f in folds] == ["2017"]
    with pytest.raises(ValueError, match="No walk-forward fold"):
        walk_forward_folds(rows, WalkForwardConfig(min_train_rows=5000))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step_months": 5}, "divisor of 12"),
        ({"window": "sliding"}, "expanding"),
        ({"window": "rolling", "train_days": 100}, "train_days"),
        ({"val_days": 3}, "val_days"),
    ],
)
def test_bad_walk_forward_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WalkForwardConfig(**kwargs)


def test_a_key_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="does not match"):
        fold_for_key("2021-04", WalkForwardConfig(), datetime(2015, 1, 1))
    with pytest.raises(ValueError, match="not a window start"):
        fold_for_key("2021-02", WalkForwardConfig(step_months=3), datetime(2015, 1, 1))


def test_purge_on_real_labels_removes_every_symbols_last_label_horizon_before_each_boundary(
    synthetic_ohlcv,
):
    from ml.labels import compute_labels

    labels = compute_labels(synthetic_ohlcv)
    fold = fold_for_key("2021", WalkForwardConfig(), labels["ts"].min())
    kept = assign_fold(labels, fold)
    window = labels.filter(pl.col("ts") < fold.test_end)
    purged = window.join(kept.select(["symbol", "ts"]), on=["symbol", "ts"], how="anti")
    for boundary in (fold.val_start, fold.test_start):
        before = purged.filter(
            (pl.col("ts") < boundary) & (pl.col("ts") >= boundary - timedelta(days=200))
        )
        # every symbol (daily BTC, business-day stocks) loses at least its 90 bars before it
        for (_symbol,), g in before.group_by("symbol"):
            assert g.height >= 90
    assert (
        kept.filter(pl.col("split") == TEST).height
        == window.filter(pl.col("ts") >= fold.test_start).height
    )
