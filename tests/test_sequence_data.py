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


def test_lanes_are_padded_per_symbol_and_segments_mark_where_targets_count():
    lanes = build_lanes(*_frames(), ["f1", "f2"], (1, 2), "direction_2", "fwd_ret_2", "fwd_vol_2")
    assert lanes.symbols == ["A", "B"] and lanes.x.shape == (2, 30, 2)
    seg = lanes.segment
    assert int(seg[1, 25]) == -1  # padding after B's 20 bars
    assert int(seg[0, 14]) == 0  # the purged row is an input without targets
    assert int(seg[0, 0]) == SEGMENT_CODE[TRAIN] and int(seg[0, 29]) == SEGMENT_CODE[TEST]
    train = lanes.sequences(TRAIN)
    val = lanes.sequences(VAL)
    assert val.x.shape[1] > train.x.shape[1]  # validation keeps the training bars as warm-up
    x, targets = val.chunk(0, val.length)
    scored = ~torch.isnan(targets["returns"][..., 0])
    assert torch.equal(scored, seg[:, : val.length] == SEGMENT_CODE[VAL])
    assert (targets["direction"][~scored] == -1).all()


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
    assert np.allclose(again.x[:, :20].numpy(), lanes.x[:, :20].numpy())
