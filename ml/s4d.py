"""S4D mixer in pure PyTorch, with a carried recurrent state.

The math follows "On the Parameterization and Initialization of Diagonal State Space Models"
(Gu, Gupta, Goel & Ré, 2022). Each of the H channels is an independent linear time-invariant
SSM with a diagonal complex A of N/2 modes; the other N/2 modes are their complex conjugates,
so they are not stored and the output takes twice the real part. Per channel h and mode n:

    s_t = dA * s_{t-1} + dB * u_t        y_t = 2 Re(sum_n C_n s_t,n) + D * u_t

with the zero-order-hold discretization dA = exp(dt A), dB = (exp(dt A) - 1) / A * B and B
fixed to ones (B is absorbed by C, the S4D default). The layer output is
GLU(Linear(activation(y))), the S4D layer's output map with Linear(H, 2H).

`ssm_convolution` computes a whole sequence at once: the kernel K_k = 2 Re(sum_n C_n dB_n
dA_n^k) from the Vandermonde powers dA^k = exp(k dt A) (Re(dt A) < 0, so they only decay and
long sequences stay finite; factored in blocks, exp(i T dt A) exp(j dt A), so the contractions
are small matmuls), an FFT causal convolution with u, plus the carried state's contribution
2 Re(sum_n C_n dA_n^(t+1) s0_n), and the state after the last position.
`ssm_step` is the recurrence one position at a time; the tests hold both to a float64 loop.

Everything stored is real (parameters, and the state as a (..., 2) real view of the complex
modes), so optimizers, DDP/gloo, sharding of states and weights-only checkpoints need no
complex support. The SSM itself computes in float32 (float64 for float64 inputs or layers)
whatever the autocast setting. Over long sequences float32 rounds the phase k * Im(dt A) and
the FFT: at L = 16384 the outputs agree with float64 to ~1e-4 of their scale at the initial
decay (Re A = -1/2), to ~1e-3 (S4D-Lin) and ~3e-2 (S4D-Inv) when training has slowed the
decay to Re A = -0.01 (measured in the review); run the layer in float64 where that matters.

Axes in shape comments: B batch, L sequence, H channels (d_model), n modes (N/2), k lags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Init = Literal["lin", "inv"]
Activation = Literal["gelu", "silu", "identity"]
_INITS = ("lin", "inv")
_ACTIVATIONS = ("gelu", "silu", "identity")


@dataclass(frozen=True)
class S4DConfig:
    d_model: int  # H
    d_state: int = 64  # N: N/2 complex modes are kept, each with its conjugate implied
    init: Init = "lin"  # S4D-Lin or S4D-Inv imaginary parts of A
    dt_min: float = 0.001
    dt_max: float = 0.1
    activation: Activation = "gelu"  # after the SSM, before the output Linear + GLU

    def __post_init__(self) -> None:
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1; got {self.d_model}")
        if self.d_state < 2 or self.d_state % 2 != 0:
            raise ValueError(
                f"d_state must be even and >= 2 (N/2 complex-conjugate pairs); got {self.d_state}"
            )
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}; got {self.init!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got dt_min={self.dt_min}, "
                f"dt_max={self.dt_max}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}; got {self.activation!r}")

    @property
    def n_modes(self) -> int:
        """Complex modes stored per channel: d_state / 2."""
        return self.d_state // 2


@dataclass(frozen=True)
class S4DState:
    """Everything an S4D layer needs to continue a sequence exactly where it stopped.

    ssm_state: (B, H, N/2, 2), the complex modes as a real view [..., 0] real, [..., 1]
    imaginary; float32 (float64 when the layer runs in float64).
    """

    ssm_state: torch.Tensor

    def detach(self) -> S4DState:
        """The same state cut from the autograd graph (truncated BPTT boundaries)."""
        return S4DState(self.ssm_state.detach())


# --------------------------------------------------------------------------------------------
# Initialization and discretization
# --------------------------------------------------------------------------------------------


def init_A_imag(d_state: int, init: Init, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Imaginary parts of A for the N/2 kept modes n = 0..N/2-1 (the real parts are -1/2).

    S4D-Lin: pi * n.  S4D-Inv: (N / pi) * (N / (2n + 1) - 1), with N = d_state.
    """
    n = torch.arange(d_state // 2, dtype=torch.float64)
    if init == "lin":
        imag = math.pi * n
    elif init == "inv":
        imag = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
    else:
        raise ValueError(f"init must be one of {_INITS}; got {init!r}")
    return imag.to(dtype)


def _scan_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any of the inputs is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _complex_expm1(z: torch.Tensor) -> torch.Tensor:
    """exp(z) - 1 for complex z without the cancellation of exp(z) - 1 when |z| is small.

    exp(x + iy) - 1 = expm1(x) cos(y) - 2 sin(y/2)^2 + i exp(x) sin(y).
    """
    x, y = z.real, z.imag
    return torch.complex(
        torch.expm1(x) * torch.cos(y) - 2 * torch.sin(y / 2) ** 2, torch.exp(x) * torch.sin(y)
    )


def discretize_zoh(dt: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold with B = 1: dA = exp(dt A), dB = (exp(dt A) - 1) / A.

    dt: (H,) real, > 0; A: (H, n) complex with Re(A) < 0. Returns dA, dB: (H, n) complex.
    """
    dtA = dt[:, None] * A  # (H, n)
    return torch.exp(dtA), _complex_expm1(dtA) / A


def _to_complex(state: torch.Tensor) -> torch.Tensor:
    """(..., 2) real view -> (...) complex (any strides; keeps the autograd graph)."""
    return torch.complex(state[..., 0], state[..., 1])


def _to_real(state: torch.Tensor) -> torch.Tensor:
    """(...) complex -> a fresh (..., 2) real tensor (not a view of complex storage)."""
    return torch.stack([state.real, state.imag], dim=-1)


# --------------------------------------------------------------------------------------------
# The SSM: whole sequence (Vandermonde kernel + FFT) and one step (recurrence)
# --------------------------------------------------------------------------------------------


def ssm_convolution(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal SSM over a whole sequence, continuing from `initial_state`.

    u: (B, L, H) real; dt: (H,) real > 0; A, C: (H, n) complex; initial_state: (B, H, n)
    complex or None for zeros. All in one precision (the caller's compute dtype). Returns
    y (B, L, H) real (no D term) and the state after the last position (B, H, n) complex.
    Costs O(B H n L) in small matmuls plus the O(B H L log L) FFT; builds nothing larger than
    (B, H, 2L) (the FFT) and (B, H, n, sqrt(L)).
    """
    batch, seqlen, H = u.shape
    n = A.shape[-1]
    if seqlen == 0:  # nothing to read; the state is carried unchanged
        empty = initial_state if initial_state is not None else u.new_zeros(batch, H, n)
        return u, empty.to(A.dtype)
    dtA = dt[:, None] * A  # (H, n), Re < 0
    dA, dB = torch.exp(dtA), _complex_expm1(dtA) / A
    # The Vandermonde matrix V[h, n, k] = dA^k, k = i*T + j, factors as P_i Q_j with
    # P_i = exp(i T dt A) and Q_j = exp(j dt A), each computed from the exponent directly (not
    # by repeated products): a few roundings from exact, and |P|, |Q| <= 1 only decay (an
    # underflow to 0 is the true value's underflow). So every contraction with V is a small
    # real matmul per channel, and nothing of size (H, n, L) is ever built.
    T = math.isqrt(seqlen - 1) + 1  # block length, T * T >= L
    nb = -(-seqlen // T)  # blocks, nb * T >= L
    steps = torch.arange(T, device=u.device, dtype=dt.dtype)
    Q = torch.exp(dtA[..., None] * steps)  # (H, n, T)
    P = torch.exp(dtA[..., None] * (steps[:nb] * T))  # (H, n, nb), nb <= T
    Q_real = torch.cat([Q.real, Q.imag], dim=1)  # (H, 2n, T)

    def re_times_V(w: torch.Tensor) -> torch.Tensor:
        """Re(sum_n w_n dA_n^k) for complex w (..., H, n) -> (..., H, L)."""
        wP = w[..., None] * P  # (..., H, n, nb): the block's coefficients w_n P_n,i
        lhs = torch.cat([wP.real, -wP.imag], dim=-2).movedim(-3, 0)  # (H, ..., 2n, nb)
        lead = lhs.shape[1:-2]
        lhs = lhs.transpose(-1, -2).reshape(H, -1, 2 * n)  # (H, (...) nb, 2n)
        out = torch.bmm(lhs, Q_real).reshape(H, *lead, nb * T)[..., :seqlen]  # (H, ..., L)
        return out.movedim(0, -2)

    kernel = 2 * re_times_V(C * dB)  # (H, L): K_k = 2 Re(sum_n C_n dB_n dA_n^k)

    u_ = u.transpose(1, 2)  # (B, H, L)
    n_fft = 2 * seqlen  # zero padding to 2L makes the circular convolution causal
    y = torch.fft.irfft(torch.fft.rfft(u_, n=n_fft) * torch.fft.rfft(kernel, n=n_fft), n=n_fft)
    y = y[..., :seqlen]  # (B, H, L)

    # the input's part of the final state: sum_s dA^(L-1-s) dB u_s = dB sum_k dA^k u_{L-1-k}
    #   = dB sum_i P_i sum_j Q_j u_rev[i T + j], u_rev zero-padded to nb * T
    u_rev = F.pad(u_.flip(-1), (0, nb * T - seqlen)).reshape(batch, H, nb, T)
    u_rev = u_rev.permute(1, 3, 0, 2).reshape(H, T, batch * nb)  # (H, T, B nb)
    G = torch.bmm(Q_real, u_rev).reshape(H, 2, n, batch, nb)  # (H, 2, n, B, nb)
    G = torch.complex(G[:, 0], G[:, 1])  # (H, n, B, nb): sum_j Q_j u_rev[i T + j]
    final_state = dB * torch.einsum("hni,hnbi->bhn", P, G)  # (B, H, n)
    if initial_state is not None:
        # y_t += 2 Re(sum_n C_n dA_n^(t+1) s0_n), and the state decays by dA^L = exp(L dt A)
        y = y + 2 * re_times_V(C * dA * initial_state)  # (B, H, L)
        final_state = final_state + torch.exp(seqlen * dtA) * initial_state
    return y.transpose(1, 2), final_state


def ssm_step(
    u_t: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence: s' = dA s + dB u_t, y = 2 Re(sum_n C_n s'_n) (no D term).

    u_t: (B, H) real; dt: (H,); A, C: (H, n) complex; state: (B, H, n) complex.
    Returns y (B, H) real and the new state (B, H, n) complex.
    """
    dA, dB = discretize_zoh(dt, A)
    new_state = dA * state + dB * u_t[..., None]
    return 2 * (C * new_state).sum(-1).real, new_state


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class S4D(nn.Module):
    """The S4D mixer: (B, L, d_model) -> (B, L, d_model), carrying its state.

    forward(u, state) over a chunk continues exactly from `state`, so running a sequence in
    pieces with the returned state equals running it whole, and `step` equals both.
    """

    def __init__(self, cfg: S4DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, n = cfg.d_model, cfg.n_modes
        # dt log-uniform in [dt_min, dt_max], one per channel
        self.log_dt = nn.Parameter(
            torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        )
        # A = -exp(A_log_re) + i A_im, Re(A) = -1/2 at init and negative always
        self.A_log_re = nn.Parameter(torch.full((H, n), math.log(0.5)))
        self.A_im = nn.Parameter(init_A_imag(cfg.d_state, cfg.init).repeat(H, 1))
        # C ~ standard complex normal: variance 1 split over the real and imaginary parts
        self.C = nn.Parameter(torch.randn(H, n, 2) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_dt, self.A_log_re, self.A_im, self.D):
            p._no_weight_decay = True  # read by the trainer's AdamW parameter groups
        self.output_linear = nn.Linear(H, 2 * H)

    def _compute_dtype(self, dtype: torch.dtype | None = None) -> torch.dtype:
        return _scan_dtype(self.log_dt.dtype, *(() if dtype is None else (dtype,)))

    def ssm_parameters(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (H,) real, A (H, n) complex and C (H, n) complex in the compute dtype (float32,
        or float64 when `dtype` or the parameters are float64)."""
        real = self._compute_dtype(dtype)
        dt = torch.exp(self.log_dt.to(real))
        A = torch.complex(-torch.exp(self.A_log_re.to(real)), self.A_im.to(real))
        C = _to_complex(self.C.to(real))
        return dt, A, C

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> S4DState:
        """Zero state (B, H, N/2, 2): float32, or float64 when `dtype` or the layer is float64
        (a low-precision `dtype` such as bfloat16 still gives float32)."""
        cfg = self.cfg
        device = device if device is not None else self.log_dt.device
        return S4DState(
            torch.zeros(
                batch, cfg.d_model, cfg.n_modes, 2, device=device, dtype=self._compute_dtype(dtype)
            )
        )

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "gelu":
            y = F.gelu(y)
        elif act == "silu":
            y = F.silu(y)
        return F.glu(self.output_linear(y), dim=-1)

    def forward(
        self, u: torch.Tensor, state: S4DState | None = None
    ) -> tuple[torch.Tensor, S4DState]:
        """u: (B, L, d_model) -> y (B, L, d_model) and the state after the last position."""
        dtype = self._compute_dtype(u.dtype)
        with torch.autocast(device_type=u.device.type, enabled=False):
            dt, A, C = self.ssm_parameters(dtype)
            s0 = None if state is None else _to_complex(state.ssm_state.to(dtype))
            u_ = u.to(dtype)
            y, s_last = ssm_convolution(u_, dt, A, C, s0)  # (B, L, H), (B, H, n)
            y = (y + u_ * self.D.to(dtype)).to(u.dtype)
        return self._output(y), S4DState(_to_real(s_last))

    def step(self, u_t: torch.Tensor, state: S4DState) -> tuple[torch.Tensor, S4DState]:
        """One position in O(1): u_t (B, d_model) -> y_t (B, d_model) and the next state."""
        dtype = self._compute_dtype(u_t.dtype)
        with torch.autocast(device_type=u_t.device.type, enabled=False):
            dt, A, C = self.ssm_parameters(dtype)
            u_ = u_t.to(dtype)
            y, s = ssm_step(u_, dt, A, C, _to_complex(state.ssm_state.to(dtype)))
            y = (y + u_ * self.D.to(dtype)).to(u_t.dtype)
        return self._output(y), S4DState(_to_real(s))
