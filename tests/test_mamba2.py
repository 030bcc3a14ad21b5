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


# --------------------------------------------------------------------------------------------
# An independent float64 reference: the Mamba-2 block written from the paper's recurrence and
# mamba_ssm's block layout, reading only the layer's parameters and config (none of its
# forward code). The tests above hold the layer's paths to each other; these hold all of them
# to the equations, so a mistake shared by every path (split order, the conv, dt, which group
# a head reads, where D or the gate applies, the norm) cannot pass.
# --------------------------------------------------------------------------------------------

REFERENCE_MUTATIONS = (
    "head_reads_the_other_group",  # head h reads group (h // (H/G) + 1) % G
    "head_reads_group_h_mod_G",  # interleaved instead of blocked head -> group map
    "norm_before_gate",  # norm(y) * silu(z) instead of norm(y * silu(z))
    "no_D_skip",  # y_t = C_t h_t
    "D_skips_the_pre_conv_x",  # D * x with x taken before the conv + SiLU
    "dt_without_bias",  # softplus(dt) instead of softplus(dt + dt_bias)
    "z_and_xBC_swapped",  # in_proj split [xBC, z, dt] instead of [z, xBC, dt]
    "conv_taps_reversed",  # tap 0 multiplies the newest input
    "B_and_C_swapped",  # xBC split [x, C, B] instead of [x, B, C]
    "input_not_scaled_by_dt",  # h_t = exp(dt A) h_{t-1} + x_t B_t^T
    "y_reads_the_previous_state",  # y_t = h_{t-1} C_t + D x_t
    "ungrouped_norm",  # one RMSNorm over all d_inner channels instead of per group
)


def _recurrence_reference(
    layer: Mamba2,
    u: torch.Tensor,
    conv_state0: torch.Tensor,
    ssm_state0: torch.Tensor,
    mutation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mamba-2 block, one time step at a time, in float64.

    in_proj -> [z (d_inner), xBC (d_inner + 2 G N), dt (H)]; depthwise causal conv over the
    last K pre-activation xBC inputs (the carried K-1 and the new one; tap K-1 is the newest)
    plus bias, then SiLU; xBC -> [x (H, P), B (G, N), C (G, N)]; dt = softplus(dt + dt_bias);
    A = -exp(A_log); per head h reading group g = h // (H / G):
        h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T   (P, N)
        y_t = h_t C_t + D_h x_t                          (P,)
    then RMSNorm(y * silu(z)) per group of d_inner / G channels, times the norm weight
    (mamba_ssm's RMSNormGated, norm_before_gate=False), then out_proj.
    Returns y (B, L, d_model), conv state (B, conv_dim, K-1), ssm state (B, H, P, N).
    """
    assert mutation is None or mutation in REFERENCE_MUTATIONS, mutation
    cfg = layer.cfg
    f64 = torch.float64
    p = {k: v.detach().to(f64) for k, v in layer.state_dict().items()}
    batch, seqlen, _ = u.shape
    H, P, G, N, K = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_conv
    d_inner = cfg.expand * cfg.d_model
    conv_dim = d_inner + 2 * G * N
    heads_per_group = H // G
    assert p["in_proj.weight"].shape == (2 * d_inner + 2 * G * N + H, cfg.d_model)

    W_in, b_in = p["in_proj.weight"], p.get("in_proj.bias")
    conv_w = p["conv1d.weight"][:, 0, :]  # (conv_dim, K)
    if mutation == "conv_taps_reversed":
        conv_w = conv_w.flip(-1)
    conv_b = p.get("conv1d.bias")
    A = -torch.exp(p["A_log"])  # (H,)
    D, dt_bias, norm_w = p["D"], p["dt_bias"], p["norm.weight"]
    W_out, b_out = p["out_proj.weight"], p.get("out_proj.bias")

    def group_of(h: int) -> int:
        if mutation == "head_reads_the_other_group":
            return (h // heads_per_group + 1) % G
        if mutation == "head_reads_group_h_mod_G":
            return h % G
        return h // heads_per_group

    def silu(v: torch.Tensor) -> torch.Tensor:
        return v / (1.0 + torch.exp(-v))

    def softplus(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(v, min=0.0) + torch.log1p(torch.exp(-v.abs()))

    def rmsnorm(v: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
        out = torch.empty_like(v)
        for lo in range(0, v.shape[-1], size):
            seg = v[:, lo : lo + size]
            rms = torch.sqrt((seg * seg).mean(-1, keepdim=True) + cfg.norm_eps)
            out[:, lo : lo + size] = seg / rms * w[lo : lo + size]
        return out

    # the last K-1 pre-activation conv inputs, oldest first
    history = [conv_state0[:, :, j].to(f64) for j in range(K - 1)]
    S = ssm_state0.to(f64).clone()  # (B, H, P, N)
    outputs = []
    for t in range(seqlen):
        zxbcdt = u[:, t].to(f64) @ W_in.T
        if b_in is not None:
            zxbcdt = zxbcdt + b_in
        if mutation == "z_and_xBC_swapped":
            xBC_in, z = zxbcdt[:, :conv_dim], zxbcdt[:, conv_dim : conv_dim + d_inner]
        else:
            z, xBC_in = zxbcdt[:, :d_inner], zxbcdt[:, d_inner : d_inner + conv_dim]
        dt_raw = zxbcdt[:, d_inner + conv_dim :]
        assert dt_raw.shape == (batch, H)

        window = [*history, xBC_in]  # K inputs, window[K-1] is the newest
        conv = sum(conv_w[:, k] * window[k] for k in range(K))
        if conv_b is not None:
            conv = conv + conv_b
        history = window[1:]
        xBC = silu(conv)
        x = xBC[:, :d_inner].reshape(batch, H, P)
        B_t = xBC[:, d_inner : d_inner + G * N].reshape(batch, G, N)
        C_t = xBC[:, d_inner + G * N :].reshape(batch, G, N)
        if mutation == "B_and_C_swapped":
            B_t, C_t = C_t, B_t
        x_skip = (
            xBC_in[:, :d_inner].reshape(batch, H, P) if mutation == "D_skips_the_pre_conv_x" else x
        )
        dt = softplus(dt_raw if mutation == "dt_without_bias" else dt_raw + dt_bias)  # (B, H)

        S_next = torch.empty_like(S)
        y = torch.empty(batch, H, P, dtype=f64)
        for h in range(H):
            g = group_of(h)
            decay = torch.exp(dt[:, h] * A[h])  # (B,)
            for b in range(batch):
                inc = torch.outer(x[b, h], B_t[b, g])  # (P, N)
                if mutation != "input_not_scaled_by_dt":
                    inc = dt[b, h] * inc
                S_next[b, h] = decay[b] * S[b, h] + inc
                read = S[b, h] if mutation == "y_reads_the_previous_state" else S_next[b, h]
                y[b, h] = read @ C_t[b, g]  # (P,)
                if mutation != "no_D_skip":
                    y[b, h] = y[b, h] + D[h] * x_skip[b, h]
        S = S_next

        y = y.reshape(batch, d_inner)
        gsize = d_inner if mutation == "ungrouped_norm" else d_inner // G
        if mutation == "norm_before_gate":
            normed = rmsnorm(y, norm_w, gsize) * silu(z)
        else:
            normed = rmsnorm(y * silu(z), norm_w, gsize)
        out = normed @ W_out.T
        if b_out is not None:
            out = out + b_out
        outputs.append(out)
    return torch.stack(outputs, 1), torch.stack(history, -1), S


REFERENCE_CONFIGS = {
    # ngroups=2 with 2 heads per group, P=8 != N=5, chunk 8 does not divide L=21
    "G2_H4": {"d_model": 16, "d_state": 5, "headdim": 8, "ngroups": 2, "chunk_size": 8},
    # one head per group, projections with bias, a narrower conv, chunk 3
    "G4_H4_bias": {
        "d_model": 8,
        "d_state": 3,
        "headdim": 4,
        "ngroups": 4,
        "chunk_size": 3,
        "d_conv": 3,
        "bias": True,
    },
}


def _reference_setup(name: str, seed: int = 0) -> tuple[Mamba2, torch.Tensor, Mamba2State]:
    """A float64 layer with every parameter random (nothing left at a 0/1 init), an input
    of length 21 and a random carried state."""
    torch.manual_seed(seed)
    cfg = Mamba2Config(backend="torch", **REFERENCE_CONFIGS[name])
    layer = Mamba2(cfg).double()
    H = cfg.nheads
    with torch.no_grad():
        layer.A_log.copy_(torch.empty(H, dtype=torch.float64).uniform_(-1.5, 1.0))
        layer.dt_bias.copy_(torch.empty(H, dtype=torch.float64).uniform_(-2.5, 0.5))
        layer.D.copy_(torch.empty(H, dtype=torch.float64).uniform_(-1.5, 1.5))
        layer.norm.weight.copy_(torch.empty(cfg.d_inner, dtype=torch.float64).uniform_(0.3, 2.0))
        layer.conv1d.weight.mul_(2.0)
        if layer.conv1d.bias is not None:
            layer.conv1d.bias.uniform_(-0.5, 0.5)
        for p in layer.parameters():
            assert p.dtype == torch.float64
    batch = 2
    u = torch.randn(batch, 21, cfg.d_model, dtype=torch.float64)
    state0 = Mamba2State(
        torch.randn(batch, cfg.conv_dim, cfg.d_conv - 1, dtype=torch.float64),
        torch.randn(batch, H, cfg.headdim, cfg.d_state, dtype=torch.float64),
    )
    return layer, u, state0


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float64
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _layer_paths(layer: Mamba2, u: torch.Tensor, state0: Mamba2State) -> dict:
    """{path: (y, state)} for the whole-sequence forward, chunks with the carried state (cut
    off the chunk grid, including a length-1 piece), and step-by-step."""
    with torch.no_grad():
        full = layer(u, state0)
        ys, state = [], state0
        for lo, hi in [(0, 4), (4, 5), (5, 16), (16, 21)]:
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
def test_recurrence_reference_full_chunked_and_step_match(name: str) -> None:
    layer, u, state0 = _reference_setup(name)
    y_ref, _, _ = _recurrence_reference(layer, u, state0.conv_state, state0.ssm_state)
    assert y_ref.abs().max() > 0.1  # a real signal, not all ~0
    for path, (y, _) in _layer_paths(layer, u, state0).items():
        assert _rel_err(y, y_ref) < 1e-10, (path, _rel_err(y, y_ref))


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_recurrence_reference_final_state(name: str) -> None:
    layer, u, state0 = _reference_setup(name)
    _, conv_ref, ssm_ref = _recurrence_reference(layer, u, state0.conv_state, state0.ssm_state)
    # the last K-1 pre-activation inputs: exactly the in_proj outputs, no recurrence involved
    for path, (_, state) in _layer_paths(layer, u, state0).items():
        assert state.conv_state.shape == conv_ref.shape
        assert state.ssm_state.shape == ssm_ref.shape
        assert _rel_err(state.conv_state, conv_ref) < 1e-12, path
        assert _rel_err(state.ssm_state, ssm_ref) < 1e-10, (
            path,
            _rel_err(state.ssm_state, ssm_ref),
        )


def test_recurrence_reference_from_zero_state_matches_layer_with_no_state() -> None:
    layer, u, _ = _reference_setup("G2_H4", seed=1)
    zero = layer.init_state(u.shape[0])
    y_ref, conv_ref, ssm_ref = _recurrence_reference(layer, u, zero.conv_state, zero.ssm_state)
    with torch.no_grad():
        y, state = layer(u)
    assert _rel_err(y, y_ref) < 1e-10
    assert _rel_err(state.conv_state, conv_ref) < 1e-12
    assert _rel_err(state.ssm_state, ssm_ref) < 1e-10


@pytest.mark.parametrize("mutation", REFERENCE_MUTATIONS)
def test_recurrence_reference_is_sensitive_to_each_mutation(mutation: str) -> None:
    # the comparison above is only as strong as the reference: each plausible mistake, put into
    # the reference, moves its output by orders of magnitude more than the 1e-10 tolerance,
    # so the layer matching the unmutated reference rules every one of them out
    name = "G2_H4"
    layer, u, state0 = _reference_setup(name)
    args = (layer, u, state0.conv_state, state0.ssm_state)
    y_ref, _, ssm_ref = _recurrence_reference(*args)
    y_mut, _, ssm_mut = _recurrence_reference(*args, mutation=mutation)
    assert _rel_err(y_mut, y_ref) > 1e-3, (mutation, _rel_err(y_mut, y_ref))
    with torch.no_grad():
        y_layer, _ = layer(u, state0)
    assert _rel_err(y_layer, y_mut) > 1e-3
