"""The Mamba2 layer: exact state carrying, the SSD scan against its recurrence, dtypes,
gradients into the state, mamba_ssm-compatible parameters, and backend selection."""

import dataclasses
import importlib
import logging
import sys

import pytest
import torch

from ml import mamba2
from ml.mamba2 import Mamba2, Mamba2Config, Mamba2State, segsum, ssd_chunked, ssd_step

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: on a shared CPU the intra-op thread pool's waits cost more than
    the math (a gradcheck here takes 50 s with 2 busy threads, under 1 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides: object) -> Mamba2Config:
    kwargs = {
        "d_model": 16,
        "d_state": 8,
        "headdim": 8,
        "ngroups": 2,
        "chunk_size": 8,
        "backend": "torch",
    }
    kwargs.update(overrides)
    return Mamba2Config(**kwargs)


def random_scan_inputs(
    batch: int = 2,
    seqlen: int = 19,
    nheads: int = 4,
    headdim: int = 3,
    ngroups: int = 2,
    dstate: int = 5,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, seqlen, nheads, generator=g, dtype=dtype))
    A = -torch.rand(nheads, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=dtype)
    s0 = torch.randn(batch, nheads, headdim, dstate, generator=g, dtype=dtype)
    return x, dt, A, B, C, s0


def sequential_scan(x, dt, A, B, C, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 19, 64])
def test_ssd_chunked_equals_the_step_recurrence_for_any_chunk_size(chunk_size: int) -> None:
    # 19 is not a multiple of 4, 7 or 64: the padded tail must leave the state untouched
    x, dt, A, B, C, s0 = random_scan_inputs()
    y_ref, s_ref = sequential_scan(x, dt, A, B, C, s0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size, s0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=1e-5)


def test_segsum_matches_its_definition_and_masks_above_the_diagonal() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            expected = x[:, j + 1 : i + 1].sum(-1) if i >= j else torch.full((3,), -torch.inf)
            torch.testing.assert_close(out[:, i, j], expected.to(torch.float64))


def test_segsum_scan_stays_finite_for_long_chunks_and_large_dt() -> None:
    # cumsum(dt * A) reaches about -1e5 within a chunk here; exp(cumsum_i - cumsum_j) computed
    # naively overflows to inf and gives NaN (inf * 0)
    x, dt, A, B, C, s0 = random_scan_inputs(batch=1, seqlen=512, seed=1)
    dt = dt * 0 + 50.0
    A = A * 10
    y, s = ssd_chunked(x, dt, A, B, C, 256, s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, s_ref = sequential_scan(x, dt, A, B, C, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    dt_noise = torch.randn(1, 512, 4, dtype=torch.float32).requires_grad_()
    y, s = ssd_chunked(x, dt + dt_noise, A, B, C, 256, s0)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(dt_noise.grad).all()


def test_layer_full_sequence_equals_chunks_with_carried_state_equals_steps() -> None:
    torch.manual_seed(0)
    layer = Mamba2(small_config())
    u = torch.randn(2, 37, 16)
    state0 = Mamba2State(torch.randn(2, layer.cfg.conv_dim, 3), torch.randn(2, 4, 8, 8))
    with torch.no_grad():
        y_full, s_full = layer(u, state0)

        ys, state = [], state0
        for lo, hi in [(0, 5), (5, 6), (6, 19), (19, 37)]:  # cuts off the chunk grid, and L=1
            y, state = layer(u[:, lo:hi], state)
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(state.conv_state, s_full.conv_state, atol=0, rtol=0)
        torch.testing.assert_close(state.ssm_state, s_full.ssm_state, atol=ATOL, rtol=1e-5)

        ys, state = [], state0
        for t in range(u.shape[1]):
            y, state = layer.step(u[:, t], state)
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys, 1), y_full, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(state.conv_state, s_full.conv_state, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(state.ssm_state, s_full.ssm_state, atol=ATOL, rtol=1e-5)


def test_layer_with_no_state_starts_from_zeros_and_handles_short_inputs() -> None:
    torch.manual_seed(0)
    layer = Mamba2(small_config(chunk_size=16))
    u = torch.randn(1, 2, 16)  # shorter than d_conv - 1 + 1 and than a chunk
    with torch.no_grad():
        y_none, s_none = layer(u)
        y_zero, s_zero = layer(u, layer.init_state(1))
    torch.testing.assert_close(y_none, y_zero)
    assert s_none.conv_state.shape == (1, layer.cfg.conv_dim, 3)
    torch.testing.assert_close(s_none.conv_state[..., 1:], s_zero.conv_state[..., 1:])
    assert s_none.conv_state[..., 0].abs().sum() == 0  # the zero left context that came before


def test_ssm_state_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = Mamba2(small_config())
    u = torch.randn(2, 21, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(u)
        y2, state2 = layer(u[:, :3], state)
        y3, state3 = layer.step(u[:, 0], state2)
    assert y.dtype == torch.bfloat16
    for s in (state, state2, state3):
        assert s.ssm_state.dtype == torch.float32
        assert torch.isfinite(s.ssm_state).all()
    bf16_layer = Mamba2(small_config()).to(torch.bfloat16)
    assert bf16_layer.init_state(1).ssm_state.dtype == torch.float32
    _, s = bf16_layer(u.to(torch.bfloat16))
    assert s.ssm_state.dtype == torch.float32


def test_gradcheck_through_ssd_chunked_including_the_initial_state() -> None:
    x, dt, A, B, C, s0 = random_scan_inputs(
        batch=1, seqlen=6, nheads=2, headdim=2, ngroups=1, dstate=3, dtype=torch.float64
    )
    inputs = tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, s0))

    def fn(x, dt, A, B, C, s0):
        return ssd_chunked(x, dt, A, B, C, 4, s0)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_through_the_layer_into_ssm_and_conv_state() -> None:
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=8, d_state=4, headdim=4, chunk_size=4, backend="torch")
    layer = Mamba2(cfg).double()
    u = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    conv_state = torch.randn(1, cfg.conv_dim, 3, dtype=torch.float64, requires_grad=True)
    ssm_state = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(u, conv_state, ssm_state):
        y, s = layer(u, Mamba2State(conv_state, ssm_state))
        return y, s.conv_state, s.ssm_state

    assert layer.init_state(1).ssm_state.dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (u, conv_state, ssm_state))


def test_parameter_names_and_shapes_match_mamba_ssm() -> None:
    # mamba_ssm.modules.mamba2.Mamba2(d_model=256, d_state=64, d_conv=4, expand=2, headdim=64,
    # ngroups=2): d_inner=512, nheads=8, d_in_proj = 2*512 + 2*2*64 + 8 = 1288,
    # conv_dim = 512 + 2*2*64 = 768
    cfg = Mamba2Config(d_model=256, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=2)
    expected = {
        "in_proj.weight": (1288, 256),
        "conv1d.weight": (768, 1, 4),
        "conv1d.bias": (768,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (512,),
        "out_proj.weight": (256, 512),
    }
    layer = Mamba2(cfg)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    with_bias = Mamba2(Mamba2Config(d_model=256, bias=True))
    assert tuple(with_bias.state_dict()["in_proj.bias"].shape) == (2 * 512 + 2 * 64 + 8,)
    assert tuple(with_bias.state_dict()["out_proj.bias"].shape) == (256,)


def test_initialization_follows_the_reference_ranges() -> None:
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=512, headdim=16)  # 64 heads
    layer = Mamba2(cfg)
    dt = torch.nn.functional.softplus(layer.dt_bias.detach())
    assert dt.min() >= cfg.dt_init_floor and dt.max() <= cfg.dt_max * (1 + 1e-5)
    A = torch.exp(layer.A_log.detach())
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(layer.D.detach(), torch.ones(64))
    assert torch.equal(layer.norm.weight.detach(), torch.ones(cfg.d_inner))


def test_config_rejects_heads_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Config(d_model=24, headdim=64)
    with pytest.raises(ValueError, match="backend"):
        Mamba2Config(d_model=64, backend="triton")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_fused_backend_without_cuda_raises_a_clear_error() -> None:
    layer = Mamba2(small_config(backend="fused"))
    with pytest.raises(RuntimeError, match=r"backend='fused' cannot run: .*(CUDA|mamba_ssm)"):
        layer(torch.randn(1, 4, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_backend_falls_back_to_torch_with_one_log_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mamba2, "_fallback_logged", set())
    torch.manual_seed(0)
    auto = Mamba2(small_config(backend="auto"))
    reference = Mamba2(small_config(backend="torch"))
    reference.load_state_dict(auto.state_dict())
    u = torch.randn(1, 9, 16)
    with caplog.at_level(logging.INFO, logger="mambacast.mamba2"), torch.no_grad():
        for _ in range(3):
            y, _ = auto(u)
        other = Mamba2(small_config(backend="auto"))
        other(u)
    records = [r for r in caplog.records if r.name == "mambacast.mamba2"]
    assert len(records) == 1
    assert "PyTorch SSD scan" in records[0].getMessage()
    with torch.no_grad():
        torch.testing.assert_close(y, reference(u)[0])


def test_fused_loader_bypasses_a_package_init_that_needs_selective_scan_cuda(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if any(name == "mamba_ssm" or name.startswith("mamba_ssm.") for name in sys.modules):
        pytest.skip("a real mamba_ssm is already imported")
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda  # missing compiled extension\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(
        "def mamba_chunk_scan_combined(*args, **kwargs):\n    return 'fake kernel'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        scan, why = mamba2._fused_scan.__wrapped__()
        assert why == ""
        assert scan() == "fake kernel"
    finally:
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]


def _fused_available() -> bool:
    return torch.cuda.is_available() and mamba2._fused_scan()[0] is not None


@pytest.mark.skipif(not _fused_available(), reason="needs CUDA and mamba_ssm")
def test_fused_backend_agrees_with_the_torch_scan() -> None:
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, d_state=16, headdim=16, chunk_size=32, backend="fused")
    fused = Mamba2(cfg).cuda()
    reference = Mamba2(dataclasses.replace(cfg, backend="torch")).cuda()
    reference.load_state_dict(fused.state_dict())
    u = torch.randn(2, 77, 64, device="cuda")
    state = fused.init_state(2)
    state = Mamba2State(state.conv_state, torch.randn_like(state.ssm_state))
    with torch.no_grad():
        y_f, s_f = fused(u, state)
        y_t, s_t = reference(u, state)
    torch.testing.assert_close(y_f, y_t, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s_f.ssm_state, s_t.ssm_state, atol=1e-3, rtol=1e-3)
