"""Truncated backpropagation through time for stateful sequence models.

The model is called as `model(x, state) -> (outputs, new_state)` on consecutive chunks of
`tbptt_len` steps of every lane; the state flows from one chunk to the next with its gradient
cut at the boundary, and every step has its own target. The loss is an nn.Module (it may own
parameters, such as learned task weights) called as `loss_fn(outputs, targets) -> (loss, parts)`.

Checkpoints hold everything needed to resume exactly: model, loss, optimizer, scheduler, RNG
states, the data position and the carried recurrent state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ml.state import detach_state, flatten_state, unflatten_state

log = logging.getLogger("mambacast.trainer")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, off by default; never applied to validation data."""

    noise_std: float = 0.0  # Gaussian noise added to every (standardized) feature
    magnitude_warp: float = 0.0  # std of a per-lane, per-feature multiplicative factor around 1
    feature_dropout: float = 0.0  # probability of zeroing a feature for a whole chunk of a lane

    @property
    def enabled(self) -> bool:
        return self.noise_std > 0 or self.magnitude_warp > 0 or self.feature_dropout > 0


@dataclass(frozen=True)
class TrainConfig:
    tbptt_len: int = 128
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 1e-4  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    patience: int = 4  # epochs without validation improvement before stopping
    seed: int = 0
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "off"
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = end of each epoch only
    nan_lr_backoff: float = 0.5  # learning-rate factor applied after a non-finite step
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tbptt_len < 1 or self.epochs < 1:
            raise ValueError(
                f"tbptt_len and epochs must be >= 1, got {self.tbptt_len}, {self.epochs}"
            )
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")


@dataclass
class Sequences:
    """Lanes of equal length: x (B, T, F) and targets name -> (B, T, ...) with NaN = no target."""

    x: torch.Tensor
    targets: dict[str, torch.Tensor]
    loss_mask: torch.Tensor | None = None  # (B, T) bool; False = warm-up step, not scored

    def __post_init__(self) -> None:
        b, t = self.x.shape[:2]
        for name, y in self.targets.items():
            if y.shape[:2] != (b, t):
                raise ValueError(
                    f"target {name!r} has shape {tuple(y.shape)}; expected ({b}, {t}, ...)"
                )

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = {k: v[:, start:end] for k, v in self.targets.items()}
        if self.loss_mask is not None:
            keep = self.loss_mask[:, start:end]
            targets = {k: _mask_targets(v, keep) for k, v in targets.items()}
        return self.x[:, start:end], targets


@dataclass
class TrainResult:
    best_val_loss: float
    epochs_run: int
    steps: int
    skipped_steps: int
    history: list[dict[str, float]]
    stopped_early: bool


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` optimizer steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        train: Sequences,
        val: Sequences,
        cfg: TrainConfig,
        checkpoint_dir: Path | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.train_data, self.val_data, self.cfg = (
            model,
            loss_fn,
            train,
            val,
            cfg,
        )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_step = on_step  # called with the global step after every optimizer step
        self.device = next(model.parameters()).device
        params = [p for p in [*model.parameters(), *loss_fn.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.chunks_per_epoch = math.ceil(train.length / cfg.tbptt_len)
        self.total_steps = cfg.epochs * self.chunks_per_epoch
        self.lr_scale = 1.0  # lowered by the NaN guard
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.chunk, self.step, self.skipped = 0, 0, 0, 0
        self.best_val, self.bad_epochs = math.inf, 0
        self.best_weights: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self.carried: Any = None
        self._epoch_losses: list[float] = []

    def _lr_lambda(self, step: int) -> float:
        c = self.cfg
        return self.lr_scale * lr_factor(step, c.warmup_steps, self.total_steps, c.min_lr_ratio)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        """Train until `epochs` or early stopping; resumes from the latest checkpoint if any."""
        if resume and self.checkpoint_dir and (self.checkpoint_dir / "last.pt").exists():
            self.load_checkpoint(self.checkpoint_dir / "last.pt")
        else:
            torch.manual_seed(self.cfg.seed)
        stopped_early = False
        while self.epoch < self.cfg.epochs:
            self._train_epoch()
            val_loss = self.evaluate(self.val_data)
            train_loss = sum(self._epoch_losses) / max(1, len(self._epoch_losses))
            self.history.append(
                {
                    "epoch": self.epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
            )
            log.info(
                "epoch %d/%d: train loss %.5f, validation loss %.5f, lr %.2e",
                self.epoch + 1,
                self.cfg.epochs,
                train_loss,
                val_loss,
                self.optimizer.param_groups[0]["lr"],
            )
            if val_loss < self.best_val:
                self.best_val, self.bad_epochs = val_loss, 0
                self.best_weights = {k: v.detach().clone() for k, v in self._weights().items()}
            else:
                self.bad_epochs += 1
            self.epoch, self.chunk, self.carried, self._epoch_losses = self.epoch + 1, 0, None, []
            self.save_checkpoint()
            if self.bad_epochs >= self.cfg.patience:
                stopped_early = True
                log.info("early stop: no validation improvement for %d epochs", self.bad_epochs)
                break
        if self.best_weights is not None:
            self._load_weights(self.best_weights)
        return TrainResult(
            self.best_val, self.epoch, self.step, self.skipped, self.history, stopped_early
        )

    def _train_epoch(self) -> None:
        self.model.train()
        self.loss_fn.train()
        L = self.cfg.tbptt_len
        bar = tqdm(
            range(self.chunk, self.chunks_per_epoch),
            disable=not self.cfg.progress,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            leave=False,
        )
        for c in bar:
            x, targets = self.train_data.chunk(c * L, (c + 1) * L)
            x = self._augment(x.to(self.device))
            targets = {k: v.to(self.device) for k, v in targets.items()}
            with self._autocast():
                outputs, state = self.model(x, self.carried)
                loss, _ = self.loss_fn(outputs, targets)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                grads = [
                    p.grad for p in self.optimizer.param_groups[0]["params"] if p.grad is not None
                ]
                norm = nn.utils.clip_grad_norm_(
                    self.optimizer.param_groups[0]["params"], self.cfg.grad_clip
                )
                ok = bool(torch.isfinite(norm)) and all(
                    bool(torch.isfinite(g).all()) for g in grads
                )
            if ok:
                self.optimizer.step()
                self._epoch_losses.append(float(loss.detach()))
                self.carried = detach_state(state)
            else:
                # Skip the step, forget the (possibly poisoned) state, and back off the rate.
                self.skipped += 1
                self.lr_scale *= self.cfg.nan_lr_backoff
                self.carried = None
                log.warning(
                    "non-finite loss or gradient at step %d: step skipped, lr x%.2f",
                    self.step,
                    self.cfg.nan_lr_backoff,
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            self.chunk = c + 1
            if ok:
                bar.set_postfix(loss=f"{self._epoch_losses[-1]:.4f}")
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step:
                self.on_step(self.step)

    @torch.no_grad()
    def evaluate(self, data: Sequences) -> float:
        """Mean loss over `data`, chunk by chunk with the state carried, no augmentation."""
        self.model.eval()
        self.loss_fn.eval()
        state, total, n = None, 0.0, 0
        L = self.cfg.tbptt_len
        for c in range(math.ceil(data.length / L)):
            x, targets = data.chunk(c * L, (c + 1) * L)
            with self._autocast():
                outputs, state = self.model(x.to(self.device), state)
                loss, _ = self.loss_fn(outputs, {k: v.to(self.device) for k, v in targets.items()})
            if torch.isfinite(loss):
                total, n = total + float(loss), n + 1
        return total / n if n else math.inf

    # -- pieces -----------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        a = self.cfg.augment
        if not a.enabled:
            return x
        g = self.generator
        b, _, f = x.shape
        if a.magnitude_warp > 0:
            x = x * (1 + a.magnitude_warp * torch.randn(b, 1, f, generator=g)).to(x)
        if a.noise_std > 0:
            x = x + a.noise_std * torch.randn(x.shape, generator=g).to(x)
        if a.feature_dropout > 0:
            keep = (torch.rand(b, 1, f, generator=g) >= a.feature_dropout).to(x)
            x = x * keep
        return x

    def _autocast(self):
        use_bf16 = self.cfg.amp == "bf16" or (self.cfg.amp == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {
            **{f"model.{k}": v for k, v in self.model.state_dict().items()},
            **{f"loss.{k}": v for k, v in self.loss_fn.state_dict().items()},
        }

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
        self.loss_fn.load_state_dict(
            {k[5:]: v for k, v in weights.items() if k.startswith("loss.")}
        )

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = {
            "weights": self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "aug_rng": self.generator.get_state(),
            "position": torch.tensor(
                [self.epoch, self.chunk, self.step, self.skipped, self.bad_epochs]
            ),
            "floats": torch.tensor([self.best_val, self.lr_scale], dtype=torch.float64),
            "best_weights": self.best_weights or {},
            "carried": flatten_state(self.carried),
            "history": [
                [h["epoch"], h["train_loss"], h["val_loss"], h["lr"]] for h in self.history
            ],
        }
        path = self.checkpoint_dir / "last.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)  # a crash while saving leaves the previous checkpoint
        return path

    def load_checkpoint(self, path: Path) -> None:
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self._load_weights(ckpt["weights"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.generator.set_state(ckpt["aug_rng"])
        self.epoch, self.chunk, self.step, self.skipped, self.bad_epochs = (
            int(v) for v in ckpt["position"]
        )
        self.best_val, self.lr_scale = (float(v) for v in ckpt["floats"])
        self.best_weights = ckpt["best_weights"] or None
        self.history = [
            dict(zip(("epoch", "train_loss", "val_loss", "lr"), h, strict=True))
            for h in ckpt["history"]
        ]
        self.carried = unflatten_state(ckpt["carried"])
        log.info(
            "resumed from %s at epoch %d, chunk %d (step %d)",
            path,
            self.epoch + 1,
            self.chunk,
            self.step,
        )


def _mask_targets(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.reshape(*keep.shape, *([1] * (y.dim() - keep.dim())))
    if y.is_floating_point():
        return torch.where(keep, y, torch.full_like(y, float("nan")))
    return torch.where(keep, y, torch.full_like(y, -1))  # class targets: -1 = ignore
