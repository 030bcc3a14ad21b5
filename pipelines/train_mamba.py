"""Train the Mamba2 forecaster in its own process, launched by the `mamba_model` asset via
Dagster Pipes (so the same command can run on a GPU host), or by hand:

    python -m pipelines.train_mamba --data-dir data --preset tiny --epochs 8

It reads the training dataset from the lake, trains with truncated BPTT, predicts the
validation and test rows, writes a versioned artifact and, under Pipes, reports the
materialization (metrics, artifact version) back to Dagster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss
from ml.dataset import TEST, TRAIN, VAL
from ml.labels import DIRECTION_CLASSES
from ml.sequence_data import SEGMENT_CODE, Lanes, build_lanes
from ml.trainer import Sequences, TrainConfig, Trainer
from warehouse import ArtifactStore, DataPaths, Lake
from warehouse.artifacts import content_version

MAMBA_CODE_VERSION = "1"
SPLIT = "holdout"
DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "epochs": 8,
    "tbptt_len": 128,
    "lr": 2e-3,
    "seed": 7,
    "patience": 3,
    "device": "auto",
}


def train_mamba(
    data_dir: str, settings: dict[str, Any], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train (or reuse) the Mamba2 artifact for the current training dataset; return metadata."""
    s = {**DEFAULTS, **settings}
    paths = DataPaths.at(data_dir)
    lake, store = Lake(paths.lake), ArtifactStore(paths.artifacts)
    meta = lake.read_meta("training_dataset")
    label_cfg = meta["label_config"]
    horizons = tuple(label_cfg["horizons"])
    direction_col = f"direction_{label_cfg['direction_horizon']}"
    cfg = BackboneConfig.preset(s["preset"], len(meta["feature_columns"]), horizons=horizons)
    train_cfg = TrainConfig(
        tbptt_len=s["tbptt_len"],
        epochs=s["epochs"],
        lr=s["lr"],
        seed=s["seed"],
        patience=s["patience"],
        progress=False,
    )
    version = content_version(
        "mamba2",
        MAMBA_CODE_VERSION,
        dataclasses.asdict(cfg),
        dataclasses.asdict(train_cfg),
        meta["version"],
    )
    lanes = build_lanes(
        lake.read("features"),
        lake.read("labels"),
        lake.read("training_dataset").select(["symbol", "ts", "split"]),
        meta["feature_columns"],
        horizons,
        direction_col,
        quantile_col=f"fwd_ret_{label_cfg['direction_horizon']}",
        sigma_col=f"fwd_vol_{label_cfg['vol_window']}",
    )
    device = torch.device(
        "cuda"
        if s["device"] == "auto" and torch.cuda.is_available()
        else "cpu"
        if s["device"] == "auto"
        else s["device"]
    )
    summary: dict[str, Any] = {}

    def write(folder: Path) -> None:
        torch.manual_seed(s["seed"])
        model, loss = Forecaster(cfg).to(device), MultiTaskLoss(cfg.quantiles).to(device)
        log(
            f"training Mamba2 ({s['preset']}, {_count(model):,} parameters) on {device}: "
            f"{len(lanes.symbols)} lanes x {lanes.x.shape[1]} bars, tbptt_len {s['tbptt_len']}"
        )
        started = time.perf_counter()
        trainer = Trainer(
            model,
            loss,
            _to(lanes.sequences(TRAIN), device),
            _to(lanes.sequences(VAL), device),
            train_cfg,
            checkpoint_dir=folder / "_checkpoints",
        )
        result = trainer.fit(resume=False)
        for h in result.history:
            log(f"epoch {h['epoch']}: train {h['train_loss']:.4f}, validation {h['val_loss']:.4f}")
        preds = predict(model, lanes, device, s["tbptt_len"])
        preds.write_parquet(folder / "predictions.parquet")
        torch.save({"model": model.state_dict(), "loss": loss.state_dict()}, folder / "weights.pt")
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "backbone": dataclasses.asdict(cfg),
                    "train": dataclasses.asdict(train_cfg),
                    "feature_columns": meta["feature_columns"],
                    "direction_column": direction_col,
                },
                indent=2,
                default=str,
            )
        )
        (folder / "scaler.json").write_text(lanes.scaler.to_json())
        (folder / "history.json").write_text(json.dumps(result.history, indent=2))
        for ckpt in (folder / "_checkpoints").glob("*"):
            ckpt.unlink()
        (folder / "_checkpoints").rmdir()
        summary.update(
            best_val_loss=result.best_val_loss,
            epochs_run=result.epochs_run,
            steps=result.steps,
            skipped_steps=result.skipped_steps,
            train_seconds=round(time.perf_counter() - started, 1),
        )

    art = store.write(
        "mamba2",
        SPLIT,
        version,
        write,
        {"data_version": meta["version"], "preset": s["preset"], **summary},
    )
    if not art.created:
        log(f"Mamba2 {version} already exists at {art.path}; reused, not retrained")
        summary = {
            k: art.manifest["metadata"].get(k)
            for k in ("best_val_loss", "epochs_run", "steps", "skipped_steps", "train_seconds")
        }
    return {
        "model_version": version,
        "path": str(art.path),
        "reused_existing": not art.created,
        "data_version": meta["version"],
        "preset": s["preset"],
        "device": str(device),
        "parameters": _count(Forecaster(cfg)),
        **summary,
    }


@torch.no_grad()
def predict(model: Forecaster, lanes: Lanes, device: torch.device, chunk: int) -> pl.DataFrame:
    """Direction probabilities, quantiles and sigma on every validation and test bar.

    The model runs over each whole lane with its state carried, so a prediction at t sees
    bars up to t only (the layers are causal) and no target at all.
    """
    model.eval()
    state, parts = None, []
    for start in range(0, lanes.x.shape[1], chunk):
        out, state = model(lanes.x[:, start : start + chunk].to(device), state)
        parts.append({k: v.float().cpu() for k, v in out.items()})
    out = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    probs = torch.softmax(out["direction"], dim=-1).numpy()
    frames = []
    inverse = {v: k for k, v in SEGMENT_CODE.items()}
    for b, symbol in enumerate(lanes.symbols):
        n = lanes.ts[b].len()
        seg = lanes.segment[b, :n].numpy()
        keep = np.isin(seg, [SEGMENT_CODE[VAL], SEGMENT_CODE[TEST]])
        frames.append(
            pl.DataFrame(
                {
                    "symbol": symbol,
                    "ts": lanes.ts[b].filter(pl.Series(keep)),
                    "split": [inverse[int(c)] for c in seg[keep]],
                    **{
                        f"mamba_p_{c}": probs[b, :n][keep, k]
                        for k, c in enumerate(DIRECTION_CLASSES)
                    },
                    "mamba_q_low": out["quantiles"][b, :n, 0].numpy()[keep],
                    "mamba_q_high": out["quantiles"][b, :n, -1].numpy()[keep],
                    "mamba_sigma": out["sigma"][b, :n].numpy()[keep],
                }
            )
        )
    return pl.concat(frames)


def _to(seq: Sequences, device: torch.device) -> Sequences:
    return Sequences(
        seq.x.to(device),
        {k: v.to(device) for k, v in seq.targets.items()},
        None if seq.loss_mask is None else seq.loss_mask.to(device),
    )


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    """Under Dagster Pipes when launched by the asset; plain CLI otherwise."""
    import os

    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ:
        with open_dagster_pipes() as pipes:
            extras = dict(pipes.extras)
            data_dir = extras.pop("data_dir")
            md = train_mamba(data_dir, extras, log=pipes.log.info)
            pipes.report_asset_materialization(
                metadata={k: v for k, v in md.items() if v is not None},
                data_version=md["model_version"],
            )
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    for key, value in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(ap.parse_args())
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(train_mamba(args.pop("data_dir"), args), indent=2, default=str))


if __name__ == "__main__":
    main()
