"""Sequence forecasters (Mamba2 and the recurrent / attention baselines) behind the forecaster
contract: the same lanes, trainer, heads and prediction columns."""

import numpy as np
import polars as pl
import pytest
import torch

from ml.forecasters import ALL_TARGETS, TargetSpec
from ml.forecasters.neural import (
    SEQUENCE_MODELS,
    SequenceForecaster,
    SequenceSettings,
    is_onchain_column,
)
from ml.sequence_baselines import KINDS
from ml.sequence_names import SEQUENCE_BASELINE_NAMES, SEQUENCE_MODEL_NAMES

FAST = SequenceSettings(epochs=1, tbptt_len=256, patience=1)


def _columns(targets: TargetSpec) -> list[str]:
    return [c for t in ALL_TARGETS for c in targets.prediction_columns(t)]


def test_the_light_sequence_names_match_the_models():
    """The Dagster definitions take the model names from ml.sequence_names (no torch)."""
    assert tuple(SEQUENCE_MODELS) == SEQUENCE_MODEL_NAMES
    assert SEQUENCE_BASELINE_NAMES == KINDS


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


@pytest.mark.parametrize("kind", ["mamba2", "mamba1", "s4d", "attention_lstm"])
def test_sequence_forecast_at_t_ignores_later_bars(synthetic_fold, kind):
    """A prediction at t uses bars up to t only: cutting every input after t changes nothing
    before it (the model is the same, fitted once). S4D's FFT convolution would break this if
    its padding let the kernel wrap around."""
    f = SequenceForecaster(kind, seed=0, settings=FAST).fit(synthetic_fold)
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


def test_sequence_forecaster_is_deterministic_for_a_seed_and_the_seed_matters(synthetic_fold):
    """The seed draws the initial weights (FAST has no dropout, so the trainer draws nothing):
    another seed starts, trains and predicts otherwise."""

    def predictions(seed: int) -> pl.DataFrame:
        f = SequenceForecaster("gru", seed=seed, settings=FAST)
        return f.fit(synthetic_fold).predict(synthetic_fold)

    a = predictions(3)
    assert a.equals(predictions(3))
    other = predictions(4)
    for column in _columns(synthetic_fold.targets):
        assert not np.allclose(other[column], a[column]), column


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm, bf16
def test_predictions_run_in_the_precision_the_model_was_validated_in(synthetic_fold):
    """bf16 training validates under bf16 autocast, so it predicts under it too; the
    precision and device are part of the fitted model's summary (and the artifact version)."""
    bf16 = SequenceSettings(epochs=1, tbptt_len=256, patience=1, amp="bf16")
    f = SequenceForecaster("mamba2", seed=0, settings=bf16).fit(synthetic_fold)
    assert f.summary["precision"] == "bf16" and f.summary["device"] == "cpu"
    assert f.train_config().amp == "bf16"
    pred = f.predict(synthetic_fold)
    fp32 = SequenceForecaster("mamba2", seed=0, settings=FAST)
    fp32.model, fp32.scaler = f.model, f.scaler  # the same weights, predicted in fp32
    other = fp32.predict(synthetic_fold)
    assert not np.allclose(pred["p_up"], other["p_up"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(pred["p_up"], other["p_up"], atol=0.05)  # same model, rounding
    assert SequenceSettings(amp="bf16").to_json() != FAST.to_json()
    assert FAST.precision() == "fp32"


def test_the_fitted_summary_names_its_monitor_and_task_weights(synthetic_fold):
    f = SequenceForecaster("mamba2", seed=0, settings=FAST).fit(synthetic_fold)
    s = f.summary
    assert s["monitor"] == "direction" and s["best_val_loss"] == s["best_val"]["direction"]
    assert set(s["task_weights"]) == {"direction", "quantiles", "sigma", "returns"}


def test_a_windowed_encoder_restarts_its_state_every_window(synthetic_fold):
    """stateful=False: a forecast sees only the bars of its own tbptt window, so changing every
    input before that window changes nothing; the stateful default carries them in."""
    windowed = SequenceSettings(epochs=1, tbptt_len=64, patience=1, stateful=False)
    f = SequenceForecaster("mamba2", seed=0, settings=windowed).fit(synthetic_fold)
    assert f.train_config().stateful is False
    lanes = f._lanes(synthetic_fold, fitted=True)
    group = lanes.groups[0]
    f.model.eval()
    with torch.no_grad():
        x = group.x[:, :256]
        alone, _ = f.model(x[:, 192:256])
        noisy = x.clone()
        noisy[:, :192] = torch.randn_like(noisy[:, :192])
        outs = [f.model(part)[0]["sigma"] for part in noisy.split(64, dim=1)]
    torch.testing.assert_close(outs[-1], alone["sigma"])
    # predictions run the same windows: the last scored bar's forecast from its window alone
    pred = f.predict(synthetic_fold)
    b = group.symbols.index(pred["symbol"][-1])
    last = int(group.bars(b)[-1])
    start = last // 64 * 64
    with torch.no_grad():
        own, _ = f.model(group.x[b : b + 1, start : last + 1])
    assert pred["sigma"][-1] == pytest.approx(float(own["sigma"][0, -1]), rel=1e-5)


def test_inputs_can_leave_out_the_on_chain_columns(synthetic_fold):
    no_chain = SequenceSettings(epochs=1, tbptt_len=256, patience=1, onchain=False)
    f = SequenceForecaster("mamba2", seed=0, settings=no_chain)
    cols = f.feature_columns(synthetic_fold)
    dropped = set(synthetic_fold.feature_columns) - set(cols)
    assert dropped and all(is_onchain_column(c) for c in dropped)
    assert "tx_per_active_address" in dropped and not any(is_onchain_column(c) for c in cols)
    assert f.config(synthetic_fold).n_features == len(cols)
