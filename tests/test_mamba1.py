"""The Mamba1 layer: the selective scan against its recurrence, exact state carrying, dtypes,
gradients into the state, mamba_ssm-compatible parameters, and backend selection (including
the fused kernel's initial-state glue, run on CPU against a fake kernel)."""

import dataclasses
import importlib
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from ml import mamba1
from ml.mamba1 import Mamba1, Mamba1Config, Mamba1State, selective_scan, selective_scan_step
from ml.state import flatten_state, unflatten_state

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: on a shared CPU the intra-op thread pool's waits cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides: object) -> Mamba1Config:
    kwargs = {"d_model": 8, "d_state": 4, "dt_rank": 2, "chunk_size": 8, "backend": "torch"}
    kwargs.update(overrides)
    return Mamba1Config(**kwargs)


def random_scan_inputs(
    batch: int = 2,
    seqlen: int = 19,
    d_inner: int = 6,
    dstate: int = 5,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, d_inner, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, seqlen, d_inner, generator=g, dtype=dtype))
    A = -torch.rand(d_inner, dstate, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, seqlen, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, seqlen, dstate, generator=g, dtype=dtype)
    h0 = torch.randn(batch, d_inner, dstate, generator=g, dtype=dtype)
    return x, delta, A, B, C, h0


def loop_scan(x, delta, A, B, C, h):
    """The recurrence written out, one position at a time (no D term)."""
    ys = []
    for t in range(x.shape[1]):
        h = (
            torch.exp(delta[:, t, :, None] * A) * h
            + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        )
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 19, 64])
def test_mamba1_selective_scan_equals_the_recurrence_for_any_chunk_size(chunk_size: int) -> None:
    # 19 is not a multiple of 4 or 7 and shorter than 64: the padded tail must not move the state
    x, delta, A, B, C, h0 = random_scan_inputs()
    y_ref, h_ref = loop_scan(x, delta, A, B, C, h0)
    y, h = selective_scan(x, delta, A, B, C, h0, chunk_size)
    assert y.shape == x.shape and h.shape == h0.shape and h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=ATOL, rtol=1e-5)


def test_mamba1_selective_scan_float64_matches_the_recurrence_tightly() -> None:
    x, delta, A, B, C, h0 = random_scan_inputs(dtype=torch.float64, seqlen=23)
    y_ref, h_ref = loop_scan(x, delta, A, B, C, h0)
    for chunk_size in (1, 5, 23, 100):
        y, h = selective_scan(x, delta, A, B, C, h0, chunk_size)
        assert y.dtype == h.dtype == torch.float64
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    y0, h0_ = selective_scan(x, delta, A, B, C, None, 5)
    y0_ref, h0_ref = loop_scan(x, delta, A, B, C, torch.zeros_like(h0))
    torch.testing.assert_close(y0, y0_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h0_, h0_ref, atol=1e-12, rtol=1e-12)


def test_mamba1_selective_scan_step_is_one_position_of_the_scan() -> None:
    x, delta, A, B, C, h0 = random_scan_inputs(seqlen=1)
    y, h = selective_scan(x, delta, A, B, C, h0, 4)
    y_t, h_t = selective_scan_step(h0, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0])
    torch.testing.assert_close(y_t, y[:, 0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(h_t, h, atol=ATOL, rtol=1e-5)


def test_mamba1_selective_scan_stays_finite_for_long_chunks_and_large_delta() -> None:
    # the cumulative decay inside a 256-long chunk reaches about -1e5 here: a cumsum-difference
    # or exp(-cumsum) formulation overflows to inf and gives NaN (inf * 0)
    x, delta, A, B, C, h0 = random_scan_inputs(batch=1, seqlen=512, seed=1)
    delta = delta * 0 + 50.0
    A = A * 10
    y, h = selective_scan(x, delta, A, B, C, h0, 256)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = loop_scan(x, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    noise = torch.randn(1, 512, 6).requires_grad_()
    y, h = selective_scan(x, delta + noise, A, B, C, h0, 256)
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(noise.grad).all()


def test_mamba1_selective_scan_handles_an_empty_sequence() -> None:
    x, delta, A, B, C, h0 = random_scan_inputs(seqlen=0)
    y, h = selective_scan(x, delta, A, B, C, h0, 8)
    assert y.shape == (2, 0, 6)
    torch.testing.assert_close(h, h0)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_mamba1_gradcheck_through_selective_scan_including_the_initial_state(
    chunk_size: int,
) -> None:
    x, delta, A, B, C, h0 = random_scan_inputs(
        batch=1, seqlen=6, d_inner=3, dstate=2, dtype=torch.float64
    )
    inputs = tuple(t.clone().requires_grad_() for t in (x, delta, A, B, C, h0))

    def fn(x, delta, A, B, C, h0):
        return selective_scan(x, delta, A, B, C, h0, chunk_size)

    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def test_mamba1_layer_full_sequence_equals_chunks_with_carried_state_equals_steps() -> None:
    torch.manual_seed(0)
    layer = Mamba1(small_config())
    u = torch.randn(2, 37, 8)
    state0 = Mamba1State(torch.randn(2, 16, 3), torch.randn(2, 16, 4))
    with torch.no_grad():
        y_full, s_full = layer(u, state0)

        ys, state = [], state0
        for lo, hi in [(0, 7), (7, 8), (8, 21), (21, 37)]:  # off the chunk grid, and L=1
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


def test_mamba1_layer_with_no_state_starts_from_zeros_and_handles_short_inputs() -> None:
    torch.manual_seed(0)
    layer = Mamba1(small_config(chunk_size=16))
    u = torch.randn(1, 2, 8)  # shorter than d_conv - 1 + 1 and than a chunk
    with torch.no_grad():
        y_none, s_none = layer(u)
        y_zero, s_zero = layer(u, layer.init_state(1))
    torch.testing.assert_close(y_none, y_zero)
    torch.testing.assert_close(s_none.ssm_state, s_zero.ssm_state)
    assert s_none.conv_state.shape == (1, 16, 3)
    assert s_none.ssm_state.shape == (1, 16, 4) and s_none.ssm_state.dtype == torch.float32
    torch.testing.assert_close(s_none.conv_state[..., 1:], s_zero.conv_state[..., 1:])
    assert s_none.conv_state[..., 0].abs().sum() == 0  # the zero left context that came before


def test_mamba1_ssm_state_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = Mamba1(small_config())
    u = torch.randn(2, 21, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(u)
        y2, state2 = layer(u[:, :3], state)
        y3, state3 = layer.step(u[:, 0], state2)
    assert y.dtype == torch.bfloat16
    for s in (state, state2, state3):
        assert s.ssm_state.dtype == torch.float32
        assert torch.isfinite(s.ssm_state).all()
    bf16_layer = Mamba1(small_config()).to(torch.bfloat16)
    assert bf16_layer.init_state(1).ssm_state.dtype == torch.float32
    _, s = bf16_layer(u.to(torch.bfloat16))
    assert s.ssm_state.dtype == torch.float32
    _, s = bf16_layer(u.to(torch.bfloat16), s)
    assert s.ssm_state.dtype == torch.float32


def test_mamba1_gradcheck_through_the_layer_into_ssm_and_conv_state() -> None:
    torch.manual_seed(0)
    cfg = Mamba1Config(d_model=4, d_state=3, expand=1, chunk_size=4, backend="torch")
    layer = Mamba1(cfg).double()
    u = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    conv_state = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    ssm_state = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(u, conv_state, ssm_state):
        y, s = layer(u, Mamba1State(conv_state, ssm_state))
        return y, s.conv_state, s.ssm_state

    assert layer.init_state(1).ssm_state.dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (u, conv_state, ssm_state))


def test_mamba1_state_detaches_and_survives_a_weights_only_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    layer = Mamba1(small_config())
    u = torch.randn(2, 5, 8, requires_grad=True)
    _, state = layer(u)
    assert state.ssm_state.requires_grad
    detached = state.detach()
    assert isinstance(detached, Mamba1State) and not detached.ssm_state.requires_grad
    torch.save(flatten_state(detached), tmp_path / "state.pt")
    back = unflatten_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert isinstance(back, Mamba1State)
    torch.testing.assert_close(back.ssm_state, detached.ssm_state, atol=0, rtol=0)
    torch.testing.assert_close(back.conv_state, detached.conv_state, atol=0, rtol=0)


def test_mamba1_parameter_names_and_shapes_match_mamba_ssm() -> None:
    # mamba_ssm.modules.mamba_simple.Mamba(d_model=256, d_state=16, d_conv=4, expand=2):
    # d_inner=512, dt_rank=ceil(256/16)=16, x_proj out = 16 + 2*16 = 48
    layer = Mamba1(Mamba1Config(d_model=256))
    expected = [
        ("in_proj.weight", (1024, 256)),
        ("conv1d.weight", (512, 1, 4)),
        ("conv1d.bias", (512,)),
        ("x_proj.weight", (48, 512)),
        ("dt_proj.weight", (512, 16)),
        ("dt_proj.bias", (512,)),
        ("A_log", (512, 16)),
        ("D", (512,)),
        ("out_proj.weight", (256, 512)),
    ]
    # (a dict: nn.Module lists a module's own parameters before its submodules', either way)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == dict(expected)
    assert layer.conv1d.groups == 512 and layer.conv1d.padding == (3,)
    other = Mamba1(Mamba1Config(d_model=20, bias=True, conv_bias=False, dt_rank=3, d_state=8))
    shapes = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    assert shapes["in_proj.bias"] == (80,) and shapes["out_proj.bias"] == (20,)
    assert shapes["x_proj.weight"] == (3 + 16, 40) and shapes["dt_proj.weight"] == (40, 3)
    assert "conv1d.bias" not in shapes and "x_proj.bias" not in shapes
    assert Mamba1Config(d_model=17).dt_rank_size == 2


def test_mamba1_initialization_follows_the_reference_ranges() -> None:
    torch.manual_seed(0)
    cfg = Mamba1Config(d_model=256, d_state=8)
    layer = Mamba1(cfg)
    A = -torch.exp(layer.A_log.detach())
    expected_A = -torch.arange(1, 9, dtype=torch.float32).expand(512, 8)
    torch.testing.assert_close(A, expected_A)
    dt = F.softplus(layer.dt_proj.bias.detach())
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    assert dt.min() < 0.002 and dt.max() > 0.05  # spread over the log-uniform range
    bound = cfg.dt_rank_size**-0.5
    w = layer.dt_proj.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.equal(layer.D.detach(), torch.ones(512))
    for p in (layer.A_log, layer.D, layer.dt_proj.bias):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(layer.in_proj.weight, "_no_weight_decay", False)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("d_model", {"d_model": 0}),
        ("d_state", {"d_state": 0}),
        ("d_conv", {"d_conv": 0}),
        ("expand", {"expand": 0}),
        ("dt_rank", {"dt_rank": 0}),
        ("chunk_size", {"chunk_size": 0}),
        ("dt_min", {"dt_min": 0.5, "dt_max": 0.1}),
        ("dt_init_floor", {"dt_init_floor": 0.0}),
        ("backend", {"backend": "triton"}),
    ],
)
def test_mamba1_config_errors_name_the_field(field: str, kwargs: dict) -> None:
    kwargs = {"d_model": 16, **kwargs}
    with pytest.raises(ValueError, match=f"Mamba1Config.{field}"):
        Mamba1Config(**kwargs)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_mamba1_fused_backend_without_cuda_raises_a_clear_error() -> None:
    layer = Mamba1(small_config(backend="fused"))
    with pytest.raises(
        RuntimeError, match=r"backend='fused' cannot run: .*(CUDA|mamba_ssm).*mambacast\[gpu\]"
    ):
        layer(torch.randn(1, 4, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_mamba1_auto_backend_falls_back_to_torch_with_one_log_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mamba1, "_fallback_logged", set())
    torch.manual_seed(0)
    auto = Mamba1(small_config(backend="auto"))
    reference = Mamba1(small_config(backend="torch"))
    reference.load_state_dict(auto.state_dict())
    u = torch.randn(1, 9, 8)
    with caplog.at_level(logging.INFO, logger="mambacast.mamba1"), torch.no_grad():
        for _ in range(3):
            y, _ = auto(u)
        Mamba1(small_config(backend="auto"))(u)
    records = [r for r in caplog.records if r.name == "mambacast.mamba1"]
    assert len(records) == 1
    assert "PyTorch selective scan" in records[0].getMessage()
    with torch.no_grad():
        torch.testing.assert_close(y, reference(u)[0])


def fake_selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
):
    """mamba_ssm's selective_scan_fn from its definition: u, delta, z (B, D, L); A (D, N);
    B, C (B, N, L); always from a zero state; y (B, D, L), last state (B, D, N)."""
    assert u.dim() == 3 and B.dim() == 3 and u.shape[1] == A.shape[0] and B.shape[1] == A.shape[1]
    assert u.is_contiguous() and delta.is_contiguous() and B.is_contiguous()
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    h = h.to(torch.promote_types(u.dtype, torch.float32))
    ys = []
    for t in range(u.shape[2]):
        h = (
            torch.exp(delta[:, :, t, None] * A) * h
            + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        )
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    y = y.to(u.dtype)
    # as the real kernel: its backward ignores the gradient of the last state
    return (y, h.detach()) if return_last_state else y


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> list:
    """The module's kernel loader returns the fake above, allowed to run on CPU tensors."""
    calls: list = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return fake_selective_scan_fn(*args, **kwargs)

    monkeypatch.setattr(mamba1, "_fused_selective_scan", lambda: (counted, ""))
    monkeypatch.setattr(mamba1, "_FUSED_NEEDS_CUDA", False)
    return calls


def test_mamba1_fake_kernel_matches_the_loop_from_zero(fake_kernel: list) -> None:
    # the fake is only a valid stand-in if it is the recurrence: check it before trusting it
    x, delta, A, B, C, h0 = random_scan_inputs(dtype=torch.float64)
    y_ref, h_ref = loop_scan(x, delta, A, B, C, torch.zeros_like(h0))
    y, h = fake_selective_scan_fn(
        x.transpose(1, 2).contiguous(),
        delta.transpose(1, 2).contiguous(),
        A,
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        return_last_state=True,
    )
    torch.testing.assert_close(y.transpose(1, 2), y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)


def test_mamba1_fused_glue_adds_the_initial_state_by_linearity(fake_kernel: list) -> None:
    x, delta, A, B, C, h0 = random_scan_inputs(dtype=torch.float64)
    y_ref, h_ref = selective_scan(x, delta, A, B, C, h0, 8)
    y, h = mamba1._selective_scan_fused(x, delta, A, B, C, h0, 8)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    y, h = mamba1._selective_scan_fused(x, delta, A, B, C, None, 8)
    y_ref, h_ref = selective_scan(x, delta, A, B, C, None, 8)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    assert all(call == {"return_last_state": True} for call in fake_kernel)  # no z, D, bias


def test_mamba1_fused_path_equals_the_torch_path_from_a_nonzero_state(fake_kernel: list) -> None:
    torch.manual_seed(0)
    fused = Mamba1(small_config(backend="fused")).double()
    reference = Mamba1(small_config(backend="torch")).double()
    reference.load_state_dict(fused.state_dict())
    u = torch.randn(2, 21, 8, dtype=torch.float64)
    state0 = Mamba1State(
        torch.randn(2, 16, 3, dtype=torch.float64), torch.randn(2, 16, 4, dtype=torch.float64)
    )
    with torch.no_grad():
        y_ref, s_ref = reference(u, state0)
        y, s = fused(u, state0)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(s.ssm_state, s_ref.ssm_state, atol=1e-12, rtol=1e-12)
        ys, state = [], state0
        for lo, hi in [(0, 7), (7, 8), (8, 21)]:
            y, state = fused(u[:, lo:hi], state)
            ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 1), y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(state.ssm_state, s_ref.ssm_state, atol=1e-12, rtol=1e-12)
    assert len(fake_kernel) == 4  # the fused path really ran, once per forward


def _write_fake_mamba_ssm(tmp_path, init_text: str, interface_text: str) -> None:
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init_text)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "selective_scan_interface.py").write_text(interface_text)


def _forget_mamba_ssm() -> None:
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]


@pytest.mark.parametrize("init_fails", [False, True])
def test_mamba1_fused_loader_finds_the_kernel_even_past_a_failing_package_init(
    tmp_path, monkeypatch: pytest.MonkeyPatch, init_fails: bool
) -> None:
    if any(name == "mamba_ssm" or name.startswith("mamba_ssm.") for name in sys.modules):
        pytest.skip("a real mamba_ssm is already imported")
    init = "import mamba_ssm_missing_dependency\n" if init_fails else ""
    _write_fake_mamba_ssm(
        tmp_path, init, "def selective_scan_fn(*args, **kwargs):\n    return 'fake kernel'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        scan, why = mamba1._fused_selective_scan.__wrapped__()
        assert why == ""
        assert scan() == "fake kernel"
    finally:
        _forget_mamba_ssm()


def test_mamba1_fused_loader_reports_a_missing_selective_scan_cuda(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if any(name == "mamba_ssm" or name.startswith("mamba_ssm.") for name in sys.modules):
        pytest.skip("a real mamba_ssm is already imported")
    _write_fake_mamba_ssm(
        tmp_path,
        "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn\n",
        "import selective_scan_cuda\n\ndef selective_scan_fn(*args, **kwargs):\n    pass\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        scan, why = mamba1._fused_selective_scan.__wrapped__()
        assert scan is None
        assert "selective_scan_cuda" in why and mamba1._FUSED_MODULE in why
    finally:
        _forget_mamba_ssm()


def _fused_available() -> bool:
    return torch.cuda.is_available() and mamba1._fused_selective_scan()[0] is not None


@pytest.mark.skipif(not _fused_available(), reason="needs CUDA and mamba_ssm's selective_scan")
def test_mamba1_fused_kernel_agrees_with_the_torch_scan() -> None:
    torch.manual_seed(0)
    cfg = Mamba1Config(d_model=64, d_state=16, chunk_size=32, backend="fused")
    fused = Mamba1(cfg).cuda()
    reference = Mamba1(dataclasses.replace(cfg, backend="torch")).cuda()
    reference.load_state_dict(fused.state_dict())
    u = torch.randn(2, 77, 64, device="cuda")
    state = fused.init_state(2)
    state = Mamba1State(torch.randn_like(state.conv_state), torch.randn_like(state.ssm_state))
    with torch.no_grad():
        y_f, s_f = fused(u, state)
        y_t, s_t = reference(u, state)
    torch.testing.assert_close(y_f, y_t, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s_f.ssm_state, s_t.ssm_state, atol=1e-3, rtol=1e-3)
    u.requires_grad_()
    # a loss on the outputs only: the kernel does not back-propagate its last state's gradient
    # (mamba_ssm's docstring; truncated BPTT never asks for it)
    y_f, _ = fused(u, state)
    y_f.square().sum().backward()
    g_f, u.grad = u.grad, None
    y_t, _ = reference(u, state)
    y_t.square().sum().backward()
    torch.testing.assert_close(g_f, u.grad, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# An independent float64 reference: the Mamba-1 block written from the paper's recurrence and
# mamba_ssm's block layout, reading only the layer's parameters and config (none of its forward
# code). A mistake shared by the full, chunked and step paths cannot pass these.
# --------------------------------------------------------------------------------------------

REFERENCE_MUTATIONS = (
    "initial_state_ignored",  # h_0 = 0 instead of the carried state
    "conv_state_ignored",  # the conv's left context is zeros instead of the carried inputs
    "decay_uses_previous_delta",  # h_t = exp(delta_{t-1} A) h_{t-1} + delta_t x_t B_t
    "x_and_z_swapped",  # in_proj split [z, x] instead of [x, z]
    "B_and_C_swapped",  # x_proj split [dt, C, B] instead of [dt, B, C]
    "dt_without_bias",  # softplus(W dt) instead of softplus(W dt + b)
    "input_not_scaled_by_delta",  # h_t = exp(delta A) h_{t-1} + x_t B_t
    "y_reads_the_previous_state",  # y_t = h_{t-1} C_t + D x_t
    "no_D_skip",  # y_t = h_t C_t
    "conv_taps_reversed",  # tap 0 multiplies the newest input
    "gate_on_pre_conv_x",  # y * silu(x_in) instead of y * silu(z)
)


def _recurrence_reference(
    layer: Mamba1,
    u: torch.Tensor,
    conv_state0: torch.Tensor,
    ssm_state0: torch.Tensor,
    mutation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mamba-1 block, one time step at a time, in float64.

    in_proj -> [x (D), z (D)]; depthwise causal conv over the last K pre-activation x inputs
    (the carried K-1 and the new one; tap K-1 is the newest) plus bias, then SiLU;
    x_proj(x) -> [dt (R), B (N), C (N)]; delta = softplus(dt_proj.weight dt + dt_proj.bias);
    A = -exp(A_log) (D, N); per channel d:
        h_t[d] = exp(delta_t[d] A[d]) h_{t-1}[d] + delta_t[d] x_t[d] B_t     (N,)
        y_t[d] = h_t[d] · C_t + D[d] x_t[d]
    then out_proj(y * silu(z)). Returns y (B, L, d_model), conv state (B, D, K-1), ssm state
    (B, D, N).
    """
    assert mutation is None or mutation in REFERENCE_MUTATIONS, mutation
    cfg = layer.cfg
    f64 = torch.float64
    p = {k: v.detach().to(f64) for k, v in layer.state_dict().items()}
    batch, seqlen, _ = u.shape
    d_inner = cfg.expand * cfg.d_model
    N, K = cfg.d_state, cfg.d_conv
    R = p["dt_proj.weight"].shape[1]
    assert p["x_proj.weight"].shape == (R + 2 * N, d_inner)

    W_in, b_in = p["in_proj.weight"], p.get("in_proj.bias")
    conv_w = p["conv1d.weight"][:, 0, :]  # (D, K)
    if mutation == "conv_taps_reversed":
        conv_w = conv_w.flip(-1)
    conv_b = p.get("conv1d.bias")
    W_x, W_dt, b_dt = p["x_proj.weight"], p["dt_proj.weight"], p["dt_proj.bias"]
    A = -torch.exp(p["A_log"])  # (D, N)
    D = p["D"]
    W_out, b_out = p["out_proj.weight"], p.get("out_proj.bias")

    def silu(v: torch.Tensor) -> torch.Tensor:
        return v / (1.0 + torch.exp(-v))

    def softplus(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(v, min=0.0) + torch.log1p(torch.exp(-v.abs()))

    conv0 = conv_state0.to(f64)
    if mutation == "conv_state_ignored":
        conv0 = torch.zeros_like(conv0)
    history = [conv0[:, :, j] for j in range(K - 1)]  # oldest first
    h = ssm_state0.to(f64).clone()  # (B, D, N)
    if mutation == "initial_state_ignored":
        h = torch.zeros_like(h)
    prev_delta = None
    outputs = []
    for t in range(seqlen):
        xz = u[:, t].to(f64) @ W_in.T
        if b_in is not None:
            xz = xz + b_in
        x_in, z = xz[:, :d_inner], xz[:, d_inner:]
        if mutation == "x_and_z_swapped":
            x_in, z = z, x_in
        if mutation == "gate_on_pre_conv_x":
            z = x_in

        window = [*history, x_in]  # K inputs, window[K-1] is the newest
        conv = sum(conv_w[:, k] * window[k] for k in range(K))
        if conv_b is not None:
            conv = conv + conv_b
        history = window[1:]
        x = silu(conv)  # (B, D)

        x_dbl = x @ W_x.T  # (B, R + 2N)
        dt_low, B_t, C_t = x_dbl[:, :R], x_dbl[:, R : R + N], x_dbl[:, R + N :]
        if mutation == "B_and_C_swapped":
            B_t, C_t = C_t, B_t
        dt = dt_low @ W_dt.T
        delta = softplus(dt if mutation == "dt_without_bias" else dt + b_dt)  # (B, D)
        delta_decay = delta
        if mutation == "decay_uses_previous_delta" and prev_delta is not None:
            delta_decay = prev_delta
        prev_delta = delta

        h_next = torch.empty_like(h)
        y = torch.empty(batch, d_inner, dtype=f64)
        for b in range(batch):
            for d in range(d_inner):
                inc = x[b, d] * B_t[b]  # (N,)
                if mutation != "input_not_scaled_by_delta":
                    inc = delta[b, d] * inc
                h_next[b, d] = torch.exp(delta_decay[b, d] * A[d]) * h[b, d] + inc
                read = h[b, d] if mutation == "y_reads_the_previous_state" else h_next[b, d]
                y[b, d] = read @ C_t[b]
                if mutation != "no_D_skip":
                    y[b, d] = y[b, d] + D[d] * x[b, d]
        h = h_next

        out = (y * silu(z)) @ W_out.T
        if b_out is not None:
            out = out + b_out
        outputs.append(out)
    return torch.stack(outputs, 1), torch.stack(history, -1), h


REFERENCE_CONFIGS = {
    # N=5, R=3, chunk 8 does not divide L=21
    "N5_R3": {"d_model": 6, "d_state": 5, "dt_rank": 3, "chunk_size": 8},
    # projections with bias, no conv bias, a narrower conv, expand 1, R from d_model, chunk 3
    "bias_K3": {
        "d_model": 5,
        "d_state": 3,
        "d_conv": 3,
        "expand": 1,
        "chunk_size": 3,
        "bias": True,
        "conv_bias": False,
    },
}


def _reference_setup(name: str, seed: int = 0) -> tuple[Mamba1, torch.Tensor, Mamba1State]:
    """A float64 layer with every parameter random (nothing left at its structured init: A
    differs per channel and state index), an input of length 21 and a random carried state."""
    torch.manual_seed(seed)
    cfg = Mamba1Config(backend="torch", **REFERENCE_CONFIGS[name])
    layer = Mamba1(cfg).double()
    d_inner, N = cfg.d_inner, cfg.d_state
    with torch.no_grad():
        layer.A_log.copy_(torch.empty(d_inner, N, dtype=torch.float64).uniform_(-1.5, 1.0))
        layer.dt_proj.bias.copy_(torch.empty(d_inner, dtype=torch.float64).uniform_(-2.5, 0.5))
        layer.D.copy_(torch.empty(d_inner, dtype=torch.float64).uniform_(-1.5, 1.5))
        layer.conv1d.weight.mul_(2.0)
        layer.x_proj.weight.mul_(2.0)
        if layer.conv1d.bias is not None:
            layer.conv1d.bias.uniform_(-0.5, 0.5)
        for p in layer.parameters():
            assert p.dtype == torch.float64
    batch = 2
    u = torch.randn(batch, 21, cfg.d_model, dtype=torch.float64)
    state0 = Mamba1State(
        torch.randn(batch, d_inner, cfg.d_conv - 1, dtype=torch.float64),
        torch.randn(batch, d_inner, N, dtype=torch.float64),
    )
    return layer, u, state0


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float64
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _layer_paths(layer: Mamba1, u: torch.Tensor, state0: Mamba1State) -> dict:
    """{path: (y, state)} for the whole-sequence forward, uneven pieces with the carried state
    (off the chunk grid, including a length-1 piece), and step-by-step."""
    with torch.no_grad():
        full = layer(u, state0)
        ys, state = [], state0
        for lo, hi in [(0, 7), (7, 8), (8, 21)]:
            y, state = layer(u[:, lo:hi], state)
            ys.append(y)
        chunked = (torch.cat(ys, 1), state)
        ys, state = [], state0
        for t in range(u.shape[1]):
            y, state = layer.step(u[:, t], state)
            ys.append(y)
        stepped = (torch.stack(ys, 1), state)
    return {"full": full, "chunked": chunked, "step": stepped}


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_mamba1_recurrence_reference_full_chunked_and_step_match(name: str) -> None:
    layer, u, state0 = _reference_setup(name)
    y_ref, _, _ = _recurrence_reference(layer, u, state0.conv_state, state0.ssm_state)
    assert y_ref.abs().max() > 0.1  # a real signal, not all ~0
    for path, (y, _) in _layer_paths(layer, u, state0).items():
        assert _rel_err(y, y_ref) < 1e-10, (path, _rel_err(y, y_ref))


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_mamba1_recurrence_reference_final_state(name: str) -> None:
    layer, u, state0 = _reference_setup(name)
    _, conv_ref, ssm_ref = _recurrence_reference(layer, u, state0.conv_state, state0.ssm_state)
    for path, (_, state) in _layer_paths(layer, u, state0).items():
        assert state.conv_state.shape == conv_ref.shape
        assert state.ssm_state.shape == ssm_ref.shape
        assert state.ssm_state.dtype == torch.float64
        # the last K-1 pre-activation inputs: exactly the in_proj outputs
        assert _rel_err(state.conv_state, conv_ref) < 1e-12, path
        assert _rel_err(state.ssm_state, ssm_ref) < 1e-10, (
            path,
            _rel_err(state.ssm_state, ssm_ref),
        )


def test_mamba1_recurrence_reference_from_zero_state_matches_layer_with_no_state() -> None:
    layer, u, _ = _reference_setup("N5_R3", seed=1)
    zero = layer.init_state(u.shape[0])
    y_ref, conv_ref, ssm_ref = _recurrence_reference(layer, u, zero.conv_state, zero.ssm_state)
    with torch.no_grad():
        y, state = layer(u)
    assert _rel_err(y, y_ref) < 1e-10
    assert _rel_err(state.conv_state, conv_ref) < 1e-12
    assert _rel_err(state.ssm_state, ssm_ref) < 1e-10


@pytest.mark.parametrize("mutation", REFERENCE_MUTATIONS)
def test_mamba1_recurrence_reference_is_sensitive_to_each_mutation(mutation: str) -> None:
    # the comparison above is only as strong as the reference: each plausible mistake, put into
    # the reference, moves its output by orders of magnitude more than the 1e-10 tolerance, so
    # the layer matching the unmutated reference rules every one of them out
    layer, u, state0 = _reference_setup("N5_R3")
    args = (layer, u, state0.conv_state, state0.ssm_state)
    y_ref, _, _ = _recurrence_reference(*args)
    y_mut, _, _ = _recurrence_reference(*args, mutation=mutation)
    assert _rel_err(y_mut, y_ref) > 1e-3, (mutation, _rel_err(y_mut, y_ref))
    with torch.no_grad():
        y_layer, _ = layer(u, state0)
    assert _rel_err(y_layer, y_mut) > 1e-3
