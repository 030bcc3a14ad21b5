import numpy as np
import polars as pl

from ml.baselines import Persistence, climatology
from ml.gbm import DirectionGBM, GBMConfig
from ml.labels import LabelConfig
from ml.metrics import log_loss


def _planted(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3))
    score = 1.5 * x[:, 0] + rng.normal(0, 0.7, n)
    y = np.where(score > 0.6, 2, np.where(score < -0.6, 0, 1))
    return pl.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y})


def test_model_learns_a_planted_signal_and_beats_climatology_out_of_sample(tmp_path):
    train, val, test = _planted(3000, 0), _planted(800, 1), _planted(2000, 2)
    model = DirectionGBM.fit(train, val, ["a", "b", "c"], "y", GBMConfig(max_rounds=200))
    p = model.predict_proba(test)
    y = test["y"].to_numpy()
    clim = climatology(train["y"].to_numpy(), test.height)
    assert log_loss(y, p) < 0.8 * log_loss(y, clim)
    assert list(model.feature_importance())[0] == "a"
    model.save(tmp_path)
    again = DirectionGBM.load(tmp_path)
    np.testing.assert_allclose(again.predict_proba(test), p)


def test_training_is_deterministic_for_a_seed():
    train, val = _planted(1500, 0), _planted(400, 1)
    a = DirectionGBM.fit(train, val, ["a", "b", "c"], "y", GBMConfig(max_rounds=50))
    b = DirectionGBM.fit(train, val, ["a", "b", "c"], "y", GBMConfig(max_rounds=50))
    np.testing.assert_array_equal(a.predict_proba(val), b.predict_proba(val))


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
