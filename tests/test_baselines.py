"""The direction baselines' building blocks (ml/baselines.py), which the climatology and
persistence forecasters use."""

import numpy as np
import polars as pl

from ml.baselines import Persistence, climatology
from ml.labels import LabelConfig


def test_climatology_gives_every_row_the_smoothed_training_frequencies():
    p = climatology(np.array([0, 0, 2, 2, 2, 1]), n_rows=4)
    # counts 2/1/3 plus one each, over 9
    np.testing.assert_allclose(p, np.tile([3 / 9, 2 / 9, 4 / 9], (4, 1)))


def test_persistence_maps_the_trailing_direction_through_training_frequencies():
    cfg = LabelConfig()
    trailing = np.log([1.2, 1.2, 0.8, 0.8, 1.0, 1.0])  # up, up, down, down, flat, flat
    nxt = [2, 2, 0, 2, 1, 1]
    train = pl.DataFrame({"log_ret_90": trailing, "direction_90": nxt})
    pers = Persistence(cfg).fit(train, "direction_90")
    p = pers.predict_proba(train)
    assert p.shape == (6, 3)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0].argmax() == 2  # after an up window, up was most frequent
    assert p[2][0] == p[2][2]  # after down: one down, one up
