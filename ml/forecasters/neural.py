"""Sequence forecasters: Mamba2 and the LSTM, GRU, Transformer and CNN-LSTM baselines, each
trained through the same truncated-BPTT trainer on the same per-symbol lanes, with the same
heads and loss, at matched parameter counts.

Every bar of a symbol is an input, in time order (purged and warm-up bars too, without
targets); only training bars carry targets while fitting and validation bars while early
stopping. Predictions run each whole lane with its state carried, so the forecast at t sees
bars up to t only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from ml.backbone import BackboneConfig, MultiTaskLoss
from ml.backbone import Forecaster as Mamba2Forecaster
from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.forecasters.base import ALL_TARGETS, DIRECTION_COLUMNS, FoldData, Forecaster
from ml.sequence_baselines import SequenceBaseline, SequenceBaselineConfig
from ml.sequence_data import SEGMENT_CODE, Lanes, build_lanes
from ml.trainer import Sequences, TrainConfig, Trainer

SEQUENCE_CODE_VERSION = "1"


def _baseline(kind: str) -> Callable[[BackboneConfig], nn.Module]:
    return lambda cfg: SequenceBaseline(SequenceBaselineConfig.like(cfg, kind))  # type: ignore[arg-type]


# name -> builder from the Mamba2 backbone config; baselines match its parameter count
SEQUENCE_MODELS: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "mamba2": Mamba2Forecaster,
    "lstm": _baseline("lstm"),
    "gru": _baseline("gru"),
    "transformer": _baseline("transformer"),
    "cnn_lstm": _baseline("cnn_lstm"),
}


@dataclass(frozen=True)
class SequenceSettings:
    preset: str = "tiny"  # tiny (CPU), baseline, sparse_mhsa: the Mamba2 backbone's size
    epochs: int = 8
    tbptt_len: int = 128
    lr: float = 2e-3
    patience: int = 3
    device: str = "auto"  # auto: CUDA when present
    # CPU threads of the training process; 1 by default because the Mamba2 and baseline steps
    # train side by side (two processes on 2 cores; more threads each only spin)
    threads: int = 1

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_json(self) -> dict:
        return {"code_version": SEQUENCE_CODE_VERSION, **asdict(self)}


class SequenceForecaster(Forecaster):
    """One sequence model of `kind`, one seed, behind the forecaster contract."""

    targets = ALL_TARGETS

    def __init__(self, kind: str, seed: int, settings: SequenceSettings | None = None) -> None:
        if kind not in SEQUENCE_MODELS:
            raise ValueError(f"Unknown sequence model {kind!r}; use one of {list(SEQUENCE_MODELS)}")
        self.kind, self.seed = kind, seed
        self.settings = settings or SequenceSettings()
        self.model: nn.Module | None = None
        self.history: list[dict] = []
        self.summary: dict = {}

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    def _lanes(self, data: FoldData, scaler: Standardizer | None = None) -> Lanes:
        if data.inputs is None:
            raise ValueError(f"Fold {data.key} has no input history; build it with fold_data()")
        t = data.targets
        labels = data.rows.select(
            ["symbol", "ts", *{*t.label_columns(), *[f"fwd_ret_{h}" for h in self._horizons(t)]}]
        )
        return build_lanes(
            data.inputs,
            labels,
            data.rows.select(["symbol", "ts", "split"]),
            data.feature_columns,
            self._horizons(t),
            t.direction,
            quantile_col=t.quantile,
            sigma_col=t.sigma,
            scaler=scaler,
        )

    @staticmethod
    def _horizons(t) -> tuple[int, ...]:
        return tuple(sorted({*t.return_horizons, t.direction_horizon}))

    def config(self, data: FoldData) -> BackboneConfig:
        return BackboneConfig.preset(
            self.settings.preset,
            len(data.feature_columns),
            horizons=self._horizons(data.targets),
            quantiles=data.targets.quantile_levels,
        )

    def train_config(self) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            tbptt_len=s.tbptt_len,
            epochs=s.epochs,
            lr=s.lr,
            seed=self.seed,
            patience=s.patience,
            progress=False,
        )

    def build(self, data: FoldData) -> nn.Module:
        """A fresh (untrained) model of this kind for the fold's inputs, on the device."""
        return SEQUENCE_MODELS[self.kind](self.config(data)).to(self.settings.torch_device())

    def fit(self, data: FoldData) -> SequenceForecaster:
        torch.set_num_threads(self.settings.threads)
        device = self.settings.torch_device()
        lanes = self._lanes(data)
        cfg = self.config(data)
        torch.manual_seed(self.seed)
        model = self.build(data)
        loss = MultiTaskLoss(cfg.quantiles).to(device)
        with tempfile.TemporaryDirectory() as tmp:
            result = Trainer(
                model,
                loss,
                _to(lanes.sequences(TRAIN), device),
                _to(lanes.sequences(VAL), device),
                self.train_config(),
                checkpoint_dir=Path(tmp),
            ).fit(resume=False)
        self.model, self.loss, self.scaler = model, loss, lanes.scaler
        self.history = result.history
        self.summary = {
            "best_val_loss": result.best_val_loss,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        return self

    @torch.no_grad()
    def predict(self, data: FoldData) -> pl.DataFrame:
        if self.model is None:
            raise RuntimeError(f"{self.kind} seed {self.seed}: fit() before predict()")
        device = self.settings.torch_device()
        lanes = self._lanes(data, scaler=self.scaler)  # features scaled as in training
        self.model.eval()
        state, parts = None, []
        for start in range(0, lanes.x.shape[1], self.settings.tbptt_len):
            out, state = self.model(
                lanes.x[:, start : start + self.settings.tbptt_len].to(device), state
            )
            parts.append({k: v.float().cpu() for k, v in out.items()})
        out = {k: torch.cat([p[k] for p in parts], dim=1).numpy() for k in parts[0]}
        probs = torch.softmax(torch.from_numpy(out["direction"]), dim=-1).numpy()
        horizons = self._horizons(data.targets)
        t = data.targets
        frames = []
        for b, symbol in enumerate(lanes.symbols):
            n = lanes.ts[b].len()
            keep = np.isin(lanes.segment[b, :n].numpy(), [SEGMENT_CODE[VAL], SEGMENT_CODE[TEST]])
            cols = {f"{c}": probs[b, :n][keep, k] for k, c in enumerate(DIRECTION_COLUMNS)}
            lo, hi = t.quantile_columns
            cols[lo] = out["quantiles"][b, :n, 0][keep]
            cols[hi] = out["quantiles"][b, :n, -1][keep]
            cols["sigma"] = out["sigma"][b, :n][keep]
            for h in t.return_horizons:
                cols[t.return_column(h)] = out["returns"][b, :n, horizons.index(h)][keep]
            frames.append(
                pl.DataFrame({"symbol": symbol, "ts": lanes.ts[b].filter(pl.Series(keep)), **cols})
            )
        pred = pl.concat(frames).with_columns(pl.col(pl.Float32).cast(pl.Float64))
        # the contract: exactly the scored rows, in their order
        return data.scored.select(["symbol", "ts"]).join(
            pred, on=["symbol", "ts"], how="left", maintain_order="left"
        )

    def state_dict(self) -> dict:
        if self.model is None:
            raise RuntimeError("fit() first")
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict()}


def _to(seq: Sequences, device: torch.device) -> Sequences:
    return Sequences(
        seq.x.to(device),
        {k: v.to(device) for k, v in seq.targets.items()},
        None if seq.loss_mask is None else seq.loss_mask.to(device),
    )
