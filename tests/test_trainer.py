"""TBPTT trainer: schedule, learning, determinism, exact resume after a kill, NaN guard."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss, TargetStats
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


def make_model(seed: int = 0, dropout: float = 0.0) -> tuple[Forecaster, MultiTaskLoss]:
    torch.manual_seed(seed)
    cfg = BackboneConfig.preset("tiny", N_FEATURES, horizons=(1, 5), dropout=dropout)
    return Forecaster(cfg), MultiTaskLoss()


# the resume test's two runs: plain, and with every random draw the trainer makes (the
# augmentation generator's noise, warp and feature dropout, and the model's own dropout, which
# draws from torch's global RNG)
RESUME_VARIANTS = {
    "plain": ({}, {}),
    "augmented_dropout": (
        {"dropout": 0.2},
        {"augment": AugmentConfig(noise_std=0.1, magnitude_warp=0.1, feature_dropout=0.2)},
    ),
}


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
from tests.test_trainer import RESUME_VARIANTS, make_model, quick_cfg, toy_sequences
from ml.trainer import Trainer
torch.set_num_threads(1)
model_kw, cfg_kw = RESUME_VARIANTS[sys.argv[4]]
model, loss = make_model(**model_kw)
kill_at = int(sys.argv[3])
def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(model, loss, toy_sequences(2, 128, 0), toy_sequences(1, 64, 1),
        quick_cfg(checkpoint_every=1, **cfg_kw), checkpoint_dir=sys.argv[1],
        on_step=on_step).fit()
"""


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resuming_after_a_kill_gives_the_weights_of_an_uninterrupted_run(tmp_path, variant):
    """Bitwise, also with augmentation and dropout on: the checkpoint must carry the
    augmentation generator's and torch's RNG states (not restoring either fails the
    augmented_dropout run; issue 15, finding 5)."""
    model_kw, cfg_kw = RESUME_VARIANTS[variant]
    model, loss = make_model(**model_kw)
    Trainer(
        model, loss, toy_sequences(2, 128, 0), toy_sequences(1, 64, 1), quick_cfg(**cfg_kw)
    ).fit()
    expected = model.state_dict()

    ckpt = tmp_path / "ckpt"
    kill_at = 6  # mid second epoch (4 chunks per epoch): resume must restore the carried state
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(ckpt), str(ROOT), str(kill_at), variant],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["position"].tolist()[:3] == [1, 2, kill_at]

    # different init: everything must come from the checkpoint
    model, loss = make_model(seed=123, **model_kw)
    trainer = Trainer(
        model,
        loss,
        toy_sequences(2, 128, 0),
        toy_sequences(1, 64, 1),
        quick_cfg(**cfg_kw),
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


# -- the recipe (issue 10) -------------------------------------------------------------------


def four_task_sequences(lanes: int, steps: int, seed: int) -> Sequences:
    """Every task, with losses of very different sizes, each with irreducible noise (a task
    learned to zero loss has no finite equilibrium weight)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lanes, steps, N_FEATURES, generator=g)

    def noise() -> torch.Tensor:
        return torch.randn(lanes, steps, generator=g)

    signal = x[..., 0]
    ret = torch.stack([0.01 * (signal + noise()), 0.03 * (signal + noise())], dim=-1)
    latent = signal + noise()
    direction = torch.where(latent > 0.4, 2, torch.where(latent < -0.4, 0, 1))
    sigma = 0.02 * torch.exp(0.3 * x[..., 1] + 0.3 * noise())
    quant = 0.05 * signal + 0.02 * noise()
    return Sequences(
        x, {"returns": ret, "direction": direction, "sigma": sigma, "quantiles": quant}
    )


def test_task_weights_reach_their_equilibrium_within_a_run():
    """exp(-s_k) ends near 1 / L_k for every task, though the losses differ several-fold and
    move during the run (the weights move with them)."""
    model, loss = make_model()
    train, val = four_task_sequences(2, 256, 0), four_task_sequences(1, 64, 1)
    stats = TargetStats.from_targets(train.targets, (1, 5), (0.1, 0.9), 3)
    model.calibrate(stats)
    loss.calibrate(stats)
    trainer = Trainer(model, loss, train, val, quick_cfg(epochs=8, tbptt_len=16))
    trainer.fit()
    initial = trainer.history[0]
    final = trainer.evaluate_tasks(train)
    weights = loss.weights()
    spread = max(final[k] for k in weights) / min(final[k] for k in weights)
    assert spread > 5, final  # the tasks' losses really are of different sizes
    moved = [abs(w - initial[f"weight_{k}"]) / initial[f"weight_{k}"] for k, w in weights.items()]
    assert max(moved) > 0.3, moved  # the weights tracked the falling losses
    for task, w in weights.items():
        assert 0.5 < w * final[task] < 2.0, (task, w, final[task])


def test_validation_loss_is_summed_over_every_chunk_and_divided_once():
    """Chunks without targets count for nothing, short chunks weigh by their rows."""
    model, loss = make_model()
    val = toy_sequences(2, 100, 1)
    val.loss_mask = torch.zeros(2, 100, dtype=torch.bool)
    val.loss_mask[:, 70:] = True  # targets in the last 30 steps only: chunks 0-1 are empty
    chunked = Trainer(model, loss, toy_sequences(2, 64, 0), val, quick_cfg(tbptt_len=32))
    whole = Trainer(model, loss, toy_sequences(2, 64, 0), val, quick_cfg(tbptt_len=100))
    by_chunks, at_once = chunked.evaluate_tasks(val), whole.evaluate_tasks(val)
    for task in ("direction", "returns", "total"):
        assert by_chunks[task] == pytest.approx(at_once[task], rel=1e-5), task


def test_chunks_without_targets_carry_the_state_but_take_no_step():
    train = toy_sequences(2, 128, 0)
    train.loss_mask = torch.zeros(2, 128, dtype=torch.bool)
    train.loss_mask[:, 96:] = True  # only the last of four chunks has targets
    model, loss = make_model()
    # lr 0: the one step's loss is that of the untrained model on steps 96..127, which it
    # computes from the state carried through the three forward-only chunks before
    cfg = quick_cfg(epochs=1, lr=0.0, loss_lr=0.0)
    trainer = Trainer(model, loss, train, toy_sequences(1, 64, 1), cfg)
    assert trainer.steps_per_epoch == 1 and trainer.total_steps == 1
    result = trainer.fit()
    assert result.steps == 1 and result.skipped_steps == 0
    with torch.no_grad():
        out, _ = model(train.x)
        _, targets = train.chunk(96, 128)
        expected, _ = loss({k: v[:, 96:] for k, v in out.items()}, targets)
    assert trainer.history[0]["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_early_stopping_watches_the_declared_metric_and_waits_past_warm_up(monkeypatch):
    """Two validation metrics that disagree: the kept epoch is the monitored one's best."""
    train, val = toy_sequences(2, 128, 0), toy_sequences(1, 64, 1)
    scripted = {  # per epoch: returns improve until epoch 4, direction is best at epoch 2
        "returns": [0.5, 0.4, 0.3, 0.2, 0.3, 0.4, 0.5, 0.6],
        "direction": [1.0, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4],
    }

    def run(monitor: str, min_steps: int, epochs: int = 8):
        model, loss = make_model()
        trainer = Trainer(
            model,
            loss,
            train,
            val,
            quick_cfg(epochs=epochs, patience=2, monitor=monitor, min_steps=min_steps),
        )
        real = trainer.evaluate_tasks
        calls = []

        def fake(data):
            if data is trainer.val_data:
                e = len(calls)
                calls.append(e)
                return {
                    "returns": scripted["returns"][e],
                    "direction": scripted["direction"][e],
                    "total": 0.0,
                }
            return real(data)

        monkeypatch.setattr(trainer, "evaluate_tasks", fake)
        return trainer.fit()

    by_returns, by_direction = run("returns", 0), run("direction", 0)
    assert by_returns.best_epoch == 4 and by_returns.best_val_loss == 0.2
    assert by_returns.stopped_early and by_returns.epochs_run == 6
    assert by_direction.best_epoch == 2 and by_direction.best_val_loss == 0.8
    assert by_direction.epochs_run == 4
    # before warm-up + min_steps (4 steps an epoch), no epoch counts against patience
    late = run("direction", min_steps=20)
    assert late.best_epoch == 2 and late.epochs_run == 7  # step 24 reached after epoch 6
    with pytest.raises(ValueError, match="monitor='sigma'"):
        Trainer(*make_model(), train, val, quick_cfg(monitor="sigma"))


def test_weight_decay_spares_biases_norms_ssm_parameters_and_task_weights():
    model, loss = make_model()
    trainer = Trainer(model, loss, toy_sequences(2, 64, 0), toy_sequences(1, 32, 1), quick_cfg())
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(model.named_parameters())
    for name, p in named.items():
        spared = name.endswith(("A_log", "dt_bias", ".D", "bias")) or "norm" in name
        assert (id(p) in ids["no_decay"]) == spared, name
        assert (id(p) in ids["decay"]) != spared, name
    assert groups["decay"]["weight_decay"] > 0 and groups["no_decay"]["weight_decay"] == 0
    assert ids["loss"] == {id(loss.log_vars)} and groups["loss"]["weight_decay"] == 0
    assert groups["loss"]["lr"] == pytest.approx(quick_cfg().loss_lr)  # own rate, no warm-up
    assert sum(len(v) for v in ids.values()) == len(named) + 1
