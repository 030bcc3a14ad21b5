"""TBPTT trainer: schedule, learning, determinism, exact resume after a kill, NaN guard."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss
from ml.trainer import AugmentConfig, Sequences, TrainConfig, Trainer, lr_factor

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, and a shared machine
    yield
    torch.set_num_threads(threads)


def toy_sequences(lanes: int, steps: int, seed: int) -> Sequences:
    """Targets depend on features three steps back: only a model with memory can fit them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lanes, steps, N_FEATURES, generator=g)
    lagged = torch.roll(x[..., 0], 3, dims=1)
    lagged[:, :3] = float("nan")
    ret = torch.stack([0.5 * lagged, 0.2 * lagged], dim=-1)
    direction = torch.where(lagged > 0.4, 2, torch.where(lagged < -0.4, 0, 1))
    direction[:, :3] = -1
    return Sequences(x, {"returns": ret, "direction": direction})


def make_model(seed: int = 0) -> tuple[Forecaster, MultiTaskLoss]:
    torch.manual_seed(seed)
    cfg = BackboneConfig.preset("tiny", N_FEATURES, horizons=(1, 5))
    return Forecaster(cfg), MultiTaskLoss()


def quick_cfg(**kw) -> TrainConfig:
    base = {
        "tbptt_len": 32,
        "epochs": 3,
        "lr": 3e-3,
        "warmup_steps": 2,
        "patience": 10,
        "progress": False,
        "seed": 5,
    }
    return TrainConfig(**{**base, **kw})


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 10, 100, 1e-4) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[100] == pytest.approx(1e-4)


def test_training_lowers_validation_loss_and_cuts_gradients_at_chunk_boundaries():
    model, loss = make_model()
    train, val = toy_sequences(4, 256, 0), toy_sequences(2, 128, 1)
    carried_grad: list[bool] = []
    trainer = Trainer(
        model,
        loss,
        train,
        val,
        quick_cfg(epochs=6),
        on_step=lambda _: carried_grad.append(
            any(t.requires_grad for t in _tensors(trainer.carried))
        ),
    )
    before = trainer.evaluate(val)
    result = trainer.fit()
    assert result.best_val_loss < before - 0.1
    assert result.steps == 6 * 8 and result.skipped_steps == 0
    assert len(result.history) == 6
    assert len(carried_grad) == 48 and not any(carried_grad)


def test_same_seed_gives_identical_weights():
    runs = []
    for _ in range(2):
        model, loss = make_model()
        Trainer(
            model,
            loss,
            toy_sequences(2, 128, 0),
            toy_sequences(1, 64, 1),
            quick_cfg(augment=AugmentConfig(noise_std=0.1, feature_dropout=0.1)),
        ).fit()
        runs.append(model.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


KILLED_RUN = """
import os, signal, sys
import torch
sys.path.insert(0, sys.argv[2])
from tests.test_trainer import make_model, quick_cfg, toy_sequences
from ml.trainer import Trainer
torch.set_num_threads(1)
model, loss = make_model()
kill_at = int(sys.argv[3])
def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(model, loss, toy_sequences(2, 128, 0), toy_sequences(1, 64, 1),
        quick_cfg(checkpoint_every=1), checkpoint_dir=sys.argv[1], on_step=on_step).fit()
"""


def test_resuming_after_a_kill_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    model, loss = make_model()
    Trainer(model, loss, toy_sequences(2, 128, 0), toy_sequences(1, 64, 1), quick_cfg()).fit()
    expected = model.state_dict()

    ckpt = tmp_path / "ckpt"
    kill_at = 6  # mid second epoch (4 chunks per epoch): resume must restore the carried state
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(ckpt), str(ROOT), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["position"].tolist()[:3] == [1, 2, kill_at]

    model, loss = make_model(seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(
        model,
        loss,
        toy_sequences(2, 128, 0),
        toy_sequences(1, 64, 1),
        quick_cfg(),
        checkpoint_dir=ckpt,
    )
    result = trainer.fit()
    assert result.steps == 3 * 4
    got = model.state_dict()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_a_non_finite_step_is_skipped_and_the_rate_backs_off():
    train = toy_sequences(2, 128, 0)
    train.x[:, 40:50] = float("nan")  # poisons the second chunk only
    model, loss = make_model()
    trainer = Trainer(model, loss, train, toy_sequences(1, 64, 1), quick_cfg(epochs=1))
    result = trainer.fit()
    assert result.skipped_steps == 1
    assert trainer.lr_scale == pytest.approx(0.5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result.best_val_loss)


def test_augmentation_touches_training_chunks_only():
    model, loss = make_model()
    val = toy_sequences(1, 64, 1)
    plain = Trainer(model, loss, toy_sequences(2, 64, 0), val, quick_cfg())
    noisy = Trainer(
        model,
        loss,
        toy_sequences(2, 64, 0),
        val,
        quick_cfg(augment=AugmentConfig(noise_std=0.5, magnitude_warp=0.2, feature_dropout=0.3)),
    )
    assert noisy.evaluate(val) == plain.evaluate(val)
    x = torch.ones(2, 8, N_FEATURES)
    assert torch.equal(plain._augment(x), x)
    assert not torch.equal(noisy._augment(x), x)


def test_bad_config_and_shapes_are_refused():
    with pytest.raises(ValueError, match="tbptt_len"):
        TrainConfig(tbptt_len=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="target 'returns'"):
        Sequences(torch.zeros(2, 10, 3), {"returns": torch.zeros(2, 9, 1)})


def _tensors(state) -> list[torch.Tensor]:
    """Every tensor inside a nested recurrent state."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (list, tuple)):
        return [t for s in state for t in _tensors(s)]
    if hasattr(state, "__dataclass_fields__"):
        return [t for name in state.__dataclass_fields__ for t in _tensors(getattr(state, name))]
    return []
