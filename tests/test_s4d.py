"""The S4D layer: a float64 loop over the complex recurrence as the reference for the whole-
sequence (Vandermonde + FFT) path, chunks with the carried state and steps; the S4D-Lin/Inv
initializations, the zero-order-hold discretization, long sequences, gradients into the state,
dtypes under autocast, config validation, and the reference's own sensitivity."""

import cmath
import io
import math

import pytest
import torch

from ml.s4d import S4D, S4DConfig, S4DState, discretize_zoh, init_A_imag, ssm_convolution
from ml.state import flatten_state, unflatten_state

f64 = torch.float64
CHUNKS = [(0, 7), (7, 8), (8, 21), (21, 29)]  # uneven, including a length-1 piece
SEQLEN = 29
MUTATIONS = [
    "initial_state_dropped",  # the carried state's contribution left out
    "state_decays_L_minus_1",  # the first step does not decay s0: dA^(L-1) s0
    "state_decays_L_plus_1",  # s0 decayed once too often: dA^(L+1) s0
    "y_reads_the_previous_state",
    "euler_discretization",  # dB = dt instead of (exp(dt A) - 1) / A
    "conjugates_not_doubled",  # Re instead of 2 Re
    "no_D_skip",
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: on a shared CPU the intra-op thread pool's waits cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference_setup(init: str = "lin", seed: int = 0) -> tuple[S4D, torch.Tensor, S4DState]:
    """A float64 layer (H=3, N=8) with every parameter moved off its init, an input of length
    29 and a random nonzero carried state."""
    torch.manual_seed(seed)
    layer = S4D(S4DConfig(d_model=3, d_state=8, init=init)).double()
    with torch.no_grad():
        layer.log_dt.uniform_(math.log(0.02), math.log(0.5))
        layer.A_log_re.uniform_(math.log(0.1), math.log(1.0))
        layer.A_im.add_(torch.randn_like(layer.A_im) * 0.3)
        layer.D.uniform_(-1.5, 1.5)
        layer.output_linear.weight.mul_(3.0)
        layer.output_linear.bias.uniform_(-0.5, 0.5)
    for p in layer.parameters():
        assert p.dtype == f64 and not p.is_complex()
    u = torch.randn(2, SEQLEN, 3, dtype=f64)
    state0 = S4DState(torch.randn(2, 3, 4, 2, dtype=f64))
    return layer, u, state0


def _output_map(layer: S4D, y: torch.Tensor) -> torch.Tensor:
    """gelu (erf form), then Linear(H, 2H) and GLU, written out."""
    h = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    z = h @ layer.output_linear.weight.T + layer.output_linear.bias
    H = y.shape[-1]
    return z[..., :H] * torch.sigmoid(z[..., H:])


def _recurrence_reference(
    layer: S4D, u: torch.Tensor, s0: torch.Tensor, mutation: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain loop over t of the complex recurrence, from the raw parameters, in float64.

    u (B, L, H), s0 (B, H, n, 2) real view. Returns outputs (B, L, H), final state (B, H, n, 2).
    """
    p = {k: v.detach().to(f64) for k, v in layer.named_parameters()}
    dt = torch.exp(p["log_dt"])[:, None]  # (H, 1)
    A = -torch.exp(p["A_log_re"]) + 1j * p["A_im"]  # (H, n)
    C = p["C"][..., 0] + 1j * p["C"][..., 1]  # (H, n)
    dA = torch.exp(dt * A)
    dB = dt * torch.ones_like(A) if mutation == "euler_discretization" else (dA - 1) / A
    s = s0[..., 0].to(f64) + 1j * s0[..., 1].to(f64)  # (B, H, n)
    if mutation == "initial_state_dropped":
        s = torch.zeros_like(s)
    if mutation == "state_decays_L_plus_1":
        s = dA * s
    u = u.detach().to(f64)
    outputs = []
    for t in range(u.shape[1]):
        u_t = u[:, t, :, None]  # (B, H, 1)
        prev = s
        s = s + dB * u_t if mutation == "state_decays_L_minus_1" and t == 0 else dA * s + dB * u_t
        read = prev if mutation == "y_reads_the_previous_state" else s
        scale = 1 if mutation == "conjugates_not_doubled" else 2
        y = scale * (C * read).sum(-1).real  # (B, H)
        if mutation != "no_D_skip":
            y = y + p["D"] * u[:, t]
        outputs.append(_output_map(layer, y))
    return torch.stack(outputs, 1), torch.stack([s.real, s.imag], -1)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == f64
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _layer_paths(layer: S4D, u: torch.Tensor, state0: S4DState) -> dict:
    """{path: (y, state)}: whole sequence, uneven chunks with the carried state, steps."""
    with torch.no_grad():
        full = layer(u, state0)
        ys, state = [], state0
        for lo, hi in CHUNKS:
            y, state = layer(u[:, lo:hi], state)
            ys.append(y)
        chunked = (torch.cat(ys, 1), state)
        ys, state = [], state0
        for t in range(u.shape[1]):
            y, state = layer.step(u[:, t], state)
            ys.append(y)
        stepped = (torch.stack(ys, 1), state)
    return {"full": full, "chunked": chunked, "step": stepped}


# --------------------------------------------------------------------------------------------
# The layer against the recurrence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_full_chunked_and_step_match_the_recurrence_reference(init: str) -> None:
    layer, u, state0 = _reference_setup(init)
    y_ref, s_ref = _recurrence_reference(layer, u, state0.ssm_state)
    assert y_ref.abs().max() > 0.1 and s_ref.abs().max() > 0.1  # a real signal
    for path, (y, state) in _layer_paths(layer, u, state0).items():
        assert state.ssm_state.shape == (2, 3, 4, 2) and state.ssm_state.dtype == f64
        assert _rel_err(y, y_ref) < 1e-10, (path, _rel_err(y, y_ref))
        assert _rel_err(state.ssm_state, s_ref) < 1e-10, (path, _rel_err(state.ssm_state, s_ref))


def test_s4d_zero_state_reference_matches_the_layer_without_a_state() -> None:
    layer, u, _ = _reference_setup("inv", seed=1)
    zero = layer.init_state(u.shape[0])
    assert zero.ssm_state.dtype == f64 and not zero.ssm_state.any()
    y_ref, s_ref = _recurrence_reference(layer, u, zero.ssm_state)
    with torch.no_grad():
        for y, state in (layer(u), layer(u, zero)):
            assert _rel_err(y, y_ref) < 1e-10
            assert _rel_err(state.ssm_state, s_ref) < 1e-10


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_s4d_reference_is_sensitive_to_each_mutation(mutation: str) -> None:
    # the match above is only as strong as the reference: each plausible mistake, put into the
    # reference, moves it by orders of magnitude more than the 1e-10 tolerance
    layer, u, state0 = _reference_setup("lin")
    y_ref, s_ref = _recurrence_reference(layer, u, state0.ssm_state)
    y_mut, s_mut = _recurrence_reference(layer, u, state0.ssm_state, mutation=mutation)
    assert _rel_err(y_mut, y_ref) > 1e-3, (mutation, _rel_err(y_mut, y_ref))
    if mutation not in ("y_reads_the_previous_state", "conjugates_not_doubled", "no_D_skip"):
        assert _rel_err(s_mut, s_ref) > 1e-3, (mutation, _rel_err(s_mut, s_ref))
    with torch.no_grad():
        y_layer, _ = layer(u, state0)
    assert _rel_err(y_layer, y_mut) > 1e-3


def test_s4d_float32_default_config_full_chunked_and_step_agree() -> None:
    torch.manual_seed(0)
    layer = S4D(S4DConfig(d_model=8))  # N = 64, S4D-Lin
    u = torch.randn(2, SEQLEN, 8)
    state0 = S4DState(torch.randn(2, 8, 32, 2))
    paths = _layer_paths(layer, u, state0)
    y_full, s_full = paths["full"]
    assert s_full.ssm_state.dtype == torch.float32
    for path in ("chunked", "step"):
        y, state = paths[path]
        torch.testing.assert_close(y, y_full, atol=1e-5, rtol=1e-5, msg=path)
        torch.testing.assert_close(state.ssm_state, s_full.ssm_state, atol=1e-5, rtol=1e-5)


def test_s4d_empty_chunk_carries_the_state_unchanged() -> None:
    layer, u, state0 = _reference_setup("lin")
    with torch.no_grad():
        y, state = layer(u[:, :0], state0)
        assert y.shape == (2, 0, 3)
        torch.testing.assert_close(state.ssm_state, state0.ssm_state, atol=0, rtol=0)
        _, zero = layer(u[:, :0])
        assert zero.ssm_state.shape == (2, 3, 4, 2) and not zero.ssm_state.any()


def test_s4d_long_sequence_stays_finite_and_matches_the_recurrence() -> None:
    # L = 16384 with the slowest decay (dt = dt_min): the powers dA^k span |dA|^16383 ~ e^-8
    # and phases of thousands of radians; the carried state still matters at the end
    torch.manual_seed(0)
    L = 16384
    layer = S4D(S4DConfig(d_model=1, d_state=4, init="inv")).double()
    with torch.no_grad():
        layer.log_dt.fill_(math.log(0.001))
    u = torch.randn(1, L, 1, dtype=f64)
    s0 = torch.randn(1, 1, 2, 2, dtype=f64) * 10
    with torch.no_grad():
        y, state = layer(u, S4DState(s0))
        dt, A, C = layer.ssm_parameters()
        y_ssm, _ = ssm_convolution(u, dt, A, C, s0[..., 0] + 1j * s0[..., 1])
    assert torch.isfinite(y).all() and torch.isfinite(state.ssm_state).all()

    # the recurrence in Python complex numbers, keeping the SSM output at a few positions
    p = {k: v.detach() for k, v in layer.named_parameters()}
    dt_ = math.exp(p["log_dt"][0].item())
    modes = [
        (complex(-math.exp(p["A_log_re"][0, n].item()), p["A_im"][0, n].item()), n)
        for n in range(2)
    ]
    C_ = [complex(p["C"][0, n, 0].item(), p["C"][0, n, 1].item()) for n in range(2)]
    s = [complex(s0[0, 0, n, 0].item(), s0[0, 0, n, 1].item()) for n in range(2)]
    dAB = [(cmath.exp(dt_ * a), (cmath.exp(dt_ * a) - 1) / a) for a, _ in modes]
    D, us = p["D"][0].item(), u[0, :, 0].tolist()
    positions, y_ref = [0, 1, 4095, 12000, L - 1], {}
    for t, u_t in enumerate(us):
        s = [dA * s_n + dB * u_t for (dA, dB), s_n in zip(dAB, s, strict=True)]
        if t in positions:
            y_ref[t] = 2 * sum(c * s_n for c, s_n in zip(C_, s, strict=True)).real + D * u_t
    for t in positions:
        ssm = y_ssm[0, t, 0].item() + D * us[t]
        assert abs(ssm - y_ref[t]) < 1e-9 * max(1.0, abs(y_ref[t])), (t, ssm, y_ref[t])
    expected_out = _output_map(layer, torch.tensor([[y_ref[t]] for t in positions], dtype=f64))
    torch.testing.assert_close(y[0, positions], expected_out, atol=1e-10, rtol=1e-9)
    s_ref = torch.tensor([[[[z.real, z.imag] for z in s]]], dtype=f64)
    torch.testing.assert_close(state.ssm_state, s_ref, atol=1e-9, rtol=1e-9)
    # the initial state's contribution at the last position is still far above the tolerance
    a0 = modes[0][0]
    assert abs(cmath.exp(L * dt_ * a0)) > 1e-5


def test_s4d_long_sequence_float32_stays_finite_and_close_to_float64() -> None:
    torch.manual_seed(0)
    layer = S4D(S4DConfig(d_model=4, d_state=64))
    with torch.no_grad():
        layer.log_dt.copy_(torch.log(torch.tensor([0.001, 0.01, 0.1, 1.0])))
    u = torch.randn(1, 16384, 4)
    s0 = S4DState(torch.randn(1, 4, 32, 2))
    with torch.no_grad():
        y32, s32 = layer(u, s0)
        y64, s64 = layer.double()(u.double(), S4DState(s0.ssm_state.double()))
    assert torch.isfinite(y32).all() and torch.isfinite(s32.ssm_state).all()
    torch.testing.assert_close(y32.double(), y64, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(s32.ssm_state.double(), s64.ssm_state, atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Initialization and discretization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_init_A_matches_the_formulas(init: str) -> None:
    torch.manual_seed(0)
    N = 16
    layer = S4D(S4DConfig(d_model=3, d_state=N, init=init)).double()
    _, A, _ = layer.ssm_parameters()
    assert A.shape == (3, N // 2)
    for n in range(N // 2):
        expected_imag = math.pi * n if init == "lin" else (N / math.pi) * (N / (2 * n + 1) - 1)
        for h in range(3):
            # the parameters are created in float32, so float32 rounding of the formulas
            assert A[h, n].real.item() == pytest.approx(-0.5, rel=1e-6)
            assert A[h, n].imag.item() == pytest.approx(expected_imag, rel=1e-6, abs=1e-12)
    torch.testing.assert_close(layer.A_im[0], init_A_imag(N, init, f64))


def test_s4d_init_dt_in_range_C_complex_normal_and_real_parameters() -> None:
    torch.manual_seed(0)
    cfg = S4DConfig(d_model=512, d_state=64, dt_min=0.002, dt_max=0.05)
    layer = S4D(cfg)
    dt, _, C = layer.ssm_parameters()
    assert dt.min() >= cfg.dt_min * (1 - 1e-6) and dt.max() <= cfg.dt_max * (1 + 1e-6)
    # log-uniform: the log's mean sits midway between the logs of the bounds
    mid = (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2
    assert abs(torch.log(dt).mean().item() - mid) < 0.1
    assert C.abs().pow(2).mean().item() == pytest.approx(1.0, abs=0.05)  # E|C|^2 = 1
    assert C.real.var().item() == pytest.approx(0.5, abs=0.03)
    for name, p in layer.named_parameters():
        assert not p.is_complex(), name
        no_wd = getattr(p, "_no_weight_decay", False)
        assert no_wd == (name in ("log_dt", "A_log_re", "A_im", "D")), name


def test_s4d_zoh_discretization_matches_the_closed_form() -> None:
    dt = torch.tensor([0.1, 0.7], dtype=f64)
    A = torch.tensor([[-0.5 + 2j, -0.3 + 0.0j], [-1.2 + 40j, -0.5 + 3.1j]], dtype=torch.complex128)
    dA, dB = discretize_zoh(dt, A)
    for h in range(2):
        for n in range(2):
            a = complex(A[h, n].item())
            expected_dA = cmath.exp(dt[h].item() * a)
            expected_dB = (expected_dA - 1) / a
            assert abs(complex(dA[h, n].item()) - expected_dA) < 1e-14
            assert abs(complex(dB[h, n].item()) - expected_dB) < 1e-14


def test_s4d_zoh_approaches_euler_for_small_dt_without_cancellation() -> None:
    A = torch.tensor([[-0.5 + 0j, -0.5 + math.pi * 31j]], dtype=torch.complex128)
    for dt_value in (1e-3, 1e-5, 1e-7):
        dt = torch.tensor([dt_value], dtype=f64)
        dA, dB = discretize_zoh(dt, A)
        # dA = 1 + dt A + O(dt^2), dB = dt + O(dt^2 |A|)
        assert (dA - (1 + dt_value * A)).abs().max() < (dt_value * A.abs()).max() ** 2
        assert ((dB - dt_value).abs() / dt_value).max() < dt_value * A.abs().max()
        # float32 keeps dB's relative precision at small dt (exp(z) - 1 would lose it)
        _, dB32 = discretize_zoh(dt.float(), A.to(torch.complex64))
        rel = ((dB32.to(torch.complex128) - dB).abs() / dB.abs()).max()
        assert rel < 1e-6, (dt_value, rel)


# --------------------------------------------------------------------------------------------
# Gradients, dtypes, states, config
# --------------------------------------------------------------------------------------------


class _Stepper(torch.nn.Module):
    """forward = layer.step, so torch.func.functional_call can swap the step's parameters."""

    def __init__(self, layer: S4D) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, u_t: torch.Tensor, state: S4DState) -> tuple[torch.Tensor, S4DState]:
        return self.layer.step(u_t, state)


def test_s4d_gradcheck_through_the_layer_and_the_initial_state() -> None:
    torch.manual_seed(0)
    layer = S4D(S4DConfig(d_model=2, d_state=4)).double()
    names = ["log_dt", "A_log_re", "A_im", "C", "D"]
    params = {name: getattr(layer, name).detach().clone().requires_grad_() for name in names}
    u = torch.randn(1, 5, 2, dtype=f64, requires_grad=True)
    s0 = torch.randn(1, 2, 2, 2, dtype=f64, requires_grad=True)

    stepper = _Stepper(layer)

    def f(u, s0, *values):
        call = dict(zip(names, values, strict=True))
        y, state = torch.func.functional_call(layer, call, (u, S4DState(s0)))
        inner = {f"layer.{name}": value for name, value in call.items()}
        y_step, state_step = torch.func.functional_call(stepper, inner, (u[:, 0], S4DState(s0)))
        return y, state.ssm_state, y_step, state_step.ssm_state

    assert torch.autograd.gradcheck(f, (u, s0, *params.values()), eps=1e-6, atol=1e-6)


def test_s4d_state_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = S4D(S4DConfig(d_model=8, d_state=16))
    u = torch.randn(2, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = layer.init_state(2, dtype=torch.bfloat16)
        assert state.ssm_state.dtype == torch.float32
        y, state = layer(u[:, :5], state)
        assert y.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
        y, state = layer(u[:, 5:].bfloat16(), state)
        assert state.ssm_state.dtype == torch.float32
        y_t, state = layer.step(u[:, 0].bfloat16(), state)
        assert y_t.shape == (2, 8) and state.ssm_state.dtype == torch.float32
    assert torch.isfinite(y.float()).all()
    (y.float().square().mean() + state.ssm_state.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    # under autocast the SSM sees the bf16 input's values but computes them in float32
    with torch.no_grad():
        _, s_float = layer(u[:, :5].bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _, s_auto = layer(u[:, :5].bfloat16())
    torch.testing.assert_close(s_auto.ssm_state, s_float.ssm_state, atol=1e-6, rtol=1e-6)


def test_s4d_state_detaches_and_survives_a_weights_only_checkpoint() -> None:
    torch.manual_seed(0)
    layer = S4D(S4DConfig(d_model=4, d_state=8))
    u = torch.randn(2, 10, 4, requires_grad=True)
    _, state = layer(u[:, :6])
    assert state.ssm_state.requires_grad and not state.detach().ssm_state.requires_grad
    buffer = io.BytesIO()
    torch.save(flatten_state(state.detach()), buffer)
    buffer.seek(0)
    restored = unflatten_state(torch.load(buffer, weights_only=True))
    assert isinstance(restored, S4DState) and not restored.ssm_state.is_complex()
    with torch.no_grad():
        y_a, _ = layer(u[:, 6:], state)
        y_b, _ = layer(u[:, 6:], restored)
    torch.testing.assert_close(y_a, y_b, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("d_model", {"d_model": 0}),
        ("d_state", {"d_state": 7}),
        ("d_state", {"d_state": 0}),
        ("init", {"init": "legs"}),
        ("dt_min", {"dt_min": 0.0}),
        ("dt_max", {"dt_min": 0.2, "dt_max": 0.1}),
        ("activation", {"activation": "relu"}),
    ],
)
def test_s4d_config_errors_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        S4DConfig(**{"d_model": 4, **kwargs})
