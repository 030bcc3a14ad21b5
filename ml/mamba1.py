"""Mamba-1 mixer in pure PyTorch, with a carried recurrent state.

The math follows "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao,
2023), the selective scan with a diagonal A per channel. Per channel d, with state h_t of shape
(N,) and B_t, C_t shared across channels:

    h_t = exp(delta_t A_d) * h_{t-1} + delta_t x_t B_t        y_t = h_t · C_t + D_d x_t

`selective_scan` computes this for a whole sequence in two levels: the sequence is cut into
chunks, the recurrence runs inside every chunk at once from a zero state (a loop over the
positions of one chunk, vectorized over chunks), a short sequential pass over chunk boundaries
gives each chunk's true initial state, and that state's decayed contribution is added back.
`selective_scan_step` is the same recurrence for one position; the tests hold the two to the
same numbers.

Parameter names and shapes match `mamba_ssm.modules.mamba_simple.Mamba`, so a state_dict moves
between this layer and mamba_ssm. With `backend="fused"` (or "auto" on CUDA with mamba_ssm
installed) the scan runs in mamba_ssm's CUDA kernel `selective_scan_fn`; that kernel has no
initial-state input, so a carried state is added by linearity (see `_selective_scan_fused`).

Axes in shape comments: B batch, L sequence, D d_inner channels, N state dim, R dt rank,
c chunks, l positions inside a chunk, K conv width.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ml.mamba2 import _scan_dtype, load_kernel, use_fused_kernel

logger = logging.getLogger("mambacast.mamba1")

Backend = Literal["auto", "torch", "fused"]
_FUSED_MODULE = "mamba_ssm.ops.selective_scan_interface"


@dataclass(frozen=True)
class Mamba1Config:
    d_model: int
    d_state: int = 16  # N
    d_conv: int = 4  # K
    expand: int = 2
    dt_rank: int | None = None  # R; None -> ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj
    chunk_size: int = 64  # time chunk of the PyTorch scan
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_state", "d_conv", "expand", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba1Config.{name} must be an integer >= 1; got {value!r}")
        if self.dt_rank is not None and (
            isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 1
        ):
            raise ValueError(
                f"Mamba1Config.dt_rank must be None or an integer >= 1; got {self.dt_rank!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                "Mamba1Config.dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got "
                f"dt_min={self.dt_min}, dt_max={self.dt_max}"
            )
        if not self.dt_init_floor > 0:
            raise ValueError(f"Mamba1Config.dt_init_floor must be > 0; got {self.dt_init_floor}")
        if self.backend not in ("auto", "torch", "fused"):
            raise ValueError(
                f"Mamba1Config.backend must be 'auto', 'torch' or 'fused'; got {self.backend!r}"
            )

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_size(self) -> int:
        """R, the rank of the delta projection."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)


@dataclass(frozen=True)
class Mamba1State:
    """Everything a Mamba1 layer needs to continue a sequence exactly where it stopped.

    conv_state: (B, D, K-1), the last K-1 pre-activation conv inputs (the x branch).
    ssm_state: (B, D, N), float32 (float64 when the layer runs in float64).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def detach(self) -> Mamba1State:
        """The same state cut from the autograd graph (truncated BPTT boundaries)."""
        return Mamba1State(self.conv_state.detach(), self.ssm_state.detach())


# --------------------------------------------------------------------------------------------
# The selective scan: two-level chunked (whole sequences) and one step (recurrence)
# --------------------------------------------------------------------------------------------


class _ChunkRecurrence(torch.autograd.Function):
    """h_0 = b_0, h_l = a_l * h_{l-1} + b_l along dim 0, for all the other dims at once.

    Returns h and a copy of its last position (so that a caller reading only h[-1] does not
    make backward build a full-size zero gradient for the rest).

    Written as a Function so that the loop writes into one preallocated output and backward is
    the reverse recurrence g_l = dh_l + a_{l+1} g_{l+1} (then db_l = g_l and
    da_l = g_l * h_{l-1}), rather than an autograd graph of 2 nodes and a saved tensor per step.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.empty_like(b)
        h[0] = b[0]
        for step in range(1, b.shape[0]):
            torch.addcmul(b[step], a[step], h[step - 1], out=h[step])
        ctx.save_for_backward(a, h)
        return h, h[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx, grad_h: torch.Tensor | None, grad_last: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(h)
        g = torch.empty_like(grad_h)
        last = grad_h.shape[0] - 1
        g[last] = grad_h[last] if grad_last is None else grad_h[last] + grad_last
        for step in range(last - 1, -1, -1):
            torch.addcmul(grad_h[step], a[step + 1], g[step + 1], out=g[step])
        grad_a = torch.empty_like(a)
        grad_a[0] = 0.0
        torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan. Returns y (B, L, D) in x's dtype and the final state (B, D, N).

    x, delta: (B, L, D), delta already positive (after softplus); A: (D, N), negative;
    B, C: (B, L, N); initial_state: (B, D, N) or None for zeros. Any L works: the tail is padded
    with delta = 0 (decay 1, no input), which leaves the state unchanged. Computes in float32
    (float64 for float64 inputs) whatever the autocast setting; the final state is in that
    dtype. The D skip connection is not included.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    batch, seqlen, d_inner = x.shape
    dstate = A.shape[-1]
    dtype = _scan_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_, delta_, A_, B_, C_ = (t.to(dtype) for t in (x, delta, A, B, C))
        if seqlen == 0:
            state = (
                x_.new_zeros(batch, d_inner, dstate)
                if initial_state is None
                else initial_state.to(dtype)
            )
            return x, state
        T = max(1, min(chunk_size, seqlen))  # a chunk longer than the sequence only pads
        pad = (-seqlen) % T
        if pad:
            x_ = F.pad(x_, (0, 0, 0, pad))
            delta_ = F.pad(delta_, (0, 0, 0, pad))
            B_ = F.pad(B_, (0, 0, 0, pad))
            C_ = F.pad(C_, (0, 0, 0, pad))
        nchunks = (seqlen + pad) // T

        # position inside the chunk first, so that each step of the loop reads a contiguous
        # block: (l, B, c, ...)
        def to_chunks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, nchunks, T, t.shape[-1]).permute(2, 0, 1, 3).contiguous()

        delta_c = to_chunks(delta_)  # (l, B, c, D)
        B_c = to_chunks(B_)  # (l, B, c, N)
        C_c = to_chunks(C_)  # (l, B, c, N)
        decay = (delta_c[..., None] * A_).exp_()  # (l, B, c, D, N), in (0, 1]
        inputs = (delta_c * to_chunks(x_))[..., None] * B_c[:, :, :, None, :]  # (l, B, c, D, N)

        # 1. inside every chunk at once, from a zero state
        h_local, h_local_end = _ChunkRecurrence.apply(decay, inputs)  # (l, B, c, D, N)

        # 2. decay from each chunk's start through position l. A is constant in time, so the
        #    exponent is A times a cumsum of delta over (l, B, c, D) only; it is <= 0, so this
        #    is never exp of a positive number however long the chunk or large delta
        delta_cum = torch.cumsum(delta_c, dim=0)  # (l, B, c, D)
        decay_from_start = (delta_cum[..., None] * A_).exp_()  # (l, B, c, D, N)
        chunk_decay = torch.exp(delta_cum[-1, ..., None] * A_)  # (B, c, D, N): across each chunk

        # 3. the state entering each chunk, one chunk boundary at a time: the state entering
        #    chunk z+1 is the state entering z decayed across z, plus z's own end state
        state = (
            x_.new_zeros(batch, d_inner, dstate)
            if initial_state is None
            else initial_state.to(dtype)
        )  # (B, D, N)
        entering = []
        # unbind once: indexing chunk z in the loop would make backward write a full-size
        # zero gradient per chunk, quadratic in the number of chunks
        for decay_z, own_z in zip(chunk_decay.unbind(1), h_local_end.unbind(1), strict=True):
            entering.append(state)
            state = decay_z * state + own_z
        states = torch.stack(entering, dim=1)  # (B, c, D, N)

        # 4. each position's state = own chunk's part + the entering state decayed to it,
        #    read out by C_l
        h_all = torch.addcmul(h_local, decay_from_start, states)  # (l, B, c, D, N)
        y = (h_all @ C_c[..., None]).squeeze(-1)  # (l, B, c, D)
        y = y.permute(1, 2, 0, 3).reshape(batch, nchunks * T, d_inner)
    return y[:, :seqlen].to(x.dtype), state


def selective_scan_step(
    state: torch.Tensor,
    x_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the selective scan. Returns y_t (B, D) in x_t's dtype and the new state.

    state: (B, D, N); x_t, delta_t: (B, D), delta positive; A: (D, N); B_t, C_t: (B, N).
    h' = exp(delta A) h + delta x B and y = h' · C, in the state's dtype; no D term.
    """
    dtype = state.dtype
    with torch.autocast(device_type=x_t.device.type, enabled=False):
        delta_ = delta_t.to(dtype)
        decay = torch.exp(delta_[..., None] * A.to(dtype))  # (B, D, N)
        new_state = decay * state + (delta_ * x_t.to(dtype))[..., None] * B_t.to(dtype)[:, None]
        y = (new_state @ C_t.to(dtype)[..., None]).squeeze(-1)  # (B, D)
    return y.to(x_t.dtype), new_state


# --------------------------------------------------------------------------------------------
# Optional fused kernel (mamba_ssm's selective_scan_cuda)
# --------------------------------------------------------------------------------------------


@functools.cache
def _fused_selective_scan() -> tuple[Callable[..., object] | None, str]:
    """(selective_scan_fn, "") when it imports, else (None, why not)."""
    return load_kernel(_FUSED_MODULE, "selective_scan_fn")


# the kernel is CUDA-only; the tests set this to False to run a fake kernel through the glue
_FUSED_NEEDS_CUDA = True

_fallback_logged: set[str] = set()  # one log line per distinct reason per process


def _selective_scan_fused(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `selective_scan`, computed by mamba_ssm's `selective_scan_fn`.

    The kernel always starts from a zero state. The recurrence is linear in the state, so
    starting from h0 adds exp(delta_1 A + ... + delta_t A) * h0 to h_t: the term
    C_t · (exp(A * cumsum(delta)_t) * h0) to y_t and exp(A * sum(delta)) * h0 to the final
    state. A is constant in time, so the exponent is A times a cumsum over (B, L, D) only.

    Limits of the kernel (mamba_ssm's docstring): the gradient of the returned final state is
    not propagated through the kernel's part of it (only through the h0 term), so a loss on the
    state itself gets a partial gradient. Truncated BPTT never needs it (states are detached
    between chunks and nothing in a chunk reads its final state). The h0 term is computed here
    as (B, L, D, N) tensors, which gives back part of the kernel's memory saving on every chunk
    after the first.
    """
    del chunk_size  # the kernel picks its own
    scan, why = _fused_selective_scan()
    if scan is None:
        raise RuntimeError(why)
    dtype = _scan_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_, delta_, A_, B_, C_ = (t.to(dtype) for t in (x, delta, A, B, C))
        y, last_state = scan(
            x_.transpose(1, 2).contiguous(),  # (B, D, L)
            delta_.transpose(1, 2).contiguous(),  # (B, D, L)
            A_.contiguous(),  # (D, N)
            B_.transpose(1, 2).contiguous(),  # (B, N, L)
            C_.transpose(1, 2).contiguous(),  # (B, N, L)
            return_last_state=True,
        )
        y = y.transpose(1, 2).to(dtype)  # (B, L, D)
        final_state = last_state.to(dtype)  # (B, D, N)
        if initial_state is not None:
            h0 = initial_state.to(dtype)
            cum = torch.cumsum(delta_, dim=1)  # (B, L, D), >= 0
            decay_from_start = torch.exp(cum[..., None] * A_)  # (B, L, D, N), in (0, 1]
            y = y + ((decay_from_start * h0[:, None]) @ C_[..., None]).squeeze(-1)
            final_state = final_state + decay_from_start[:, -1] * h0
    return y.to(x.dtype), final_state


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class Mamba1(nn.Module):
    """The Mamba-1 mixer: (B, L, d_model) -> (B, L, d_model), carrying its state.

    forward(u, state) over a chunk continues exactly from `state`, so running a sequence in
    pieces with the returned state equals running it whole, and `step` equals both.
    """

    def __init__(self, cfg: Mamba1Config) -> None:
        super().__init__()
        self.cfg = cfg
        d_inner, rank, N = cfg.d_inner, cfg.dt_rank_size, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.bias)  # [x, z]
        self.conv1d = nn.Conv1d(
            d_inner,
            d_inner,
            kernel_size=cfg.d_conv,
            groups=d_inner,
            padding=cfg.d_conv - 1,  # unused by forward (it prepends conv_state); as in mamba_ssm
            bias=cfg.conv_bias,
        )
        self.x_proj = nn.Linear(d_inner, rank + 2 * N, bias=False)  # [dt, B, C]
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        # delta = softplus(dt_proj(dt)) starts log-uniform in [dt_min, dt_max]
        with torch.no_grad():
            std = rank**-0.5
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(
                torch.rand(d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                + math.log(cfg.dt_min)
            ).clamp(min=cfg.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True  # as mamba_ssm: keep through a generic re-init
        # S4D-real: A = -(1, 2, ..., N) in every channel
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(d_inner, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True  # same marker as mamba_ssm, for the optimizer's groups
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Mamba1State:
        """Zero state: conv_state in `dtype` (default: the parameters'), ssm_state float32
        (float64 for a float64 layer)."""
        cfg = self.cfg
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return Mamba1State(
            conv_state=torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch, cfg.d_inner, cfg.d_state, device=device, dtype=_scan_dtype(self.A_log.dtype)
            ),
        )

    def _ssm_inputs(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., D) after the conv -> delta (..., D) > 0, A (D, N) < 0, B, C (..., N).

        delta and A are in the scan dtype; the bias is added there, before the softplus (as
        mamba_ssm's delta_bias), so delta does not lose precision to bf16 autocast."""
        cfg = self.cfg
        x_dbl = self.x_proj(x)  # (..., R + 2N)
        dt, B, C = torch.split(x_dbl, [cfg.dt_rank_size, cfg.d_state, cfg.d_state], dim=-1)
        dtype = _scan_dtype(self.A_log.dtype)
        dt = F.linear(dt, self.dt_proj.weight)  # (..., D)
        delta = F.softplus(dt.to(dtype) + self.dt_proj.bias.to(dtype))
        A = -torch.exp(self.A_log.to(dtype))
        return delta, A, B, C

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.cfg.backend == "torch":
            return False
        return use_fused_kernel(
            "Mamba1",
            self.cfg.backend,
            _fused_selective_scan(),
            x,
            "pip install 'mambacast[gpu]', which builds mamba_ssm's selective_scan_cuda",
            "selective scan",
            _fallback_logged,
            logger,
            needs_cuda=_FUSED_NEEDS_CUDA,
        )

    def forward(
        self, u: torch.Tensor, state: Mamba1State | None = None
    ) -> tuple[torch.Tensor, Mamba1State]:
        """u: (B, L, d_model) -> y (B, L, d_model) and the state after the last position."""
        cfg = self.cfg
        batch = u.shape[0]
        if u.shape[1] == 0:  # nothing to run: the state carries over unchanged
            return self.out_proj(u.new_zeros(batch, 0, cfg.d_inner)), (
                state if state is not None else self.init_state(batch, u.device)
            )
        ssm_state0 = None if state is None else state.ssm_state  # None: zeros, skipped
        conv_state0 = (
            self.init_state(batch, u.device).conv_state if state is None else state.conv_state
        )
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, D) each

        # causal depthwise conv whose left context is the carried conv_state, not zeros
        window = torch.cat([conv_state0.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (B, D, K-1+L)
        # a copy, not a view: a view would keep the whole chunk's window alive with the state
        conv_state = window[..., window.size(-1) - (cfg.d_conv - 1) :].clone()  # (B, D, K-1)
        x = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=cfg.d_inner)
        x = F.silu(x).transpose(1, 2)  # (B, L, D)

        delta, A, B, C = self._ssm_inputs(x)
        scan = _selective_scan_fused if self._use_fused(x) else selective_scan
        y, ssm_state = scan(x, delta, A, B, C, ssm_state0, cfg.chunk_size)  # (B, L, D)
        if state is None:
            ssm_state = ssm_state.to(_scan_dtype(self.A_log.dtype))
        y = y + x * self.D.to(y.dtype)
        y = y * F.silu(z)
        return self.out_proj(y), Mamba1State(conv_state, ssm_state)

    def step(self, u_t: torch.Tensor, state: Mamba1State) -> tuple[torch.Tensor, Mamba1State]:
        """One position in O(1): u_t (B, d_model) -> y_t (B, d_model) and the next state."""
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (B, D) each

        window = torch.cat([state.conv_state.to(x.dtype), x[..., None]], dim=-1)  # (B, D, K)
        x = (window * self.conv1d.weight[:, 0, :].to(window.dtype)).sum(-1)  # (B, D)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias.to(x.dtype)
        x = F.silu(x)

        delta, A, B, C = self._ssm_inputs(x)
        y, ssm_state = selective_scan_step(state.ssm_state, x, delta, A, B, C)  # (B, D)
        y = y + x * self.D.to(y.dtype)
        y = y * F.silu(z)
        return self.out_proj(y), Mamba1State(window[..., 1:], ssm_state)
