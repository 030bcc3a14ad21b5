"""An LSTM with attention pooling over a sliding window of past bars: the windowed baseline of the
common Bitcoin tutorials ("LSTM + attention"), behind the sequence models' mixer contract.

For every bar t the mixer reads the window of its last `window` inputs h_{t-W+1} .. h_t, runs
a fresh multi-layer LSTM over it from a zero state, and pools the W outputs o_1 .. o_W with
additive attention (Bahdanau et al., 2015, in the "attention pooling" form with one learned
context vector u):

    e_i = u . tanh(W_a o_i + b_a)        a = softmax(e)        y_t = out(sum_i a_i o_i)

Nothing older than W bars reaches the forecast at t: a windowed, non-stateful model, exactly as
the tutorials' sliding-window samples. The only thing carried from one chunk to the next is the
input window itself (the last W - 1 inputs, zeros before the series starts, as the tutorials
zero-pad the first windows), so running a series in chunks equals running it whole, and
`SequenceBaseline.step` equals both. Its cost is W LSTM steps per bar (all bars of a chunk run
as one batch), against one step for the stateful LSTM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WindowState:
    """inputs: (B, W - 1, D), the mixer's last W - 1 inputs, oldest first."""

    inputs: torch.Tensor

    def detach(self) -> WindowState:
        return WindowState(self.inputs.detach())


class AttentionLSTMMixer(nn.Module):
    """(B, L, D) -> (B, L, D): per position, an LSTM over its window and attention pooling."""

    def __init__(self, d_model: int, n_layers: int, window: int) -> None:
        super().__init__()
        if window < 1 or n_layers < 1:
            raise ValueError(
                f"attention_lstm window and n_layers must be >= 1; got {window}, {n_layers}"
            )
        self.d_model, self.window = d_model, window
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)
        self.score = nn.Linear(d_model, d_model)  # W_a, b_a
        self.context = nn.Parameter(torch.randn(d_model) / d_model**0.5)  # u
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> WindowState:
        w = self.out_proj.weight
        return WindowState(
            torch.zeros(
                batch,
                self.window - 1,
                self.d_model,
                device=device if device is not None else w.device,
                dtype=dtype if dtype is not None else w.dtype,
            )
        )

    def forward(
        self, x: torch.Tensor, state: WindowState | None = None
    ) -> tuple[torch.Tensor, WindowState]:
        """x: (B, L, D) -> (B, L, D) and the window after the last position."""
        batch, seqlen, d = x.shape
        if state is None:
            state = self.init_state(batch, x.device, x.dtype)
        if seqlen == 0:  # nothing to run: the window carries over unchanged
            return x.new_zeros(batch, 0, d), state
        padded = torch.cat([state.inputs.to(x.dtype), x], dim=1)  # (B, W - 1 + L, D)
        windows = padded.unfold(1, self.window, 1)  # (B, L, D, W)
        windows = windows.permute(0, 1, 3, 2).reshape(batch * seqlen, self.window, d)
        outputs, _ = self.lstm(windows)  # (B*L, W, D), each window from a zero state
        scores = torch.tanh(self.score(outputs)) @ self.context.to(outputs.dtype)  # (B*L, W)
        pooled = (F.softmax(scores, dim=-1)[..., None] * outputs).sum(1)  # (B*L, D)
        y = self.out_proj(pooled).reshape(batch, seqlen, d)
        # a copy, not a view: a view would keep the whole chunk's inputs alive with the state
        keep = padded[:, padded.size(1) - (self.window - 1) :].clone()  # (B, W - 1, D)
        return y, WindowState(keep)
