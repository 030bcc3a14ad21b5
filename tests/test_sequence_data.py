from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from ml.dataset import TEST, TRAIN, VAL
from ml.sequence_data import SEGMENT_CODE, build_lanes


def _frames():
    rows = []
    for symbol, n in (("A", 30), ("B", 20)):
        for i in range(n):
            split = TRAIN if i < n // 2 else VAL if i < 3 * n // 4 else TEST
            rows.append(
                {
                    "symbol": symbol,
                    "ts": datetime(2021, 1, 1) + timedelta(days=i),
                    "f1": float(i) if symbol == "A" else 100.0 + i,
                    "f2": float(i % 3),
                    "split": split if i != n // 2 - 1 else None,
                }
            )  # one purged row
    df = pl.DataFrame(rows)
    features = df.select(["symbol", "ts", "f1", "f2"])
    labels = df.select(["symbol", "ts"]).with_columns(
        direction_2=pl.lit(2, pl.Int8),
        fwd_ret_1=pl.lit(0.01),
        fwd_ret_2=pl.lit(0.02),
        fwd_vol_2=pl.lit(0.1),
    )
    splits = df.filter(pl.col("split").is_not_null()).select(["symbol", "ts", "split"])
    return features, labels, splits


def test_lanes_are_aligned_by_date_and_segments_mark_where_targets_count():
    lanes = build_lanes(*_frames(), ["f1", "f2"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2")
    assert lanes.symbols == ["A", "B"] and len(lanes.groups) == 1  # one calendar: every day
    (group,) = lanes.groups
    assert group.x.shape == (2, 30, 2)
    seg = group.segment
    assert int(seg[1, 25]) == -1  # no bar: B ends after 20 days
    assert int(seg[0, 14]) == 0  # the purged row is an input without targets
    assert int(seg[0, 0]) == SEGMENT_CODE[TRAIN] and int(seg[0, 29]) == SEGMENT_CODE[TEST]
    (train,) = lanes.sequences(TRAIN)
    (val,) = lanes.sequences(VAL)
    assert val.x.shape[1] > train.x.shape[1]  # validation keeps the training bars as warm-up
    x, targets = val.chunk(0, val.length)
    scored = ~torch.isnan(targets["returns"][..., 0])
    assert torch.equal(scored, seg[:, : val.length] == SEGMENT_CODE[VAL])
    assert (targets["direction"][~scored] == -1).all()


def _business_and_daily():
    """A crypto lane (every day) and a stock lane (weekdays) over the same weeks."""
    rows = []
    start = datetime(2021, 1, 4)  # a Monday
    for i in range(56):
        ts = start + timedelta(days=i)
        for symbol in ("BTC", "STK"):
            if symbol == "STK" and ts.weekday() >= 5:
                continue
            split = TRAIN if i < 28 else VAL if i < 42 else TEST
            rows.append({"symbol": symbol, "ts": ts, "f1": float(i), "split": split})
    df = pl.DataFrame(rows)
    labels = df.select(["symbol", "ts"]).with_columns(
        direction_2=pl.lit(1, pl.Int8),
        fwd_ret_1=pl.lit(0.0),
        fwd_ret_2=pl.lit(0.0),
        fwd_vol_2=pl.lit(0.1),
    )
    return df.select(["symbol", "ts", "f1"]), labels, df.select(["symbol", "ts", "split"])


def test_lanes_of_different_calendars_run_in_their_own_groups_aligned_by_date():
    lanes = build_lanes(
        *_business_and_daily(), ["f1"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2"
    )
    crypto, stock = lanes.groups
    assert crypto.symbols == ["BTC"] and stock.symbols == ["STK"]
    assert crypto.x.shape[1] == 56 and stock.x.shape[1] == 40  # no weekend holes in the stock
    # the last training bar of each lane is the last bar before the validation dates: by date,
    # not by index (index 27 would be a stock bar five weeks into validation)
    for group in lanes.groups:
        seq = group.sequences(TRAIN)
        last = group.calendar[seq.length - 1]
        assert last < datetime(2021, 2, 1) <= group.calendar[seq.length]
    # no training step runs through bars with no target of any lane: the stock's training
    # sequence stops at its own last training bar
    assert lanes.sequences(TRAIN)[1].length == 20


def test_the_scaler_sees_training_rows_only():
    features, labels, splits = _frames()
    lanes = build_lanes(
        features, labels, splits, ["f1", "f2"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2"
    )
    train_rows = features.join(splits.filter(pl.col("split") == TRAIN), on=["symbol", "ts"])
    assert lanes.scaler.mean[0] == pytest.approx(train_rows["f1"].mean())
    # a huge value in the test period does not move the scaler
    bumped = features.with_columns(
        f1=pl.when(pl.col("ts") > datetime(2021, 1, 25)).then(1e9).otherwise(pl.col("f1"))
    )
    again = build_lanes(
        bumped, labels, splits, ["f1", "f2"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2"
    )
    assert again.scaler.mean == lanes.scaler.mean
    x, x_again = lanes.groups[0].x, again.groups[0].x
    assert np.allclose(x_again[:, :20].numpy(), x[:, :20].numpy())


def test_per_lane_normalization_uses_each_lanes_own_training_rows():
    features, labels, splits = _frames()
    lanes = build_lanes(
        features,
        labels,
        splits,
        ["f1", "f2"],
        (1, 2),
        "direction_2",
        "fwd_ret_2",
        "fwd_vol_2",
        per_lane=True,
    )
    train = features.join(splits.filter(pl.col("split") == TRAIN), on=["symbol", "ts"])
    for symbol in ("A", "B"):
        own = train.filter(pl.col("symbol") == symbol)["f1"]
        assert lanes.lane_scalers[symbol].mean[0] == pytest.approx(own.mean())
    x = lanes.groups[0].x
    # B's f1 sits 100 above A's: per lane, both lanes' training rows are centred on 0
    for b in range(2):
        seg = lanes.groups[0].segment[b]
        assert float(x[b, seg == SEGMENT_CODE[TRAIN], 0].mean()) == pytest.approx(0, abs=1e-5)
    pooled = build_lanes(
        features, labels, splits, ["f1", "f2"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2"
    )
    assert pooled.lane_scalers is None
    assert float(pooled.groups[0].x[1, :5, 0].mean()) > 0.5  # B above the pooled mean
