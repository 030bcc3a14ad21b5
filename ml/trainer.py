"""Truncated backpropagation through time for stateful sequence models.

The model is called as `model(x, state) -> (outputs, new_state)` on consecutive chunks of
`tbptt_len` steps of every lane; the state flows from one chunk to the next with its gradient
cut at the boundary, and every step has its own target. The loss is an nn.Module (it may own
parameters, such as learned task weights) called as `loss_fn(outputs, targets) -> (loss, parts)`.

Checkpoints hold everything needed to resume exactly: model, loss, optimizer, scheduler, RNG
states, the data position and the carried recurrent state.

Distributed data parallel: when a torch.distributed process group of more than one rank is
initialized (see ml.distributed), every rank gets the same full data and trains on its own
contiguous shard of each lane group's lanes, through DistributedDataParallel wrapping the
model and the loss together (so the loss's own parameters are averaged too). The step is the
single-process one, not an approximation of it:
- the loss must expose `task_sums` and `combine` (as ml.backbone.MultiTaskLoss does). Each
  step all-reduces every task's (summed loss, target count) and each rank back-propagates
  combine({k: world * local_sum_k / global_count_k}); DDP averages over the ranks, so the
  gradient is that of combine({k: global_sum_k / global_count_k}), whatever the shards' lane
  and target counts. The logged loss is computed from the all-reduced sums.
- chunk weights, the schedule and the step count come from the full data (same on all ranks).
- a group with fewer lanes than ranks leaves its last ranks a "ghost" lane (lane 0, every
  target masked): it joins the gradient all-reduce and adds exactly zero to it. A rank must
  hold a real lane of some group: world size <= the largest group's lanes.
- augmentation draws the noise of the whole batch on every rank (one shared generator) and
  keeps its own lanes' rows, so augmented runs equal the single-process one too.
- validation sums and counts are gathered and added in rank order: every rank sees the same
  figures and stops at the same epoch.
- only rank 0 writes checkpoints; they hold the carried state of all lanes (lanes on dim 0 of
  every state tensor), so they resume under any world size or in one process. Resuming, rank 0
  reads the checkpoint and broadcasts it.
- constructing the Trainer, fit, evaluate, evaluate_tasks and save_checkpoint are collectives
  (every rank calls them in the same order); data_parallel=False opts a Trainer out, for
  work on one rank alone. A checkpoint that rank 0 fails to write or read, or that some rank
  fails to restore, raises distributed.RankFailed on every rank.
Dropout (the global RNG) is seeded seed + rank: ranks draw independent masks, so a run with
dropout > 0 is not the single-process one draw for draw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ml import distributed
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
    # the validation metric that picks the best weights and stops early: a task of the loss
    # (its unweighted mean loss, e.g. direction log loss) or "total" (the sum of the tasks'
    # log losses, free of the learned weights)
    monitor: str = "direction"
    min_steps: int = 100  # optimizer steps past warm-up before early stopping may stop a run
    # the loss's own parameters (task log-variances): own learning rate, no decay, no schedule
    loss_lr: float = 0.05
    # False: a windowed encoder, the state restarts at every chunk of tbptt_len bars (training,
    # validation and prediction alike) instead of flowing across the whole history
    stateful: bool = True
    restore_best: bool = True  # end with the best validation epoch's weights (else the last)
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
        if self.min_steps < 0 or self.patience < 1:
            raise ValueError(
                f"min_steps must be >= 0 and patience >= 1, got {self.min_steps}, {self.patience}"
            )


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

    def n_chunks(self, size: int) -> int:
        return math.ceil(self.length / size)

    def chunk_targets(self, start: int, end: int) -> int:
        """How many steps of start..end-1 carry at least one counted target (finite floats,
        class labels >= 0, not masked out)."""
        return int(self.scored_steps(start, end).sum())

    def scored_steps(self, start: int, end: int) -> torch.Tensor:
        """(B, steps) bool, on the data's device: whether each step of start..end-1 carries at
        least one counted target."""
        _, targets = self.chunk(start, end)
        steps = max(0, min(end, self.length) - start)
        any_valid = torch.zeros(self.x.shape[0], steps, dtype=torch.bool, device=self.x.device)
        for y in targets.values():
            valid = torch.isfinite(y) if y.is_floating_point() else y >= 0
            any_valid |= valid.reshape(*valid.shape[:2], -1).any(-1).to(any_valid.device)
        return any_valid

    @property
    def lanes(self) -> int:
        return self.x.shape[0]

    def select_lanes(self, lo: int, hi: int) -> Sequences:
        """Lanes lo..hi-1 (views, no copy)."""
        return Sequences(
            self.x[lo:hi],
            {k: v[lo:hi] for k, v in self.targets.items()},
            None if self.loss_mask is None else self.loss_mask[lo:hi],
        )

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = {k: v[:, start:end] for k, v in self.targets.items()}
        if self.loss_mask is not None:
            keep = self.loss_mask[:, start:end]
            targets = {k: _mask_targets(v, keep) for k, v in targets.items()}
        return self.x[:, start:end], targets


@dataclass
class TrainResult:
    best_val_loss: float  # the monitored validation metric at the kept weights
    epochs_run: int
    steps: int  # optimizer steps taken (chunks without targets take none)
    skipped_steps: int
    history: list[dict[str, float]]
    stopped_early: bool
    monitor: str = "direction"
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)  # every validation figure there


def _groups(data: Sequences | Sequence[Sequences]) -> list[Sequences]:
    """Lane groups (lanes of one calendar each, see ml.sequence_data) as a list."""
    groups = [data] if isinstance(data, Sequences) else list(data)
    if not groups:
        raise ValueError("no sequences: pass at least one lane group")
    return groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` optimizer steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """TBPTT over one or more lane groups (each a `Sequences` with its own carried state).

    An epoch walks every group's chunks in time order, interleaving the groups by how far
    through their history each chunk lies. A chunk without any counted target (warm-up, purged
    or other-segment bars) runs forward only, to carry the state, and takes no optimizer step.
    The validation metric is summed over elements and divided once over all chunks.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        train: Sequences | Sequence[Sequences],
        val: Sequences | Sequence[Sequences],
        cfg: TrainConfig,
        checkpoint_dir: Path | None = None,
        on_step: Callable[[int], None] | None = None,
        data_parallel: bool | None = None,
    ) -> None:
        """data_parallel: None (default) trains with DDP across the initialized process group
        when it has more than one rank; False trains this process alone regardless.

        Under DDP (a process group of more than one rank and data_parallel not False) this
        constructor, `fit`, `evaluate`, `evaluate_tasks` and `save_checkpoint` are collectives:
        every rank must call them, in the same order, with the same data, or the ranks wait on
        each other until the group's timeout. Code that evaluates on one rank alone (say rank 0
        after training) builds its Trainer with data_parallel=False."""
        self.model, self.loss_fn, self.cfg = model, loss_fn, cfg
        self.train_data, self.val_data = _groups(train), _groups(val)
        monitorable = {"total", *(k for g in self.val_data for k in g.targets)}
        if cfg.monitor not in monitorable:
            raise ValueError(
                f"monitor={cfg.monitor!r} is not a validation target; "
                f"choose one of {sorted(monitorable)}"
            )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_step = on_step  # called with the global step after every optimizer step
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(parameter_groups(model, loss_fn, cfg), lr=cfg.lr)
        L = cfg.tbptt_len
        # every (group, chunk) in time order across groups; chunks with targets take a step
        self.schedule = sorted(
            ((g, c) for g, seq in enumerate(self.train_data) for c in range(seq.n_chunks(L))),
            key=lambda gc: ((gc[1] + 1) / self.train_data[gc[0]].n_chunks(L), gc[0]),
        )
        counts = [self.train_data[g].chunk_targets(c * L, (c + 1) * L) for g, c in self.schedule]
        self.trains = [n > 0 for n in counts]
        # each chunk's loss is a mean over its rows: weigh it by its rows, so a chunk with a
        # few targets (a segment's edge) counts for that few, as validation counts them
        mean_rows = sum(counts) / max(1, sum(self.trains))
        self.chunk_weights = [n / mean_rows for n in counts]
        self.steps_per_epoch = sum(self.trains)
        if self.steps_per_epoch == 0:
            raise ValueError("the training sequences carry no target: nothing to fit")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.lr_scale = 1.0  # lowered by the NaN guard
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [self._lr_lambda] * (len(self.optimizer.param_groups) - 1) + [self._loss_lr_lambda],
        )
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.chunk, self.step, self.skipped = 0, 0, 0, 0
        self.best_val, self.bad_epochs = math.inf, 0
        self.best_weights: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self.carried: list[Any] = [None] * len(self.train_data)
        self._epoch_losses: list[float] = []
        self.last_loss = math.nan  # the latest step's training loss (of all ranks' lanes)
        self.rank, self.world_size = distributed.world() if data_parallel is not False else (0, 1)
        self.distributed = self.world_size > 1
        self._info = log.info if self.rank == 0 else log.debug
        self.ddp: nn.Module | None = None
        if self.distributed:
            self._setup_distributed()

    def _setup_distributed(self) -> None:
        """Shard the training lanes and wrap model + loss in DistributedDataParallel."""
        if not (hasattr(self.loss_fn, "task_sums") and hasattr(self.loss_fn, "combine")):
            raise ValueError(
                f"distributed training needs a loss with task_sums() and combine() (such as "
                f"ml.backbone.MultiTaskLoss) to weigh the ranks' shards exactly; "
                f"{type(self.loss_fn).__name__} has not both. Train it in one process."
            )
        largest = max(seq.lanes for seq in self.train_data)
        if largest < self.world_size:
            raise ValueError(
                f"the largest training lane group has {largest} lane(s), fewer than the "
                f"{self.world_size} ranks: ranks {largest}..{self.world_size - 1} would train on "
                f"no lane at all; start at most {largest} processes "
                f"(torchrun --nproc-per-node {largest}) or train in one process"
            )
        # this rank's lanes of each group; a group with fewer lanes than ranks leaves the last
        # ranks a "ghost": lane 0 with every target masked, run only to join the gradient
        # all-reduce (it adds exactly zero) and carried like the real lanes
        self.train_bounds, self.state_bounds, self.train_shards = [], [], []
        for seq in self.train_data:
            lo, hi = distributed.lane_bounds(
                seq.lanes, self.rank, self.world_size, allow_empty=True
            )
            self.train_bounds.append((lo, hi))
            if hi > lo:
                self.state_bounds.append((lo, hi))
                self.train_shards.append(seq.select_lanes(lo, hi))
            else:
                ghost = seq.select_lanes(0, 1)
                ghost.loss_mask = torch.zeros(1, seq.length, dtype=torch.bool, device=seq.x.device)
                self.state_bounds.append((0, 1))
                self.train_shards.append(ghost)
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        # find_unused_parameters: the heads of tasks without targets take no gradient (they
        # stay None, so AdamW leaves them alone, as in one process).
        # broadcast_buffers=False: no buffer changes in training (the only buffers are the
        # heads' and the loss's units, calibrated from the same full training data on every
        # rank before wrapping, and no norm layer keeps running statistics); DDP's constructor
        # still broadcasts rank 0's parameters and buffers once, so the ranks start equal and
        # a re-broadcast before every forward would only cost time.
        self.ddp = DistributedDataParallel(
            _Joint(self.model, self.loss_fn, self._autocast),
            device_ids=[self.device.index] if cuda else None,
            find_unused_parameters=True,
            broadcast_buffers=False,
        )
        # rank 0 decides whether checkpoints are written (and reads them to resume)
        self._checkpointing = bool(
            distributed.broadcast_object(self.checkpoint_dir is not None and self.rank == 0)
        )

    def _lr_lambda(self, step: int) -> float:
        c = self.cfg
        return self.lr_scale * lr_factor(step, c.warmup_steps, self.total_steps, c.min_lr_ratio)

    def _loss_lr_lambda(self, step: int) -> float:
        return self.lr_scale

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        """Train until `epochs` or early stopping; resumes from the latest checkpoint if any."""
        if not self._resume(resume):
            # ranks > 0 draw their own dropout masks (rank 0 those of a single process)
            torch.manual_seed(self.cfg.seed + self.rank)
            if hasattr(self.loss_fn, "init_log_vars"):
                # each task's weight starts at its equilibrium 1 / (its initial loss)
                initial = self.evaluate_tasks(self.train_data)
                self.loss_fn.init_log_vars(initial)
                self._info(
                    "initial training losses %s",
                    ", ".join(f"{k} {v:.4g}" for k, v in initial.items() if k != "total"),
                )
        stopped_early = False
        past_warmup = self.cfg.warmup_steps + self.cfg.min_steps
        while self.epoch < self.cfg.epochs:
            self._train_epoch()
            val = self.evaluate_tasks(self.val_data)
            val_loss = val[self.cfg.monitor]
            train_loss = sum(self._epoch_losses) / max(1, len(self._epoch_losses))
            entry = {
                "epoch": float(self.epoch + 1),
                "step": float(self.step),
                "train_loss": train_loss,
                "val_loss": val_loss,
                **{f"val_{k}": v for k, v in val.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            if hasattr(self.loss_fn, "weights"):
                entry.update({f"weight_{k}": v for k, v in self.loss_fn.weights().items()})
            self.history.append(entry)
            self._info(
                "epoch %d/%d (step %d): train loss %.5f, validation %s %.5f, lr %.2e",
                self.epoch + 1,
                self.cfg.epochs,
                self.step,
                train_loss,
                self.cfg.monitor,
                val_loss,
                self.optimizer.param_groups[0]["lr"],
            )
            if val_loss < self.best_val:
                self.best_val, self.bad_epochs = val_loss, 0
                self.best_weights = {k: v.detach().clone() for k, v in self._weights().items()}
            elif self.step >= past_warmup:  # too early to judge before warm-up + min_steps
                self.bad_epochs += 1
            self.epoch, self.chunk, self._epoch_losses = self.epoch + 1, 0, []
            self.carried = [None] * len(self.train_data)
            self.save_checkpoint()
            if self.bad_epochs >= self.cfg.patience:
                stopped_early = True
                self._info(
                    "early stop: no validation %s improvement for %d epochs",
                    self.cfg.monitor,
                    self.bad_epochs,
                )
                break
        if self.best_weights is not None and self.cfg.restore_best:
            self._load_weights(self.best_weights)
        if self.cfg.restore_best:
            best = min(self.history, key=lambda h: h["val_loss"]) if self.history else {}
        else:  # the kept weights are the last epoch's
            best = self.history[-1] if self.history else {}
        return TrainResult(
            best.get("val_loss", self.best_val),
            self.epoch,
            self.step,
            self.skipped,
            self.history,
            stopped_early,
            monitor=self.cfg.monitor,
            best_epoch=int(best.get("epoch", 0)),
            best_val={k[4:]: v for k, v in best.items() if k.startswith("val_")},
        )

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _train_epoch(self) -> None:
        self.model.train()
        self.loss_fn.train()
        L = self.cfg.tbptt_len
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=sum(self.trains[: self.chunk]),
            disable=not self.cfg.progress or self.rank != 0,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            leave=False,
        )
        data = self.train_shards if self.distributed else self.train_data
        for i in range(self.chunk, len(self.schedule)):
            g, c = self.schedule[i]
            x, targets = data[g].chunk(c * L, (c + 1) * L)
            if self.distributed:
                x = self._augment(x.to(self.device), self.train_data[g].lanes, self.state_bounds[g])
            else:
                x = self._augment(x.to(self.device))
            if not self.cfg.stateful:
                self.carried[g] = None
            if not self.trains[i]:  # nothing to score: carry the state forward, no step
                with torch.no_grad(), self._autocast():
                    _, state = self.model(x, self.carried[g])
                self.carried[g] = detach_state(state)
                self.chunk = i + 1
                continue
            targets = {k: v.to(self.device) for k, v in targets.items()}
            if self.ddp is not None:
                # the loss of every rank's lanes; every rank back-propagates (joining DDP's
                # gradient all-reduce) and all agree on skipping a non-finite step
                surrogate, loss, state = self.ddp(x, self.carried[g], targets)
                ok = bool(torch.isfinite(loss))
                (surrogate * self.chunk_weights[i]).backward()
            else:
                with self._autocast():
                    outputs, state = self.model(x, self.carried[g])
                loss, _ = self.loss_fn(outputs, targets)
                ok = bool(torch.isfinite(loss))
                if ok:
                    (loss * self.chunk_weights[i]).backward()
            if ok:
                # clip the model's gradients; the task log-variances (last group) have their
                # own rate and would otherwise rescale the model's step, and vice versa
                model_params = [
                    p for grp in self.optimizer.param_groups[:-1] for p in grp["params"]
                ]
                norm = nn.utils.clip_grad_norm_(model_params, self.cfg.grad_clip)
                ok = bool(torch.isfinite(norm)) and all(
                    bool(torch.isfinite(p.grad).all()) for p in self._params() if p.grad is not None
                )
            if ok:
                self.optimizer.step()
                self.last_loss = float(loss.detach())
                self._epoch_losses.append(self.last_loss)
                self.carried[g] = detach_state(state)
            else:
                # Skip the step, forget the (possibly poisoned) state, and back off the rate.
                self.skipped += 1
                self.lr_scale *= self.cfg.nan_lr_backoff
                self.carried[g] = None
                self.last_loss = math.nan
                (log.warning if self.rank == 0 else log.debug)(
                    "non-finite loss or gradient at step %d: step skipped, lr x%.2f",
                    self.step,
                    self.cfg.nan_lr_backoff,
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            self.chunk = i + 1
            bar.update(1)
            if ok:
                bar.set_postfix(loss=f"{self._epoch_losses[-1]:.4f}")
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step:
                self.on_step(self.step)
        bar.close()

    @torch.no_grad()
    def evaluate_tasks(self, data: Sequences | Sequence[Sequences]) -> dict[str, float]:
        """Each task's mean loss over every counted target of `data` (summed over all chunks
        and lane groups, divided once), and "total", the loss's weighting of those means.
        Chunk by chunk with the state carried, no augmentation.

        Under DDP a collective: each rank scores its lanes of `data` and the sums are gathered,
        so every rank must call it with the same data (build the Trainer with
        data_parallel=False to evaluate on one rank alone)."""
        self.model.eval()
        self.loss_fn.eval()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        L = self.cfg.tbptt_len
        for seq in _groups(data):
            if self.distributed:  # this rank's lanes (maybe none); the sums are gathered below
                lo, hi = distributed.lane_bounds(
                    seq.lanes, self.rank, self.world_size, allow_empty=True
                )
                if hi == lo:
                    continue
                seq = seq.select_lanes(lo, hi)
            state = None
            for c in range(seq.n_chunks(L)):
                x, targets = seq.chunk(c * L, (c + 1) * L)
                with self._autocast():
                    outputs, state = self.model(
                        x.to(self.device), state if self.cfg.stateful else None
                    )
                targets = {k: v.to(self.device) for k, v in targets.items()}
                for name, (total, n) in _task_sums(self.loss_fn, outputs, targets).items():
                    if n > 0:
                        sums[name] = sums.get(name, 0.0) + float(total)
                        counts[name] = counts.get(name, 0.0) + float(n)
        if self.distributed:  # added in rank order: the same figures on every rank
            gathered = distributed.all_gather_objects((sums, counts))
            sums, counts = {}, {}
            for rank_sums, rank_counts in gathered:
                for name, total in rank_sums.items():
                    sums[name] = sums.get(name, 0.0) + total
                    counts[name] = counts.get(name, 0.0) + rank_counts[name]
        means = {k: sums[k] / counts[k] for k in sums}
        if not means:
            return {"total": math.inf, self.cfg.monitor: math.inf}
        if hasattr(self.loss_fn, "combine"):
            # the sum of log losses: what the uncertainty weighting equilibrates to, and free
            # of the weights themselves (they move every epoch; the weighted loss with them
            # would improve just because they moved)
            means["total"] = (
                sum(math.log(v) for v in means.values())
                if all(v > 0 for v in means.values())
                else -math.inf
            )
        else:
            means["total"] = sum(means.values())
        means = {k: (v if math.isfinite(v) else math.inf) for k, v in means.items()}
        means.setdefault(self.cfg.monitor, math.inf)
        return means

    def evaluate(self, data: Sequences | Sequence[Sequences]) -> float:
        """The monitored validation metric over `data` (see `evaluate_tasks`; under DDP a
        collective, called by every rank)."""
        return self.evaluate_tasks(data)[self.cfg.monitor]

    # -- pieces -----------------------------------------------------------------------------
    def _augment(
        self, x: torch.Tensor, lanes: int | None = None, bounds: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """x augmented; x may be lanes bounds[0]..bounds[1]-1 of a batch of `lanes` lanes,
        whose draws are made whole and sliced, so a shard gets its lanes' draws of one run."""
        a = self.cfg.augment
        if not a.enabled:
            return x
        aux = getattr(self.model, "aux_channels", 0)  # trailing non-feature inputs: untouched
        if aux:
            feats = self._augment_features(x[..., :-aux], lanes, bounds)
            return torch.cat([feats, x[..., -aux:]], dim=-1)
        return self._augment_features(x, lanes, bounds)

    def _augment_features(
        self, x: torch.Tensor, lanes: int | None = None, bounds: tuple[int, int] | None = None
    ) -> torch.Tensor:
        a = self.cfg.augment
        g = self.generator
        b, t, f = x.shape
        if bounds is None:
            b, own = b, slice(None)
        else:
            b, own = lanes or b, slice(*bounds)
        if a.magnitude_warp > 0:
            x = x * (1 + a.magnitude_warp * torch.randn(b, 1, f, generator=g)[own]).to(x)
        if a.noise_std > 0:
            x = x + a.noise_std * torch.randn(b, t, f, generator=g)[own].to(x)
        if a.feature_dropout > 0:
            keep = (torch.rand(b, 1, f, generator=g)[own] >= a.feature_dropout).to(x)
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
        """Write last.pt. Under DDP a collective (every rank must call it): the ranks' carried
        states and RNG states are gathered on rank 0, which alone writes; if that fails, every
        rank raises distributed.RankFailed (none is left waiting for rank 0)."""
        if not self.distributed:
            return self._write_checkpoint(self.carried, {})
        if not self._checkpointing:
            return None
        rng = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.zeros(0),
        )
        gathered = distributed.gather_objects((self._carried_shards(), rng), dst=0)
        path, error = None, None
        if self.rank == 0:
            assert gathered is not None
            try:
                extra = {
                    "world_size": self.world_size,
                    "rank_torch_rng": [r[1][0] for r in gathered],
                    "rank_cuda_rng": [r[1][1] for r in gathered],
                }
                path = self._write_checkpoint(self._join_carried([r[0] for r in gathered]), extra)
            except Exception as e:  # decided below, on every rank
                error = e
        distributed.raise_if_any(error, "to write the checkpoint")
        return path

    def _write_checkpoint(self, carried: list[Any], extra: dict[str, Any]) -> Path | None:
        if not self.checkpoint_dir:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = {
            "weights": self._weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch_losses": torch.tensor(self._epoch_losses, dtype=torch.float64),
            "aug_rng": self.generator.get_state(),
            "position": torch.tensor(
                [self.epoch, self.chunk, self.step, self.skipped, self.bad_epochs]
            ),
            "floats": torch.tensor([self.best_val, self.lr_scale], dtype=torch.float64),
            "best_weights": self.best_weights or {},
            "carried": flatten_state(carried),
            "history": [{k: float(v) for k, v in h.items()} for h in self.history],
            **extra,
        }
        path = self.checkpoint_dir / "last.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)  # a crash while saving leaves the previous checkpoint
        return path

    def _resume(self, resume: bool) -> bool:
        """Load the latest checkpoint if resuming and there is one; under DDP rank 0 decides,
        reads it and sends it to every rank. Whether it resumed."""
        path = self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None
        found = resume and path is not None and path.exists()
        if not self.distributed:
            if found:
                self.load_checkpoint(path)
            return found
        ckpt, error = None, None
        if self.rank == 0 and found:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # decided on every rank: the others would wait for rank 0
                error = e
        distributed.raise_if_any(error, f"to read the checkpoint {path}")
        ckpt, where = distributed.broadcast_object((ckpt, str(path)))
        if ckpt is None:
            return False
        # a checkpoint that does not fit this run may fail on some ranks only (their lanes)
        with distributed.agreed(f"to restore the checkpoint {where}"):
            self._restore(ckpt, Path(where))
        return True

    def load_checkpoint(self, path: Path) -> None:
        """Resume from checkpoint `path` (this process only: under DDP use fit(), where rank 0
        reads it for every rank)."""
        self._restore(torch.load(path, map_location=self.device, weights_only=True), path)

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        self._load_weights(ckpt["weights"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        rank_rng = ckpt.get("rank_torch_rng") or []
        same_world = self.distributed and len(rank_rng) == self.world_size
        if same_world:  # each rank's own dropout stream
            torch.set_rng_state(rank_rng[self.rank])
            cuda_rng = ckpt["rank_cuda_rng"][self.rank]
            if cuda_rng.numel() and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng)
        else:
            torch.set_rng_state(ckpt["torch_rng"])
            if ckpt.get("cuda_rng") and torch.cuda.is_available() and not self.distributed:
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self._epoch_losses = [float(v) for v in ckpt.get("epoch_losses", torch.zeros(0))]
        self.generator.set_state(ckpt["aug_rng"])
        self.epoch, self.chunk, self.step, self.skipped, self.bad_epochs = (
            int(v) for v in ckpt["position"]
        )
        if self.distributed and self.rank > 0 and not same_world:
            # written under another world size: this rank's dropout draws start afresh
            torch.manual_seed(self.cfg.seed + self.rank + self.step)
        self.best_val, self.lr_scale = (float(v) for v in ckpt["floats"])
        self.best_weights = ckpt["best_weights"] or None
        self.history = [dict(h) for h in ckpt["history"]]
        self.carried = unflatten_state(ckpt["carried"])
        if not isinstance(self.carried, list) or len(self.carried) != len(self.train_data):
            raise ValueError(
                f"checkpoint {path} does not hold one carried state per lane group; this run has "
                f"{len(self.train_data)} lane groups. Delete the checkpoint to start afresh."
            )
        for g, (seq, state) in enumerate(zip(self.train_data, self.carried, strict=True)):
            if self.distributed:  # the checkpoint holds every lane: keep this rank's
                lo, hi = self.state_bounds[g]
                state = _map_state(state, lambda t, lo=lo, hi=hi: t[lo:hi].to(self.device))
            self.carried[g] = state
            lanes = {t.shape[0] for t in _state_tensors(state) if t.dim() > 0}
            expected = self.train_shards[g].lanes if self.distributed else seq.lanes
            if lanes - {expected}:
                raise ValueError(
                    f"checkpoint {path} carries a state of {sorted(lanes)} lanes for lane group "
                    f"{g}, which has {seq.lanes}. Delete the checkpoint to start afresh."
                )
        self._info(
            "resumed from %s at epoch %d, chunk %d (step %d)",
            path,
            self.epoch + 1,
            self.chunk,
            self.step,
        )

    def _carried_shards(self) -> list[dict[str, Any]]:
        """This rank's carried state of each lane group, flattened (CPU tensors), without the
        ghost lane of a group this rank holds no lane of."""
        mine = []
        for state, (lo, hi) in zip(self.carried, self.train_bounds, strict=True):
            flat = flatten_state(state)
            if hi == lo:  # a ghost lane: this rank holds no lane of the group
                flat["tensors"] = [t[:0] for t in flat["tensors"]]
            mine.append(flat)
        return mine

    def _join_carried(self, gathered: list[list[dict[str, Any]]]) -> list[Any]:
        """The carried state of every lane from every rank's `_carried_shards` (each rank's lanes
        concatenated in rank order on dim 0 of every tensor; plain values, such as positions,
        are shared)."""
        full = []
        for g in range(len(self.carried)):
            parts = [ranks[g] for ranks in gathered]
            if any(p["spec"] != parts[0]["spec"] for p in parts):
                raise RuntimeError(f"ranks carry states of different structure in lane group {g}")
            tensors = [
                torch.cat(ts, dim=0) for ts in zip(*(p["tensors"] for p in parts), strict=True)
            ]
            full.append(unflatten_state({"spec": parts[0]["spec"], "tensors": tensors}))
        return full


class _Joint(nn.Module):
    """Model and loss as one module for DistributedDataParallel (both own parameters).

    forward -> (surrogate, loss, state): `loss` is the loss over every rank's lanes, from the
    all-reduced task sums and counts; `surrogate` is what this rank back-propagates, so that
    DDP's mean over ranks of its gradient is exactly the gradient of `loss`."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, autocast: Callable) -> None:
        super().__init__()
        self.model, self.loss_fn, self.autocast = model, loss_fn, autocast

    def forward(
        self, x: torch.Tensor, state: Any, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        with self.autocast():
            outputs, state = self.model(x, state)
        sums = self.loss_fn.task_sums(outputs, targets)  # same tasks, same order on all ranks
        names = list(sums)
        totals = torch.stack(
            [torch.stack([sums[k][0].detach().double(), sums[k][1].double()]) for k in names]
        )
        torch.distributed.all_reduce(totals)  # (task, [sum, count]) over all ranks
        world = torch.distributed.get_world_size()
        glob = {k: (float(s), float(n)) for k, (s, n) in zip(names, totals.tolist(), strict=True)}
        surrogate = self.loss_fn.combine(
            {k: sums[k][0] * (world / glob[k][1]) for k in names if glob[k][1] > 0}
        )
        with torch.no_grad():
            loss = self.loss_fn.combine({k: s / n for k, (s, n) in glob.items() if n > 0})
        return surrogate, loss, detach_state(state)


def _state_tensors(state: Any) -> list[torch.Tensor]:
    return flatten_state(state)["tensors"] if state is not None else []


def _map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The nested state with fn applied to every tensor."""
    if state is None:
        return None
    flat = flatten_state(state)
    return unflatten_state({"spec": flat["spec"], "tensors": [fn(t) for t in flat["tensors"]]})


def parameter_groups(model: nn.Module, loss_fn: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms, 1-d and `_no_weight_decay` parameters (the
    SSM's A_log, dt_bias, D) do not; the loss's parameters (last group) have their own rate."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": loss_params, "weight_decay": 0.0, "lr": cfg.loss_lr, "name": "loss"},
    ]


def _task_sums(
    loss_fn: nn.Module, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """task -> (summed loss, count); a loss without `task_sums` counts as one task, "total"."""
    if hasattr(loss_fn, "task_sums"):
        return loss_fn.task_sums(outputs, targets)
    loss, _ = loss_fn(outputs, targets)
    return {"total": (loss, torch.ones(()))} if torch.isfinite(loss) else {}


def _mask_targets(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.reshape(*keep.shape, *([1] * (y.dim() - keep.dim())))
    if y.is_floating_point():
        return torch.where(keep, y, torch.full_like(y, float("nan")))
    return torch.where(keep, y, torch.full_like(y, -1))  # class targets: -1 = ignore
