"""Sequence forecasters (Mamba2 and the recurrent / attention baselines) behind the forecaster
contract: the same lanes, trainer, heads and prediction columns."""

import numpy as np
import polars as pl
import pytest

from ml.forecasters import ALL_TARGETS, TargetSpec
from ml.forecasters.neural import SEQUENCE_MODELS, SequenceForecaster, SequenceSettings

FAST = SequenceSettings(epochs=1, tbptt_len=256, patience=1)


def _columns(targets: TargetSpec) -> list[str]:
    return [c for t in ALL_TARGETS for c in targets.prediction_columns(t)]


@pytest.mark.parametrize("kind", list(SEQUENCE_MODELS))
def test_sequence_forecaster_predicts_every_scored_row_with_every_target(synthetic_fold, kind):
    f = SequenceForecaster(kind, seed=0, settings=FAST).fit(synthetic_fold)
    pred = f.predict(synthetic_fold)
    scored = synthetic_fold.scored
    assert pred.select(["symbol", "ts"]).equals(scored.select(["symbol", "ts"]))
    cols = _columns(synthetic_fold.targets)
    assert set(cols) <= set(pred.columns)
    values = pred.select(cols).to_numpy()
    assert np.isfinite(values).all()
    np.testing.assert_allclose(pred.select(["p_down", "p_flat", "p_up"]).sum_horizontal(), 1, 1e-5)
    assert (pred["q10"] <= pred["q90"]).all() and (pred["sigma"] > 0).all()
    assert f.summary["steps"] > 0


def test_sequence_forecast_at_t_ignores_later_bars(synthetic_fold):
    """A prediction at t uses bars up to t only: cutting every input after t changes nothing
    before it (the model is the same, fitted once)."""
    f = SequenceForecaster("mamba2", seed=0, settings=FAST).fit(synthetic_fold)
    full = f.predict(synthetic_fold)
    cut = synthetic_fold.scored["ts"].sort()[len(synthetic_fold.scored) // 2]
    fold = synthetic_fold
    short = fold.replace(
        rows=fold.rows.filter(pl.col("ts") <= cut),
        bars=fold.bars.filter(pl.col("ts") <= cut),
        inputs=fold.inputs.filter(pl.col("ts") <= cut),
    )
    part = f.predict(short)
    same = full.join(part, on=["symbol", "ts"], suffix="_cut")
    assert same.height == part.height > 100
    np.testing.assert_allclose(same["p_up"], same["p_up_cut"], atol=1e-5)
    np.testing.assert_allclose(same["sigma"], same["sigma_cut"], rtol=1e-4)


def test_sequence_forecaster_is_deterministic_for_a_seed(synthetic_fold):
    a = SequenceForecaster("gru", seed=3, settings=FAST).fit(synthetic_fold).predict(synthetic_fold)
    b = SequenceForecaster("gru", seed=3, settings=FAST).fit(synthetic_fold).predict(synthetic_fold)
    assert a.equals(b)
