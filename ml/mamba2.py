"""Mamba-2 mixer in pure PyTorch, with a carried recurrent state.

The math follows "Transformers are SSMs" (Dao & Gu, 2024), the state-space-duality (SSD) layer
with a scalar-times-identity A per head. Per head h, with state S_t of shape (P, N):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t ⊗ B_t        y_t = S_t · C_t + D_h * x_t

`ssd_chunked` computes this for a whole sequence in chunks: inside a chunk it is a masked,
attention-like quadratic form (the "diagonal blocks"); across chunks only the (P, N) states are
passed, through a short recurrence over chunk boundaries. `ssd_step` is the same recurrence one
step at a time; the tests hold the two to the same numbers.

Parameter names and shapes match `mamba_ssm.modules.mamba2.Mamba2` (rmsnorm=True,
D_has_hdim=False, d_ssm=d_inner), so a state_dict moves between this layer and mamba_ssm. With
`backend="fused"` (or "auto" on CUDA with mamba_ssm installed) the scan runs in mamba_ssm's
Triton kernel `mamba_chunk_scan_combined`; everything around the scan is shared.

Axes in shape comments: B batch, L sequence, H heads, P head dim, G groups, N state dim,
c chunks, l and s positions inside a chunk, K conv width.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("mambacast.mamba2")

Backend = Literal["auto", "torch", "fused"]
_FUSED_MODULE = "mamba_ssm.ops.triton.ssd_combined"


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    d_state: int = 64  # N
    d_conv: int = 4  # K
    expand: int = 2
    headdim: int = 64  # P
    ngroups: int = 1  # G: heads share B and C within a group
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    bias: bool = False  # in_proj / out_proj
    conv_bias: bool = True
    norm_eps: float = 1e-5
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.d_inner % self.headdim != 0:
            raise ValueError(
                f"d_inner = expand * d_model = {self.d_inner} must be a multiple of "
                f"headdim={self.headdim}"
            )
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"nheads={self.nheads} must be a multiple of ngroups={self.ngroups}")
        if self.backend not in ("auto", "torch", "fused"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'fused'; got {self.backend!r}")
        if self.chunk_size < 1 or self.d_conv < 1:
            raise ValueError(
                f"chunk_size and d_conv must be >= 1; got {self.chunk_size}, {self.d_conv}"
            )
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi; got {self.A_init_range}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels that go through the causal conv: x, B and C."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """in_proj output, in the order [z, x, B, C, dt]."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads


@dataclass(frozen=True)
class Mamba2State:
    """Everything a Mamba2 layer needs to continue a sequence exactly where it stopped.

    conv_state: (B, conv_dim, K-1), the last K-1 pre-activation conv inputs (x, B, C channels).
    ssm_state: (B, H, P, N), float32 (float64 when the layer runs in float64).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def detach(self) -> Mamba2State:
        """The same state cut from the autograd graph (truncated BPTT boundaries)."""
        return Mamba2State(self.conv_state.detach(), self.ssm_state.detach())


# --------------------------------------------------------------------------------------------
# The SSD scan: chunked (fast, reference math) and one step (recurrence)
# --------------------------------------------------------------------------------------------


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums: (..., T) -> (..., T, T), out[..., i, j] = x[j+1] + ... + x[i] for i >= j.

    Entries above the diagonal (i < j) are -inf, so exp(segsum) is the causal decay matrix.
    Built from a masked cumsum rather than cumsum[i] - cumsum[j]: the difference of two large
    cumsums loses precision, and exp of an intermediate large positive number overflows.
    """
    T = x.size(-1)
    rep = x[..., None].expand(*x.shape, T)  # (..., T, T): rep[..., i, j] = x[i]
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1)
    out = torch.cumsum(rep.masked_fill(~strictly_lower, 0.0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), 0)
    return out.masked_fill(~lower, -torch.inf)


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs are float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan. Returns y (B, L, H, P) in x's dtype and the final state (B, H, P, N).

    x: (B, L, H, P); dt: (B, L, H), already positive (after softplus); A: (H,), negative;
    B, C: (B, L, G, N); initial_state: (B, H, P, N) or None for zeros. Any L works: the tail is
    padded with dt = 0 (decay 1, no input), which leaves the state unchanged. Computes in
    float32 (float64 for float64 inputs) whatever the autocast setting; the final state is in
    that dtype. The D skip connection is not included.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    dtype = _scan_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_, dt_, A_ = x.to(dtype), dt.to(dtype), A.to(dtype)
        # every head of a group reads that group's B and C: head h uses group h // (H // G)
        B_ = B.to(dtype).repeat_interleave(nheads // ngroups, dim=2)  # (B, L, H, N)
        C_ = C.to(dtype).repeat_interleave(nheads // ngroups, dim=2)  # (B, L, H, N)
        pad = (-seqlen) % chunk_size
        if pad:
            x_ = F.pad(x_, (0, 0, 0, 0, 0, pad))
            dt_ = F.pad(dt_, (0, 0, 0, pad))
            B_ = F.pad(B_, (0, 0, 0, 0, 0, pad))
            C_ = F.pad(C_, (0, 0, 0, 0, 0, pad))
        nchunks = (seqlen + pad) // chunk_size
        x_ = x_.reshape(batch, nchunks, chunk_size, nheads, headdim)  # (B, c, l, H, P)
        B_ = B_.reshape(batch, nchunks, chunk_size, nheads, dstate)  # (B, c, l, H, N)
        C_ = C_.reshape(batch, nchunks, chunk_size, nheads, dstate)  # (B, c, l, H, N)
        dt_ = dt_.reshape(batch, nchunks, chunk_size, nheads)  # (B, c, l, H)

        dA = (dt_ * A_).permute(0, 3, 1, 2)  # (B, H, c, l), <= 0
        dA_cumsum = torch.cumsum(dA, dim=-1)  # (B, H, c, l)
        xdt = x_ * dt_[..., None]  # (B, c, l, H, P): the input term dt_s * x_s

        # 1. within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) dt_s x_s
        decay = torch.exp(segsum(dA))  # (B, H, c, l, s)
        y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C_, B_, decay, xdt)

        # 2. each chunk's own contribution to the state at its end (last row of the decay)
        decay_to_end = decay[..., -1, :]  # (B, H, c, s)
        chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B_, decay_to_end, xdt)

        # 3. pass states across chunk boundaries, one chunk at a time: the state entering
        #    chunk z+1 is the state entering z decayed across z, plus z's own contribution.
        #    Linear in the number of chunks (the all-pairs form is quadratic in it).
        chunk_decay = torch.exp(dA_cumsum[..., -1])  # (B, H, c): total decay across each chunk
        state = (
            x_.new_zeros(batch, nheads, headdim, dstate)
            if initial_state is None
            else initial_state.to(dtype)
        )  # (B, H, P, N)
        entering = []
        # unbind once: indexing chunk z in the loop would make backward write a full-size
        # zero gradient per chunk, quadratic in the number of chunks
        for decay_z, own_z in zip(chunk_decay.unbind(2), chunk_states.unbind(1), strict=True):
            entering.append(state)
            state = decay_z[:, :, None, None] * state + own_z
        states, final_state = torch.stack(entering, dim=1), state  # (B, c, H, P, N), (B, H, P, N)

        # 4. the state entering each chunk, decayed to position l and read out by C_l
        decay_from_start = torch.exp(dA_cumsum)  # (B, H, c, l)
        y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_, states, decay_from_start)

        y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)
    return y[:, :seqlen].to(x.dtype), final_state


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the SSD recurrence. Returns y (B, H, P) in x's dtype and the new state.

    state: (B, H, P, N); x: (B, H, P); dt: (B, H), positive; A: (H,); B, C: (B, G, N).
    S' = exp(dt A) S + dt x ⊗ B and y = S' · C, in the state's dtype; no D term.
    """
    nheads, ngroups = x.shape[1], B.shape[1]
    dtype = state.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        B_ = B.to(dtype).repeat_interleave(nheads // ngroups, dim=1)  # (B, H, N)
        C_ = C.to(dtype).repeat_interleave(nheads // ngroups, dim=1)  # (B, H, N)
        dt_ = dt.to(dtype)
        decay = torch.exp(dt_ * A.to(dtype))  # (B, H)
        new_state = decay[..., None, None] * state + torch.einsum(
            "bh,bhp,bhn->bhpn", dt_, x.to(dtype), B_
        )
        y = torch.einsum("bhpn,bhn->bhp", new_state, C_)
    return y.to(x.dtype), new_state


# --------------------------------------------------------------------------------------------
# Optional fused kernel (mamba_ssm, CUDA + Triton)
# --------------------------------------------------------------------------------------------


def _import_skipping_package_init(name: str) -> object:
    """Import `name` with its top-level package registered but its __init__ not executed.

    mamba_ssm/__init__.py imports the compiled `selective_scan_cuda`, which is often missing
    (e.g. MAMBA_SKIP_CUDA_BUILD installs), while the Triton SSD kernels need none of it.
    """
    root = name.partition(".")[0]
    if root in sys.modules:
        raise ImportError(f"{root} is already imported; nothing to bypass")
    spec = importlib.util.find_spec(root)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"package {root} is not installed")
    before = set(sys.modules)
    sys.modules[root] = importlib.util.module_from_spec(spec)  # has __path__, never executed
    try:
        return importlib.import_module(name)
    except BaseException:
        for added in set(sys.modules) - before:
            if added == root or added.startswith(root + "."):
                del sys.modules[added]
        raise


def load_kernel(module_name: str, attr: str) -> tuple[Callable[..., object] | None, str]:
    """(`module_name.attr`, "") when it imports, else (None, why not); past a package __init__
    that fails on things the kernel does not need (see `_import_skipping_package_init`)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # broad on purpose: CUDA/Triton setups fail in many ways
        first = f"{type(err).__name__}: {err}"
        try:
            module = _import_skipping_package_init(module_name)
        except Exception as err2:
            return None, (
                f"import {module_name} failed ({first}); without the package __init__: "
                f"{type(err2).__name__}: {err2}"
            )
    return getattr(module, attr), ""


def use_fused_kernel(
    layer: str,
    backend: str,
    loaded: tuple[Callable[..., object] | None, str],
    x: torch.Tensor,
    install: str,
    fallback: str,
    logged: set[str],
    log: logging.Logger,
    needs_cuda: bool = True,
) -> bool:
    """Whether a layer with `backend` ("auto", "torch", "fused") runs the fused kernel on x:
    `loaded` is the kernel loader's (kernel, why not). "fused" that cannot run raises naming
    the fix (`install`); "auto" falls back with one log line per distinct reason (`logged`)."""
    if backend == "torch":
        return False
    scan, why = loaded
    if scan is not None and (x.is_cuda or not needs_cuda):
        return True
    if scan is not None:
        why = f"tensors are on {x.device.type}, the fused kernel needs CUDA"
    if backend == "fused":
        raise RuntimeError(
            f"{layer}Config.backend='fused' cannot run: {why}. Install the GPU extra "
            f"({install}) and move the model and inputs to CUDA, or use backend='auto' or "
            "'torch'."
        )
    if why not in logged:
        logged.add(why)
        log.info("%s backend='auto' uses the PyTorch %s: %s", layer, fallback, why)
    return False


@functools.cache
def _fused_scan() -> tuple[Callable[..., object] | None, str]:
    """(mamba_chunk_scan_combined, "") when it imports, else (None, why not)."""
    return load_kernel(_FUSED_MODULE, "mamba_chunk_scan_combined")


_fallback_logged: set[str] = set()  # one log line per distinct reason per process


def _ssd_fused(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ssd_chunked`, computed by mamba_ssm's Triton kernel."""
    scan, why = _fused_scan()
    if scan is None:
        raise RuntimeError(why)
    y, final_state = scan(
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        initial_states=initial_state.contiguous(),
        return_final_states=True,
    )
    return y, final_state.to(_scan_dtype(x.dtype))


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class RMSNormGated(nn.Module):
    """RMSNorm of x * silu(z), per group of `group_size` channels (mamba_ssm's
    RMSNormGated with norm_before_gate=False). Computes in float32."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = _scan_dtype(x.dtype)
        h = x.to(dtype) * F.silu(z.to(dtype))  # (..., D)
        g = h.unflatten(-1, (-1, self.group_size))  # (..., G, D/G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(dtype)).to(x.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer: (B, L, d_model) -> (B, L, d_model), carrying its state.

    forward(u, state) over a chunk continues exactly from `state`, so running a sequence in
    pieces with the returned state equals running it whole, and `step` equals both.
    """

    def __init__(self, cfg: Mamba2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            cfg.conv_dim,
            cfg.conv_dim,
            kernel_size=cfg.d_conv,
            groups=cfg.conv_dim,
            padding=cfg.d_conv
            - 1,  # unused by forward (it prepends conv_state); kept as in mamba_ssm
            bias=cfg.conv_bias,
        )
        # dt = softplus(raw + dt_bias) starts log-uniform in [dt_min, dt_max]
        dt = torch.exp(
            torch.rand(cfg.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
            + math.log(cfg.dt_min)
        ).clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(cfg.nheads).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # same marker as mamba_ssm, for the optimizer's groups
        self.norm = RMSNormGated(cfg.d_inner, cfg.d_inner // cfg.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2State:
        """Zero state: conv_state in `dtype` (default: the parameters'), ssm_state float32."""
        cfg = self.cfg
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return Mamba2State(
            conv_state=torch.zeros(batch, cfg.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch,
                cfg.nheads,
                cfg.headdim,
                cfg.d_state,
                device=device,
                dtype=_scan_dtype(self.A_log.dtype),
            ),
        )

    def _split_heads(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., conv_dim) -> x (..., H, P), B (..., G, N), C (..., G, N)."""
        cfg = self.cfg
        x, B, C = torch.split(
            xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1
        )
        return (
            x.unflatten(-1, (cfg.nheads, cfg.headdim)),
            B.unflatten(-1, (cfg.ngroups, cfg.d_state)),
            C.unflatten(-1, (cfg.ngroups, cfg.d_state)),
        )

    def _dt_and_A(self, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _scan_dtype(self.A_log.dtype)
        dt = F.softplus(dt_raw.to(dtype) + self.dt_bias.to(dtype))  # (..., H), > 0
        A = -torch.exp(self.A_log.to(dtype))  # (H,), < 0
        return dt, A

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.cfg.backend == "torch":
            return False
        return use_fused_kernel(
            "Mamba2",
            self.cfg.backend,
            _fused_scan(),
            x,
            "pip install 'mambacast[gpu]'",
            "SSD scan",
            _fallback_logged,
            logger,
        )

    def forward(
        self, u: torch.Tensor, state: Mamba2State | None = None
    ) -> tuple[torch.Tensor, Mamba2State]:
        """u: (B, L, d_model) -> y (B, L, d_model) and the state after the last position."""
        cfg = self.cfg
        batch, seqlen, _ = u.shape
        if state is None:
            state = self.init_state(batch, u.device)
        zxbcdt = self.in_proj(u)  # (B, L, d_in_proj)
        z, xBC, dt_raw = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

        # causal depthwise conv whose left context is the carried conv_state, not zeros
        window = torch.cat([state.conv_state.to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
        # a copy: a view would keep the whole chunk's window alive with the state
        conv_state = window[..., window.size(-1) - (cfg.d_conv - 1) :].clone()  # (B, conv_dim, K-1)
        xBC = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=cfg.conv_dim)
        xBC = F.silu(xBC).transpose(1, 2)  # (B, L, conv_dim)

        x, B, C = self._split_heads(xBC)  # (B, L, H, P), (B, L, G, N), (B, L, G, N)
        dt, A = self._dt_and_A(dt_raw)  # (B, L, H), (H,)
        scan = _ssd_fused if self._use_fused(x) else ssd_chunked
        y, ssm_state = scan(x, dt, A, B, C, cfg.chunk_size, state.ssm_state)  # (B, L, H, P)
        y = y + x * self.D[:, None].to(y.dtype)
        y = self.norm(y.flatten(-2), z)  # (B, L, d_inner)
        return self.out_proj(y), Mamba2State(conv_state, ssm_state)

    def step(self, u_t: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        """One position in O(1): u_t (B, d_model) -> y_t (B, d_model) and the next state."""
        cfg = self.cfg
        zxbcdt = self.in_proj(u_t)  # (B, d_in_proj)
        z, xBC, dt_raw = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

        window = torch.cat([state.conv_state.to(xBC.dtype), xBC[..., None]], dim=-1)  # (B, C, K)
        xBC = (window * self.conv1d.weight[:, 0, :].to(window.dtype)).sum(-1)  # (B, conv_dim)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias.to(xBC.dtype)
        xBC = F.silu(xBC)

        x, B, C = self._split_heads(xBC)  # (B, H, P), (B, G, N), (B, G, N)
        dt, A = self._dt_and_A(dt_raw)  # (B, H), (H,)
        y, ssm_state = ssd_step(state.ssm_state, x, dt, A, B, C)  # (B, H, P)
        y = y + x * self.D[:, None].to(y.dtype)
        y = self.norm(y.flatten(-2), z)  # (B, d_inner)
        return self.out_proj(y), Mamba2State(window[..., 1:], ssm_state)
