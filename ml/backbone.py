"""The forecaster: Mamba2 + GatedMLP blocks, optional sparse attention, multi-task heads, loss.

    x (B, L, n_features) -> input_proj -> n_layers x Block -> norm_f -> heads

A Block is two pre-norm residual sublayers, x + mixer(norm(x)) then x + mlp(norm2(x)), where the
mixer is a Mamba2 layer, or every `attn_every`-th layer a causal multi-head self-attention over
a sliding window of `attn_window` past positions. Every mixer takes and returns its recurrent
state (Mamba2: conv and SSM state; attention: the last `attn_window` keys and values), so a long
series runs in chunks exactly as it would run whole, and `Forecaster.step` streams one bar at a
time with the same outputs.

Heads, per position: 3 direction logits (down, flat, up over the direction horizon), the p10 and
p90 of the forward return over that horizon (non-crossing by construction), sigma (forward
realized volatility, positive) and one forward log return per horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ml.mamba2 import Backend, Mamba2, Mamba2Config, Mamba2State

TASKS = ("direction", "quantiles", "sigma", "returns")
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -16.0, 4.0  # the sigma head's range, in log units


@dataclass(frozen=True)
class TargetStats:
    """Constants of the training targets that calibrate the heads and the loss's units.

    direction_log_prior (K,): log class frequencies; quantile_values (Q,): the empirical
    quantiles of the quantile target; quantile_scale: its robust spread; log_sigma_level: the
    constant log sigma with the least QLIKE on the training rows (half the log of their mean
    variance; the median would sit low on right-skewed volatility, and QLIKE punishes
    under-prediction most); return_mean, return_scale (H,): per horizon, scale = that sigma x
    sqrt(h).
    """

    direction_log_prior: torch.Tensor
    quantile_values: torch.Tensor
    quantile_scale: torch.Tensor
    log_sigma_level: torch.Tensor
    return_mean: torch.Tensor
    return_scale: torch.Tensor

    @classmethod
    def from_targets(
        cls,
        targets: dict[str, torch.Tensor],
        horizons: tuple[int, ...],
        quantiles: tuple[float, ...],
        n_classes: int,
        keep: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> TargetStats:
        """From target tensors (B, T[, H]) as the trainer sees them; `keep` (B, T) limits them
        to the scored rows; missing targets (NaN, direction < 0) are ignored. With a log
        volatility `anchor` (B, T), the sigma, quantile and return constants are relative to
        it (log sigma - anchor; quantile and return targets / exp(anchor)), as the heads
        predict them."""
        ok_rows = torch.ones(targets["sigma"].shape[:2], dtype=torch.bool)
        if keep is not None:
            ok_rows = ok_rows & keep
        a = torch.zeros(ok_rows.shape, dtype=torch.float64)
        if anchor is not None:
            a = anchor.double()
            ok_rows = ok_rows & torch.isfinite(a)
        d = targets["direction"]
        d = d[ok_rows & ((d >= 0) if not d.is_floating_point() else torch.isfinite(d) & (d >= 0))]
        counts = torch.bincount(d.long(), minlength=n_classes).double() + 1.0  # add-one
        sigma = targets["sigma"].double()
        ok = ok_rows & torch.isfinite(sigma) & (sigma > 0)
        rel_log_sigma = (torch.log(sigma[ok]) - a[ok]) if bool(ok.any()) else sigma[ok]
        q = targets["quantiles"].double()
        ok_q = ok_rows & torch.isfinite(q)
        q = q[ok_q] / torch.exp(a[ok_q])
        if d.numel() == 0 or rel_log_sigma.numel() == 0 or q.numel() == 0:
            raise ValueError(
                "no training targets to calibrate the heads on: every direction, sigma or "
                "quantile target of the training rows is missing"
            )
        # the constant that minimizes QLIKE: half the log of the mean variance ratio
        log_sigma = 0.5 * torch.log(torch.exp(2 * rel_log_sigma).mean())
        ret = targets["returns"].double() / torch.exp(a)[..., None]
        ok_r = torch.isfinite(ret) & ok_rows[..., None]
        n = ok_r.sum((0, 1)).clamp(min=1)
        mean = torch.where(ok_r, ret, 0.0).sum((0, 1)) / n
        levels = torch.tensor(quantiles, dtype=torch.float64)
        qv = torch.quantile(q, levels)
        spread = torch.quantile(q, torch.tensor([0.1, 0.9], dtype=torch.float64))
        q_scale = ((spread[1] - spread[0]) / 2.5631).clamp(min=1e-6)  # a normal's 10-90 width
        scale = torch.exp(log_sigma) * torch.sqrt(torch.tensor(horizons, dtype=torch.float64))
        f = torch.float32
        return cls(
            direction_log_prior=torch.log(counts / counts.sum()).to(f),
            quantile_values=qv.to(f),
            quantile_scale=q_scale.to(f),
            log_sigma_level=log_sigma.to(f),
            return_mean=mean.to(f),
            return_scale=scale.to(f),
        )


def check_quantiles(quantiles: tuple[float, ...]) -> None:
    """Quantile levels for the quantile heads: increasing and strictly inside (0, 1)."""
    if list(quantiles) != sorted(quantiles) or not all(0 < q < 1 for q in quantiles):
        raise ValueError(f"quantiles must be increasing and inside (0, 1); got {quantiles}")


@dataclass(frozen=True)
class BackboneConfig:
    n_features: int
    d_model: int = 256
    n_layers: int = 4
    # Mamba2 mixer
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    backend: Backend = "auto"
    # SwiGLU MLP; None: 8/3 * d_model rounded up to a multiple of 16 (the FLOPs of a 4x MLP)
    mlp_hidden: int | None = None
    # sparse attention: 0 = none; N = layers N-1, 2N-1, ... mix with attention
    attn_every: int = 0
    attn_heads: int = 4
    attn_window: int = 256  # past positions each query sees, besides its own
    dropout: float = 0.0
    norm_eps: float = 1e-5
    # heads
    horizons: tuple[int, ...] = (1, 5, 10, 30, 90)
    quantiles: tuple[float, ...] = (0.1, 0.9)
    n_direction_classes: int = 3
    # the input's last channel is a log volatility anchor (see LayerStack), not a feature
    sigma_anchor: bool = False

    def __post_init__(self) -> None:
        if self.attn_every and self.d_model % self.attn_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of attn_heads={self.attn_heads}"
            )
        if self.attn_every < 0 or self.attn_window < 0:
            raise ValueError(
                f"attn_every and attn_window must be >= 0; got {self.attn_every}, "
                f"{self.attn_window}"
            )
        check_quantiles(self.quantiles)
        self.mamba2()  # validates the mixer's shapes now, not at first use

    @classmethod
    def preset(cls, name: str, n_features: int, **overrides: Any) -> BackboneConfig:
        """A named preset (see PRESETS) for `n_features` inputs, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(n_features=n_features, **{**PRESETS[name], **overrides})

    @property
    def mlp_hidden_size(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 16 * math.ceil(8 * self.d_model / 3 / 16)

    def is_attention_layer(self, index: int) -> bool:
        return self.attn_every > 0 and (index + 1) % self.attn_every == 0

    def mamba2(self) -> Mamba2Config:
        return Mamba2Config(
            d_model=self.d_model,
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            headdim=self.headdim,
            ngroups=self.ngroups,
            chunk_size=self.chunk_size,
            norm_eps=self.norm_eps,
            backend=self.backend,
        )


PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {"d_model": 256, "n_layers": 4},
    "sparse_mhsa": {"d_model": 256, "n_layers": 6, "attn_every": 3, "attn_window": 256},
    "tiny": {"d_model": 32, "n_layers": 2, "d_state": 16, "headdim": 16, "chunk_size": 32},
}


# --------------------------------------------------------------------------------------------
# Sublayers
# --------------------------------------------------------------------------------------------


class GatedMLP(nn.Module):
    """SwiGLU: fc2(a * silu(gate)) with [a, gate] = fc1(x) (mamba_ssm's GatedMLP names)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.fc1(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.fc2(a * F.silu(gate))


@dataclass(frozen=True)
class AttentionState:
    """The sliding key/value window: k, v (B, heads, W, head_dim) with W <= attn_window."""

    k: torch.Tensor
    v: torch.Tensor

    def detach(self) -> AttentionState:
        return AttentionState(self.k.detach(), self.v.detach())


LayerState = Mamba2State | AttentionState


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention over the current chunk and a carried window.

    The query at position t sees the keys at t - window .. t. Keys and values of the previous
    `window` positions arrive in the state, so a chunk's first queries see the end of the
    previous chunk exactly as they would in one long forward pass. No positional encoding:
    the Mamba2 layers below already encode order (as in Jamba-style hybrids).
    """

    def __init__(self, d_model: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AttentionState:
        """An empty window."""
        device = device if device is not None else self.qkv.weight.device
        dtype = dtype if dtype is not None else self.qkv.weight.dtype
        empty = torch.zeros(batch, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty)

    def forward(
        self, x: torch.Tensor, state: AttentionState | None = None
    ) -> tuple[torch.Tensor, AttentionState]:
        """x: (B, L, d_model) -> (B, L, d_model) and the window after the last position."""
        batch, seqlen, d_model = x.shape
        if state is None:
            state = self.init_state(batch, x.device, x.dtype)
        q, k, v = self.qkv(x).split(d_model, dim=-1)  # (B, L, D) each
        q, k, v = (
            t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)
        )
        k = torch.cat([state.k.to(k.dtype), k], dim=2)  # (B, nh, W + L, hd)
        v = torch.cat([state.v.to(v.dtype), v], dim=2)  # (B, nh, W + L, hd)
        past = state.k.size(2)
        # lag = how many positions key j lies behind query i; allowed: 0 <= lag <= window
        lag = (
            torch.arange(seqlen, device=x.device)[:, None]
            + past
            - torch.arange(past + seqlen, device=x.device)[None, :]
        )  # (L, W + L)
        mask = (lag >= 0) & (lag <= self.window)  # True = attend; the diagonal is always True
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hd)
        y = self.out_proj(y.transpose(1, 2).flatten(-2))  # (B, L, D)
        keep = max(k.size(2) - self.window, 0)
        return y, AttentionState(k[:, :, keep:], v[:, :, keep:])


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm2(x)), for any stateful sequence mixer.

    The mixer is called as mixer(h, state) -> (h, state) and has init_state(batch, device,
    dtype); the Mamba2 blocks and the sequence baselines differ only in their mixer.
    """

    def __init__(
        self, mixer: nn.Module, d_model: int, norm_eps: float, mlp_hidden: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.norm2 = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = GatedMLP(d_model, mlp_hidden)
        self.dropout = nn.Dropout(dropout)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        return self.mixer.init_state(batch, device, dtype)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """x: (B, L, d_model) -> (B, L, d_model) and the mixer's new state."""
        h, state = self.mixer(self.norm(x), state)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        return x, state


class Block(ResidualBlock):
    """The backbone's block: the mixer is Mamba2, or attention on every `attn_every`-th layer."""

    def __init__(self, cfg: BackboneConfig, index: int) -> None:
        mixer: Mamba2 | CausalSelfAttention
        if cfg.is_attention_layer(index):
            mixer = CausalSelfAttention(cfg.d_model, cfg.attn_heads, cfg.attn_window)
        else:
            mixer = Mamba2(cfg.mamba2())
        super().__init__(mixer, cfg.d_model, cfg.norm_eps, cfg.mlp_hidden_size, cfg.dropout)

    def step(self, x_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """x_t: (B, d_model), one position."""
        if isinstance(self.mixer, Mamba2):
            h, state = self.mixer.step(self.norm(x_t), state)
        else:  # attention over a one-position chunk costs O(window), not O(t)
            h, state = self.mixer(self.norm(x_t)[:, None], state)
            h = h[:, 0]
        x_t = x_t + self.dropout(h)
        return x_t + self.dropout(self.mlp(self.norm2(x_t))), state


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class LayerStack(nn.Module):
    """Input projection -> residual blocks carrying per-layer states -> forecast heads.

    The skeleton shared by the Mamba2 `Forecaster` and the sequence baselines, so they differ
    only in their blocks. Each block is called as block(h, state) -> (h, state) and has
    init_state(batch, device, dtype).
    outputs: direction (..., n_classes) logits, quantiles (..., Q) increasing along the last
    axis, sigma (...) > 0, returns (..., n_horizons); "..." is (B, L) in forward, (B,) in step.
    """

    def __init__(
        self,
        n_features: int,
        d_model: int,
        blocks: list[nn.Module],
        norm_eps: float,
        n_direction_classes: int,
        quantiles: tuple[float, ...],
        horizons: tuple[int, ...],
        sigma_anchor: bool = False,
    ) -> None:
        super().__init__()
        self.aux_channels = int(sigma_anchor)  # trailing input channels that are not features
        self.input_proj = nn.Linear(n_features, d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = nn.RMSNorm(d_model, eps=norm_eps)
        self.direction_head = nn.Linear(d_model, n_direction_classes)
        self.quantile_head = nn.Linear(d_model, len(quantiles))
        self.sigma_head = nn.Linear(d_model, 1)  # log sigma
        self.return_head = nn.Linear(d_model, len(horizons))
        # Output scales, set from the training targets by `calibrate`: the quantile and return
        # heads predict in units of a typical move (sigma * sqrt(h)), so every horizon and the
        # quantiles start O(1) and weigh alike.
        self.register_buffer("quantile_scale", torch.ones(1))
        self.register_buffer("return_scale", torch.ones(len(horizons)))

    @torch.no_grad()
    def calibrate(self, stats: TargetStats, head_gain: float = 0.1) -> None:
        """Start every head at the training targets' constants (class frequencies, quantiles,
        the QLIKE-best constant sigma, mean returns), with its weights shrunk by `head_gain`;
        on a fresh model (a second call would shrink them again).

        A fresh model then predicts climatology up to small noise, and training only has to
        learn what moves the forecast away from it, instead of first unlearning a random start
        (a sigma head starting near 0.69 for targets near 0.02 made QLIKE dominate the loss).
        """
        if stats.return_scale.numel() != self.return_scale.numel():
            raise ValueError(
                f"target stats have {stats.return_scale.numel()} horizons; "
                f"the model has {self.return_scale.numel()}"
            )
        self.quantile_scale.copy_(stats.quantile_scale.reshape(1))
        self.return_scale.copy_(stats.return_scale)
        for head in (self.direction_head, self.quantile_head, self.sigma_head, self.return_head):
            head.weight.mul_(head_gain)
        self.direction_head.bias.copy_(stats.direction_log_prior)
        q = stats.quantile_values / stats.quantile_scale  # increasing, in scale units
        gaps = (q[1:] - q[:-1]).clamp(min=1e-3)
        self.quantile_head.bias.copy_(torch.cat([q[:1], gaps + torch.log(-torch.expm1(-gaps))]))
        self.sigma_head.bias.fill_(float(stats.log_sigma_level))
        self.return_head.bias.copy_(stats.return_mean / stats.return_scale)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> list[Any]:
        """Each block's empty state (zeros, empty attention windows), one per layer."""
        return [block.init_state(batch, device, dtype) for block in self.blocks]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, log sigma anchor or None) of an input x (..., n_features [+ 1])."""
        if not self.aux_channels:
            return x, None
        # a zero variance would make the units 0: keep the anchor inside the sigma head's range
        anchor = torch.nan_to_num(x[..., -1].float(), nan=0.0)
        return x[..., :-1], anchor.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def _heads(self, h: torch.Tensor, anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The forecast heads. With a volatility anchor a (the log of a volatility estimate
        from past returns only, e.g. EWMA), every head works in units of it: log sigma =
        a + head, quantiles and returns = head x exp(a) x their scale. The heads then learn
        corrections to a sensible volatility-scaled forecast instead of absolute levels that
        change tenfold between calm and wild years."""
        with torch.autocast(h.device.type, enabled=False):  # heads in fp32, also under bf16
            return self._heads_fp32(self.norm_f(h.float()), anchor)

    def _heads_fp32(self, h: torch.Tensor, anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raw_q = self.quantile_head(h)  # (..., Q)
        # q_0 free, q_k = q_{k-1} + softplus(.): quantiles cannot cross
        quantiles = torch.cat(
            [raw_q[..., :1], raw_q[..., :1] + torch.cumsum(F.softplus(raw_q[..., 1:]), -1)], -1
        )
        log_sigma = self.sigma_head(h)[..., 0]
        units = torch.ones_like(log_sigma)
        if anchor is not None:
            log_sigma = log_sigma + anchor
            units = torch.exp(anchor)
        log_sigma = log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
        quantile_units = units * self.quantile_scale  # (...)
        return_units = units[..., None] * self.return_scale  # (..., H)
        return {
            "direction": self.direction_head(h),
            "quantiles": quantiles * quantile_units[..., None],
            "log_sigma": log_sigma,
            "sigma": torch.exp(log_sigma),
            "returns": self.return_head(h) * return_units,
            # the units the loss measures quantile and return errors in
            "quantile_units": quantile_units,
            "return_units": return_units,
        }

    def forward(
        self, x: torch.Tensor, state: list[Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """x: (B, L, n_features) -> outputs over (B, L) and the state after the last position."""
        if state is None:
            state = [None] * len(self.blocks)
        if len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers; the model has {len(self.blocks)}")
        x, anchor = self._split(x)
        h = self.input_proj(x)  # (B, L, D)
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            h, s = block(h, s)
            new_state.append(s)
        return self._heads(h, anchor), new_state


class Forecaster(LayerStack):
    """The Mamba2 forecaster: Mamba2 (+ optional attention) and GatedMLP blocks."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(
            cfg.n_features,
            cfg.d_model,
            [Block(cfg, i) for i in range(cfg.n_layers)],
            cfg.norm_eps,
            cfg.n_direction_classes,
            cfg.quantiles,
            cfg.horizons,
            cfg.sigma_anchor,
        )
        self.cfg = cfg

    def step(
        self, x_t: torch.Tensor, state: list[LayerState]
    ) -> tuple[dict[str, torch.Tensor], list[LayerState]]:
        """One bar: x_t (B, n_features) -> outputs over (B,), equal to forward at that position."""
        x_t, anchor = self._split(x_t)
        h = self.input_proj(x_t)  # (B, D)
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            h, s = block.step(h, s)
            new_state.append(s)
        return self._heads(h, anchor), new_state


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _masked_sum(loss: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss over mask, number of valid elements): chunks add up, divided once.

    torch.where, not loss * mask: a non-finite loss at a masked element (inf * 0 = NaN) adds
    exactly zero; the callers also keep masked elements' inputs finite (`_keep`), so their
    gradients are exact zeros rather than 0 * inf."""
    return torch.where(mask, loss, 0).sum(), mask.sum()


def _keep(x: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """x where valid (broadcast over x's trailing dimensions), else `fill`: masked elements
    carry a finite stand-in through the loss, and take a zero gradient."""
    valid = valid.reshape(*valid.shape, *([1] * (x.dim() - valid.dim())))
    return torch.where(valid, x, fill)


class MultiTaskLoss(nn.Module):
    """Uncertainty-weighted multi-task loss (Kendall, Gal & Cipolla, 2018).

    total = sum over tasks of exp(-s_k) * L_k + s_k, with learned log variances s_k; for a
    given L_k the optimum is s_k = log L_k, where each task weighs 1 / L_k. `init_log_vars`
    starts each s_k there from the untrained model's losses, and the trainer gives the s_k their
    own learning rate without weight decay, so the weights track their equilibrium within a run.
    - direction: cross-entropy on the logits.
    - quantiles: pinball loss of each predicted quantile against the realized forward return,
      in units of `quantile_scale`.
    - sigma: QLIKE on variances, r - log(r) - 1 with r = sigma_true^2 / sigma_pred^2, from the
      head's log sigma; the standard volatility-forecast loss (Patton, 2011): minimized at
      sigma_pred = sigma_true, robust to noisy targets, and it weighs under-prediction more.
    - returns: Huber loss per horizon on returns in units of sigma * sqrt(h) (`return_scale`),
      so every horizon weighs alike; forward returns are heavy-tailed.
    targets: any subset of {"direction" (B, L), "quantiles" (B, L), "sigma" (B, L),
    "returns" (B, L, n_horizons)}. NaN entries (and direction < 0) are ignored element by
    element; a task with no valid element adds nothing, not even its s_k.
    """

    def __init__(
        self,
        quantiles: tuple[float, ...] = (0.1, 0.9),
        huber_delta: float = 1.0,
        n_horizons: int | None = None,
    ) -> None:
        super().__init__()
        self.quantiles = tuple(quantiles)
        self.huber_delta = huber_delta
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS)))  # s_k, in TASKS order
        self.register_buffer("quantile_scale", torch.ones(1))
        # per horizon; one shared scale when n_horizons is None
        self.register_buffer("return_scale", torch.ones(n_horizons or 1))

    @torch.no_grad()
    def calibrate(self, stats: TargetStats) -> None:
        """The units of the quantile and return losses, from the training targets."""
        self.quantile_scale.copy_(stats.quantile_scale.reshape(1))
        self.return_scale = stats.return_scale.to(self.return_scale).clone()  # one per horizon

    @torch.no_grad()
    def init_log_vars(self, losses: dict[str, float]) -> None:
        """s_k = log L_k: each task's weight starts at its equilibrium for these losses."""
        for name, value in losses.items():
            if name in TASKS and math.isfinite(value) and value > 0:
                self.log_vars[TASKS.index(name)] = math.log(value)

    def task_sums(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """task -> (summed loss, number of valid target elements), in float32."""
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if "direction" in targets:
            t = targets["direction"]
            valid = torch.isfinite(t) & (t >= 0) if t.is_floating_point() else t >= 0
            logits = _keep(outputs["direction"].float(), valid)  # (B, L, K)
            ce = F.cross_entropy(
                logits.flatten(0, -2), torch.where(valid, t, 0).long().flatten(), reduction="none"
            )
            parts["direction"] = _masked_sum(ce, valid.flatten())
        if "quantiles" in targets:
            t = targets["quantiles"]
            valid = torch.isfinite(t)
            pred = _keep(outputs["quantiles"].float(), valid)  # (B, L, Q)
            tau = torch.tensor(self.quantiles, device=pred.device, dtype=pred.dtype)
            units = outputs.get("quantile_units")
            units = (
                self.quantile_scale if units is None else _keep(units.float(), valid, 1)[..., None]
            )
            err = (torch.where(valid, t, 0)[..., None] - pred) / units  # (B, L, Q)
            pinball = torch.maximum(tau * err, (tau - 1) * err)
            parts["quantiles"] = _masked_sum(pinball, valid[..., None].expand_as(pinball))
        if "sigma" in targets:
            t = targets["sigma"]
            valid = torch.isfinite(t) & (t > 0)  # QLIKE needs a positive realized volatility
            log_pred = _keep(
                outputs["log_sigma"].float()
                if "log_sigma" in outputs
                else torch.log(_keep(outputs["sigma"].float(), valid, 1)),
                valid,
            )
            log_ratio = 2 * (torch.log(torch.where(valid, t, 1.0)) - log_pred)
            qlike = torch.exp(log_ratio) - log_ratio - 1
            parts["sigma"] = _masked_sum(qlike, valid)
        if "returns" in targets:
            t = targets["returns"]
            valid = torch.isfinite(t)
            units = outputs.get("return_units")
            units = self.return_scale if units is None else _keep(units.float(), valid, 1)
            huber = F.huber_loss(
                _keep(outputs["returns"].float(), valid) / units,
                torch.where(valid, t, 0) / units,
                reduction="none",
                delta=self.huber_delta,
            )
            parts["returns"] = _masked_sum(huber, valid)
        return parts

    def task_losses(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """task -> (masked mean loss, number of valid target elements); 0 when none is valid."""
        return {
            k: (total / n.clamp(min=1), n)
            for k, (total, n) in self.task_sums(outputs, targets).items()
        }

    def combine(self, means: dict[str, torch.Tensor | float]) -> torch.Tensor:
        """The weighted total of per-task mean losses (tasks absent from `means` add nothing)."""
        total = self.log_vars.new_zeros(())
        for name, loss in means.items():
            s = self.log_vars[TASKS.index(name)]
            total = total + torch.exp(-s) * loss + s
        return total

    def weights(self) -> dict[str, float]:
        """Each task's current weight exp(-s_k)."""
        return {k: float(torch.exp(-s)) for k, s in zip(TASKS, self.log_vars.detach(), strict=True)}

    def forward(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {task: its unweighted masked mean loss}) for the tasks in targets."""
        parts = {k: loss for k, (loss, n) in self.task_losses(outputs, targets).items() if n > 0}
        return self.combine(parts), parts


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
