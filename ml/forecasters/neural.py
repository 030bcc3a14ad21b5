"""Sequence forecasters: Mamba2 and the LSTM, GRU, Transformer and CNN-LSTM baselines, each
trained through the same truncated-BPTT trainer on the same per-symbol lanes, with the same
heads and loss, at matched parameter counts.

Every bar of a symbol is an input, in time order (purged and warm-up bars too, without
targets); only training bars carry targets while fitting and validation bars while early
stopping. Predictions run each whole lane with its state carried, so the forecast at t sees
bars up to t only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from ml.backbone import BackboneConfig, MultiTaskLoss, TargetStats
from ml.backbone import Forecaster as Mamba2Forecaster
from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.features import ONCHAIN_AGE_COLUMN, FeatureConfig, onchain_feature_columns
from ml.forecasters.base import ALL_TARGETS, DIRECTION_COLUMNS, FoldData, Forecaster
from ml.forecasters.ewma import Ewma
from ml.sequence_baselines import SequenceBaseline, SequenceBaselineConfig
from ml.sequence_data import SEGMENT_CODE, Lanes, build_lanes
from ml.sequence_names import MAMBA2, SEQUENCE_BASELINE_NAMES
from ml.trainer import Sequences, TrainConfig, Trainer

# 3: the baselines match Mamba2's parameter count through their MLP width as well
SEQUENCE_CODE_VERSION = "3"


def is_onchain_column(name: str) -> bool:
    """Whether a feature column comes from the on-chain inputs."""
    base = {*onchain_feature_columns(FeatureConfig()), ONCHAIN_AGE_COLUMN}
    return name in base or name.startswith("active_addresses_growth_")


def _baseline(kind: str) -> Callable[[BackboneConfig], nn.Module]:
    return lambda cfg: SequenceBaseline(SequenceBaselineConfig.like(cfg, kind))  # type: ignore[arg-type]


# name -> builder from the Mamba2 backbone config; baselines match its parameter count
SEQUENCE_MODELS: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    MAMBA2: Mamba2Forecaster,
    **{kind: _baseline(kind) for kind in SEQUENCE_BASELINE_NAMES},
}


@dataclass(frozen=True)
class SequenceSettings:
    preset: str = "tiny"  # tiny (CPU), baseline, sparse_mhsa: the Mamba2 backbone's size
    epochs: int = 8
    tbptt_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01  # AdamW, on the weight matrices only
    dropout: float = 0.0  # on every residual branch of the backbone
    patience: int = 3
    # the validation metric that keeps the best epoch and stops early (see TrainConfig.monitor)
    monitor: str = "direction"
    min_steps: int = 100  # optimizer steps past warm-up before early stopping may stop
    device: str = "auto"  # auto: CUDA when present
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; predictions run the same way
    # ablation switches (docs/ABLATIONS.md); the defaults are what the ablations chose
    stateful: bool = True  # False: the state restarts every tbptt_len bars (a windowed encoder)
    # heads in units of EWMA(0.94) volatility from past returns (see LayerStack._heads)
    sigma_anchor: bool = True
    lane_norm: bool = True  # standardize each lane with its own training rows (False: pooled)
    onchain: bool = True  # False: drop the on-chain inputs
    early_stopping: bool = True  # False: keep the last epoch (no choice made on validation rows)
    # CPU threads of the training process; 1 by default because the Mamba2 and baseline steps
    # train side by side (two processes on 2 cores; more threads each only spin)
    threads: int = 1

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def precision(self) -> str:
        """What training, validation and prediction compute in: "bf16" (autocast) or "fp32"."""
        on_cuda = self.torch_device().type == "cuda"
        return "bf16" if self.amp == "bf16" or (self.amp == "auto" and on_cuda) else "fp32"

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
        self.scaler: Standardizer | None = None
        self.lane_scalers: dict[str, Standardizer] | None = None
        self.anchor_fill: dict[str, float] | None = None
        self.precision: str | None = None  # as fitted, validated and so predicted
        self.input_columns: list[str] | None = None  # the fold's feature columns, once loaded
        self.backbone: BackboneConfig | None = None  # the loaded model's config
        self.history: list[dict] = []
        self.summary: dict = {}

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    def feature_columns(self, data: FoldData) -> list[str]:
        """The fold's inputs this model reads (without the on-chain ones when onchain=False)."""
        if self.settings.onchain:
            return list(data.feature_columns)
        return [c for c in data.feature_columns if not is_onchain_column(c)]

    def _lanes(self, data: FoldData, fitted: bool = False) -> Lanes:
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
            self.feature_columns(data),
            self._horizons(t),
            t.direction,
            quantile_col=t.quantile,
            sigma_col=t.sigma,
            scaler=self.scaler if fitted else None,  # features scaled as in training
            per_lane=self.settings.lane_norm,
            lane_scalers=self.lane_scalers if fitted else None,
            anchor=self._anchor(data) if self.settings.sigma_anchor else None,
            anchor_fill=self.anchor_fill if fitted else None,
        )

    @staticmethod
    def _anchor(data: FoldData) -> pl.DataFrame:
        """log EWMA(0.94) sigma at each bar, from that bar's and earlier returns only."""
        return Ewma().log_sigma(data)

    @staticmethod
    def _horizons(t) -> tuple[int, ...]:
        return tuple(sorted({*t.return_horizons, t.direction_horizon}))

    def config(self, data: FoldData) -> BackboneConfig:
        return BackboneConfig.preset(
            self.settings.preset,
            len(self.feature_columns(data)),
            horizons=self._horizons(data.targets),
            quantiles=data.targets.quantile_levels,
            dropout=self.settings.dropout,
            sigma_anchor=self.settings.sigma_anchor,
        )

    def train_config(self) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            tbptt_len=s.tbptt_len,
            epochs=s.epochs,
            lr=s.lr,
            weight_decay=s.weight_decay,
            seed=self.seed,
            monitor=s.monitor,
            min_steps=s.min_steps,
            stateful=s.stateful,
            restore_best=s.early_stopping,
            patience=s.patience if s.early_stopping else s.epochs + 1,
            amp="bf16" if s.precision() == "bf16" else "off",
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
        train = lanes.sequences(TRAIN)
        stats = target_stats(train, cfg)
        torch.manual_seed(self.seed)
        model = self.build(data)
        model.calibrate(stats)  # every head starts at the training targets' constants
        loss = MultiTaskLoss(cfg.quantiles, n_horizons=len(cfg.horizons)).to(device)
        loss.calibrate(stats)
        with tempfile.TemporaryDirectory() as tmp:
            result = Trainer(
                model,
                loss,
                [_to(s, device) for s in train],
                [_to(s, device) for s in lanes.sequences(VAL)],
                self.train_config(),
                checkpoint_dir=Path(tmp),
            ).fit(resume=False)
        self.model, self.loss = model, loss
        self.scaler, self.lane_scalers = lanes.scaler, lanes.lane_scalers
        self.anchor_fill, self.precision = lanes.anchor_fill, self.settings.precision()
        self.history = result.history
        self.summary = {
            "best_val_loss": result.best_val_loss,
            "monitor": result.monitor,
            "best_epoch": result.best_epoch,
            "best_val": result.best_val,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "task_weights": loss.weights(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
            "precision": self.precision,
        }
        return self

    def lanes(self, data: FoldData) -> Lanes:
        """The fold's lanes as this fitted model reads them (its scalers and anchor fill)."""
        return self._lanes(data, fitted=True)

    @torch.no_grad()
    def stream(
        self, x: torch.Tensor, state=None, chunk: int | None = None
    ) -> tuple[dict[str, np.ndarray], object]:
        """Run the fitted model over inputs x (B, T, F) from `state` (None: a fresh start), in
        chunks of `chunk` bars (the training window by default) with the state carried; the
        outputs per position (direction as probabilities) and the state after the last one.

        Stateful models give the same outputs whatever the chunking; a windowed model restarts
        at every chunk."""
        if self.model is None:
            raise RuntimeError(f"{self.kind} seed {self.seed}: fit() before predict()")
        device = self.settings.torch_device()
        self.model.eval()
        L = chunk or self.settings.tbptt_len
        parts = []
        for start in range(0, x.shape[1], L):
            with _autocast(device, self.precision):  # as the model was validated
                out, state = self.model(
                    x[:, start : start + L].to(device),
                    state if self.settings.stateful else None,  # windowed: restart
                )
            parts.append({k: v.float().cpu() for k, v in out.items()})
        out = {k: torch.cat([p[k] for p in parts], dim=1).numpy() for k in parts[0]}
        out["direction"] = torch.softmax(torch.from_numpy(out["direction"]), dim=-1).numpy()
        return out, state

    def columns(self, out: dict[str, np.ndarray], b: int, keep: np.ndarray, t) -> dict:
        """Lane `b`'s prediction columns at positions `keep` of `stream`'s outputs."""
        horizons = self._horizons(t)
        cols = {c: out["direction"][b, keep, k] for k, c in enumerate(DIRECTION_COLUMNS)}
        lo, hi = t.quantile_columns
        cols[lo] = out["quantiles"][b, keep, 0]
        cols[hi] = out["quantiles"][b, keep, -1]
        cols["sigma"] = out["sigma"][b, keep]
        for h in t.return_horizons:
            cols[t.return_column(h)] = out["returns"][b, keep, horizons.index(h)]
        return cols

    def predict(self, data: FoldData) -> pl.DataFrame:
        lanes = self.lanes(data)
        frames = []
        for group in lanes.groups:
            out, _ = self.stream(group.x)
            scored = np.isin(group.segment.numpy(), [SEGMENT_CODE[VAL], SEGMENT_CODE[TEST]])
            for b, symbol in enumerate(group.symbols):
                keep = np.flatnonzero(scored[b])
                cols = self.columns(out, b, keep, data.targets)
                frames.append(
                    pl.DataFrame({"symbol": symbol, "ts": group.calendar.gather(keep), **cols})
                )
        pred = pl.concat(frames).with_columns(pl.col(pl.Float32).cast(pl.Float64))
        # the contract: exactly the scored rows, in their order
        return data.scored.select(["symbol", "ts"]).join(
            pred, on=["symbol", "ts"], how="left", maintain_order="left"
        )

    @classmethod
    def from_artifact(
        cls, folder: Path, seed: int, device: str = "auto", threads: int = 1
    ) -> SequenceForecaster:
        """The fitted model of one seed from a sequence-model artifact folder (as written by
        pipelines.train_sequences), ready to predict or stream; the weights are loaded with
        weights_only=True."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        saved = {k: v for k, v in config["settings"].items() if k != "code_version"}
        settings = SequenceSettings(**{**saved, "device": device, "threads": threads})
        f = cls(config["model"], seed, settings)
        backbone = {
            k: tuple(v) if isinstance(v, list) else v for k, v in config["backbone"].items()
        }
        cfg = BackboneConfig(**backbone)
        model = SEQUENCE_MODELS[f.kind](cfg).to(settings.torch_device())
        weights = torch.load(
            folder / f"weights_seed{seed}.pt",
            map_location=settings.torch_device(),
            weights_only=True,
        )
        model.load_state_dict(weights["model"])
        f.model, f.backbone = model, cfg
        f.loss = MultiTaskLoss(cfg.quantiles, n_horizons=len(cfg.horizons))
        f.loss.load_state_dict(weights["loss"])
        f.input_columns = list(config["feature_columns"])  # the fold's, before onchain=False
        f.scaler = Standardizer.from_json((folder / "scaler.json").read_text())
        if (folder / "lane_scalers.json").exists():
            f.lane_scalers = {
                k: Standardizer(**v)
                for k, v in json.loads((folder / "lane_scalers.json").read_text()).items()
            }
        if (folder / "anchor_fill.json").exists():
            f.anchor_fill = json.loads((folder / "anchor_fill.json").read_text())
        f.precision = settings.precision()
        return f

    def state_dict(self) -> dict:
        if self.model is None:
            raise RuntimeError("fit() first")
        return {"model": self.model.state_dict(), "loss": self.loss.state_dict()}


def _autocast(device: torch.device, precision: str | None):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def target_stats(groups: list[Sequences], cfg: BackboneConfig) -> TargetStats:
    """The training targets' constants over every lane group (only the counted rows)."""

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, *t.shape[2:])

    targets = {k: torch.cat([flat(s.targets[k]) for s in groups], 1) for k in groups[0].targets}
    keep = torch.cat([flat(s.loss_mask) for s in groups], 1)
    anchor = torch.cat([flat(s.x[..., -1]) for s in groups], 1) if cfg.sigma_anchor else None
    return TargetStats.from_targets(
        targets, cfg.horizons, cfg.quantiles, cfg.n_direction_classes, keep=keep, anchor=anchor
    )


def _to(seq: Sequences, device: torch.device) -> Sequences:
    return Sequences(
        seq.x.to(device),
        {k: v.to(device) for k, v in seq.targets.items()},
        None if seq.loss_mask is None else seq.loss_mask.to(device),
    )
