"""The forecaster backbone: presets, exact chunked and streaming inference (through attention
with a carried window), the masked multi-task loss, and a smoke test that it can learn."""

import math

import pytest
import torch

from ml.backbone import (
    TASKS,
    AttentionState,
    BackboneConfig,
    CausalSelfAttention,
    Forecaster,
    MultiTaskLoss,
    TargetStats,
    count_parameters,
)
from ml.mamba2 import Mamba2State
from ml.state import detach_state

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: on a shared CPU the intra-op thread pool's waits cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hybrid_config(**overrides: object) -> BackboneConfig:
    """sparse_mhsa, shrunk: 4 layers, attention at layers 1 and 3, window 12, chunks of 8."""
    kwargs = {
        "d_model": 16,
        "n_layers": 4,
        "attn_every": 2,
        "attn_heads": 2,
        "attn_window": 12,
        "d_state": 8,
        "headdim": 8,
        "chunk_size": 8,
        "backend": "torch",
    }
    kwargs.update(overrides)
    return BackboneConfig.preset("sparse_mhsa", n_features=5, **kwargs)


def assert_outputs_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=1e-5, msg=key)


# Parameter counts with n_features=32 (the ids print them).
@pytest.mark.parametrize(
    ("preset", "n_params"),
    [("baseline", 3_854_187), ("sparse_mhsa", 5_436_267), ("tiny", 35_715)],
    ids=lambda v: f"{v / 1e6:.2f}M_params" if isinstance(v, int) else v,
)
def test_presets_build_and_run_on_cpu(preset: str, n_params: int) -> None:
    cfg = BackboneConfig.preset(preset, n_features=32, backend="torch")
    model = Forecaster(cfg)
    assert count_parameters(model) == n_params
    n_attention = sum(isinstance(b.mixer, CausalSelfAttention) for b in model.blocks)
    assert n_attention == (2 if preset == "sparse_mhsa" else 0)
    with torch.no_grad():
        out, state = model(torch.randn(2, 10, 32))
    assert out["direction"].shape == (2, 10, 3)
    assert out["quantiles"].shape == (2, 10, 2)
    assert out["sigma"].shape == (2, 10)
    assert out["returns"].shape == (2, 10, len(cfg.horizons))
    assert len(state) == cfg.n_layers
    assert (out["sigma"] > 0).all()
    assert (out["quantiles"][..., 1] >= out["quantiles"][..., 0]).all()


def test_unknown_preset_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="baseline"):
        BackboneConfig.preset("huge", n_features=3)


def test_chunked_forward_with_carried_state_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = Forecaster(hybrid_config()).eval()
    x = torch.randn(2, 40, 5)
    with torch.no_grad():
        full, full_state = model(x)
        # chunks of 5, 11, 7, 17: shorter and longer than the window (12) and the SSD chunk (8)
        pieces, state = [], model.init_state(2)
        for lo, hi in [(0, 5), (5, 16), (16, 23), (23, 40)]:
            out, state = model(x[:, lo:hi], state)
            pieces.append(out)
    chunked = {k: torch.cat([p[k] for p in pieces], dim=1) for k in full}
    assert_outputs_close(chunked, full)
    for s, f in zip(state, full_state, strict=True):
        if isinstance(s, AttentionState):
            assert s.k.shape[2] == 12  # the window, not the sequence
            torch.testing.assert_close(s.k, f.k, atol=ATOL, rtol=1e-5)
        else:
            assert isinstance(s, Mamba2State)
            torch.testing.assert_close(s.ssm_state, f.ssm_state, atol=ATOL, rtol=1e-5)


def test_step_equals_full_forward_at_every_position() -> None:
    torch.manual_seed(0)
    model = Forecaster(hybrid_config(n_layers=3, attn_every=2, attn_window=5)).eval()
    x = torch.randn(2, 16, 5)
    with torch.no_grad():
        full, _ = model(x)
        state = model.init_state(2)
        for t in range(x.shape[1]):
            out, state = model.step(x[:, t], state)
            assert_outputs_close(out, {k: v[:, t] for k, v in full.items()})


def test_attention_sees_exactly_its_window() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=8, n_heads=2, window=4)
    x = torch.randn(1, 12, 8)
    moved = x.clone()
    moved[:, 3] += 10.0
    with torch.no_grad():
        y, _ = attn(x)
        y_moved, _ = attn(moved)
    changed = (y - y_moved).abs().amax(-1)[0] > 1e-6
    # position 3 is seen by queries 3..7 (lag 0..4), by no one before or after
    assert changed.tolist() == [t in range(3, 8) for t in range(12)]


def test_gradients_stop_at_a_detached_state() -> None:
    torch.manual_seed(0)
    model = Forecaster(hybrid_config())
    x = torch.randn(1, 12, 5, requires_grad=True)
    _, state = model(x[:, :6])
    out, _ = model(x[:, 6:], detach_state(state))
    out["returns"].sum().backward()
    assert x.grad[:, :6].abs().sum() == 0
    assert x.grad[:, 6:].abs().sum() > 0


def random_targets(batch: int, seqlen: int, n_horizons: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "direction": torch.randint(0, 3, (batch, seqlen), generator=g).float(),
        "quantiles": 0.1 * torch.randn(batch, seqlen, generator=g),
        "sigma": 0.02 + 0.05 * torch.rand(batch, seqlen, generator=g),
        "returns": 0.05 * torch.randn(batch, seqlen, n_horizons, generator=g),
    }


def test_loss_ignores_nan_targets_and_learns_its_log_variances() -> None:
    torch.manual_seed(0)
    model = Forecaster(BackboneConfig.preset("tiny", n_features=5, backend="torch"))
    out, _ = model(torch.randn(2, 12, 5))
    outputs = {k: v.detach().requires_grad_() for k, v in out.items()}
    targets = random_targets(2, 12, 5)
    for key in ("direction", "quantiles", "sigma"):
        targets[key][:, -3:] = torch.nan  # the unknown future at the end of a series
    targets["returns"][0, :, 4] = torch.nan  # one horizon missing for one series
    loss_fn = MultiTaskLoss()
    total, parts = loss_fn(outputs, targets)
    assert set(parts) == set(TASKS)
    assert torch.isfinite(total) and all(torch.isfinite(p) for p in parts.values())
    total.backward()
    assert loss_fn.log_vars.grad is not None and (loss_fn.log_vars.grad != 0).all()
    for key, out_key in (("direction",) * 2, ("quantiles",) * 2, ("sigma", "log_sigma")):
        assert outputs[out_key].grad[:, -3:].abs().sum() == 0, key
        assert outputs[out_key].grad[:, :-3].abs().sum() > 0, key
    assert outputs["returns"].grad[0, :, 4].abs().sum() == 0
    assert torch.isfinite(outputs["returns"].grad).all()

    # integer direction labels mark missing entries with -1: same loss as NaN
    as_int = dict(targets, direction=torch.nan_to_num(targets["direction"], nan=-1).long())
    torch.testing.assert_close(loss_fn(outputs, as_int)[0], total)
    # a task with no valid target adds nothing (not even its log variance)
    without = {k: v for k, v in targets.items() if k != "sigma"}
    all_nan = dict(targets, sigma=torch.full_like(targets["sigma"], torch.nan))
    torch.testing.assert_close(loss_fn(outputs, all_nan)[0], loss_fn(outputs, without)[0])


def test_loss_parts_are_minimized_at_the_truth() -> None:
    t = torch.tensor([[0.01, 0.02, 0.05]])
    loss_fn = MultiTaskLoss()
    at_truth = loss_fn({"sigma": t}, {"sigma": t})[1]["sigma"]
    assert at_truth.abs() < 1e-6
    for scale in (0.5, 2.0):
        assert loss_fn({"sigma": t * scale}, {"sigma": t})[1]["sigma"] > 0.1


def test_tiny_model_overfits_a_small_batch() -> None:
    torch.manual_seed(0)
    cfg = BackboneConfig.preset("tiny", n_features=8, backend="torch")
    model = Forecaster(cfg)
    loss_fn = MultiTaskLoss(cfg.quantiles)
    x = torch.randn(4, 32, 8)
    targets = random_targets(4, 32, len(cfg.horizons), seed=1)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=3e-3)
    history = []
    for _ in range(300):
        out, _ = model(x)
        total, parts = loss_fn(out, targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(sum(p.item() for p in parts.values()))  # unweighted: comparable over time
    # (speed is benchmarks/mamba.py's business: a wall-clock limit here fails on a loaded box)
    assert history[-1] < 0.5 * history[0], (history[0], history[-1])


def test_calibrated_heads_start_at_the_training_targets_constants() -> None:
    """A fresh calibrated model forecasts climatology: class frequencies, the empirical
    quantiles, the QLIKE-best constant sigma and the mean return (not sigma ~0.69 for a 0.02
    target)."""
    torch.manual_seed(0)
    cfg = BackboneConfig.preset("tiny", n_features=5, backend="torch", horizons=(1, 5))
    g = torch.Generator().manual_seed(3)
    n = 20000
    sigma = 0.02 * torch.exp(0.8 * torch.randn(1, n, generator=g))
    targets = {
        "direction": torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), n, True, generator=g)[None],
        "quantiles": (0.01 + 0.1 * torch.randn(1, n, generator=g)),
        "sigma": sigma,
        "returns": torch.stack([0.001 + 0.02 * torch.randn(1, n, generator=g)] * 2, -1),
    }
    stats = TargetStats.from_targets(targets, cfg.horizons, cfg.quantiles, 3)
    model = Forecaster(cfg)
    model.calibrate(stats)
    with torch.no_grad():
        out, _ = model(torch.randn(2, 50, 5))
    probs = torch.softmax(out["direction"], -1).mean((0, 1))
    torch.testing.assert_close(probs, torch.tensor([0.2, 0.5, 0.3]), atol=0.03, rtol=0)
    # QLIKE's best constant is sqrt(mean sigma^2) = 0.02 exp(0.8^2) ~ 0.038, not the median
    best = float((sigma**2).mean().sqrt())
    assert best == pytest.approx(0.02 * math.exp(0.64), rel=0.05)
    assert out["sigma"].median() == pytest.approx(best, rel=0.1)
    lo, hi = out["quantiles"][..., 0].mean(), out["quantiles"][..., 1].mean()
    assert lo == pytest.approx(0.01 - 1.2816 * 0.1, abs=0.02)
    assert hi == pytest.approx(0.01 + 1.2816 * 0.1, abs=0.02)
    assert out["returns"].mean() == pytest.approx(0.001, abs=0.002)
    # sigma * sqrt(h): the 5-bar return is in units sqrt(5) times the 1-bar one's
    torch.testing.assert_close(stats.return_scale[1] / stats.return_scale[0], torch.tensor(5**0.5))


def test_anchored_heads_forecast_in_units_of_the_volatility_anchor() -> None:
    """With a log-volatility anchor a as the input's last channel, a calibrated fresh model
    forecasts sigma = c exp(a) (c fitted on the training rows), and quantiles and returns
    scaled by exp(a): a bar twice as volatile gets a band twice as wide."""
    torch.manual_seed(0)
    cfg = BackboneConfig.preset(
        "tiny", n_features=4, backend="torch", horizons=(1, 5), sigma_anchor=True
    )
    g = torch.Generator().manual_seed(5)
    n = 20000
    a = torch.log(0.01 + 0.04 * torch.rand(1, n, generator=g))  # the anchor varies fourfold
    vol = 1.2 * torch.exp(a)  # realized volatility runs 20% above the anchor
    targets = {
        "direction": torch.randint(0, 3, (1, n), generator=g),
        "quantiles": vol * 3 * torch.randn(1, n, generator=g),
        "sigma": vol,
        "returns": torch.stack([vol * torch.randn(1, n, generator=g)] * 2, -1),
    }
    stats = TargetStats.from_targets(targets, cfg.horizons, cfg.quantiles, 3, anchor=a)
    assert float(stats.log_sigma_level.exp()) == pytest.approx(1.2, rel=0.02)
    model = Forecaster(cfg)
    model.calibrate(stats)
    x = torch.cat([torch.zeros(1, 2, 4), torch.log(torch.tensor([0.01, 0.02]))[None, :, None]], -1)
    with torch.no_grad():
        out, _ = model(x)
    torch.testing.assert_close(out["sigma"][0], torch.tensor([0.012, 0.024]), rtol=0.1, atol=0)
    width = out["quantiles"][0, :, 1] - out["quantiles"][0, :, 0]
    assert float(width[1] / width[0]) == pytest.approx(2.0, rel=0.05)
    units = out["return_units"][0]
    torch.testing.assert_close(units[1] / units[0], torch.tensor([2.0, 2.0]))
    # a zero EWMA variance (log -inf) stays inside the head's range instead of poisoning it
    bad = x.clone()
    bad[0, 0, -1] = float("-inf")
    with torch.no_grad():
        assert torch.isfinite(model(bad)[0]["quantiles"]).all()


def test_every_return_horizon_weighs_alike_in_the_loss() -> None:
    """An error of one sigma * sqrt(h) costs the same on every horizon, measured in the
    units the model reports with its forecast (as in training)."""
    scale = torch.tensor([0.02, 0.02 * 30**0.5])
    loss_fn = MultiTaskLoss(n_horizons=2)
    truth = torch.zeros(1, 10, 2)
    units = scale.expand(1, 10, 2)
    per_horizon = [
        loss_fn.task_losses(
            {"returns": truth + scale * torch.eye(2)[h], "return_units": units},
            {"returns": truth},
        )
        for h in range(2)
    ]
    assert per_horizon[0]["returns"][0] == pytest.approx(float(per_horizon[1]["returns"][0]))
    assert per_horizon[0]["returns"][0] > 0.2
