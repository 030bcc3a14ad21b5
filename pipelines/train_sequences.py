"""Train the sequence models (Mamba2 and the LSTM, GRU, Transformer, CNN-LSTM, Mamba1, S4D and
attention-LSTM baselines) of some walk-forward folds in their own process, launched by the
`mamba_model` and `sequence_baselines` assets through Dagster Pipes (so the same command can run
on a GPU host), or by hand:

    python -m pipelines.train_sequences --data-dir data --folds 2023 2024 --models mamba2 --seeds 0 1 2

For each (fold, model) it trains every seed through the TBPTT trainer, predicts the fold's
validation and test rows and writes one immutable artifact `<model>/<fold>/<version>/` with the
predictions of every seed, the weights, config and training history. Under Pipes it reports the
materialization (versions, validation losses, parameter counts) back to Dagster.

Data parallel on several GPUs (or CPU processes), one model trained by all of them:

    torchrun --nproc-per-node 4 -m pipelines.train_sequences --data-dir data --folds 2024

Every rank reads the fold's data and trains on its share of the lanes (see ml.distributed and
ml.trainer); rank 0 alone predicts, writes the artifact, prints the summary and, under Pipes,
talks to Dagster (it sends the launch's parameters to the other ranks). Training (the Trainer
and its validation) is collective, so every rank fits every seed; prediction is not (rank 0's
models predict in its process alone). After rank 0's writes of each seed and of each artifact
the ranks meet (`distributed.agreed`): a failure there raises on every rank instead of leaving
the others waiting, and the wait itself is bounded by MAMBACAST_DIST_TIMEOUT_S (default 2 h).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ml import distributed
from ml.forecasters import FoldData, TargetSpec, fold_data
from ml.forecasters.neural import SEQUENCE_MODELS, SequenceForecaster, SequenceSettings
from ml.labels import LabelConfig
from ml.walkforward import Fold
from ml.walkforward_run import to_long
from warehouse import ArtifactStore, DataPaths, Lake
from warehouse.artifacts import Artifact, content_version


def train_sequence_models(
    data_dir: str,
    folds: Sequence[str],
    models: Sequence[str],
    seeds: Sequence[int],
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or reuse) one artifact per (fold, model); return a summary per artifact."""
    s = SequenceSettings(**(settings or {}))
    unknown = [m for m in models if m not in SEQUENCE_MODELS]
    if unknown or not seeds:
        raise ValueError(
            f"models {unknown} unknown (use {list(SEQUENCE_MODELS)}) or no seeds given"
        )
    paths = DataPaths.at(data_dir)
    lake, store = Lake(paths.lake), ArtifactStore(paths.artifacts)
    meta = lake.read_meta("training_dataset")
    known = {f["key"]: Fold.from_json(f) for f in meta["folds"]}
    missing = [k for k in folds if k not in known]
    if missing:
        raise ValueError(
            f"Folds {missing} are not supported by the training dataset; it has {list(known)}"
        )
    rows = lake.read("training_dataset")
    targets = TargetSpec.from_label_config(LabelConfig.from_dict(meta["label_config"]))
    device = s.torch_device()
    rank, world = distributed.world()
    if world > 1 and device.type == "cuda" and device.index is not None:
        raise ValueError(
            f"device {s.device!r} pins every rank to one GPU; under torchrun use --device auto "
            f"or cuda (each rank trains on cuda:LOCAL_RANK)"
        )
    if world > 1 and device.type == "cuda":  # every rank needs its GPU: all fail, or none
        with distributed.agreed("to find its GPU"):
            distributed.require_local_gpu()
    if rank > 0:  # a helper rank: train alongside rank 0, write nothing
        for key in folds:
            data = fold_data(rows, rows, known[key], meta["feature_columns"], targets)
            for kind in models:
                _follow_artifact(
                    lambda seed, kind=kind, data=data: SequenceForecaster(kind, seed, s).fit(data),
                    seeds,
                )
        return {"artifacts": [], "device": str(device), "seeds": list(seeds), "rank": rank}
    summary: list[dict[str, Any]] = []
    total, done = len(folds) * len(models), 0
    for key in folds:
        fold = known[key]
        data = fold_data(rows, rows, fold, meta["feature_columns"], targets)
        for kind in models:
            done += 1
            version = content_version(
                kind, s.to_json(), str(device), sorted(seeds), meta["version"], fold.to_json()
            )
            # the writer adds the training summary to this dict before the manifest is written
            metadata: dict[str, Any] = {
                "data_version": meta["version"],
                "fold": fold.to_json(),
                "seeds": list(seeds),
                "device": str(device),
                "precision": s.precision(),  # training, validation and prediction alike
                "monitor": s.monitor,
            }
            if world > 1:
                metadata["world_size"] = world
            train = partial(_train, kind=kind, data=data, seeds=seeds, s=s, log=log, out=metadata)
            summary.append(
                _write_artifact(
                    store, kind, key, version, train, metadata, partial(_summarize, log=log)
                )
            )
            log(f"[{done}/{total}] fold {key} {kind} done")
    # one artifact: its folder; more (several models or folds): the artifacts' root
    where = Path(summary[0]["path"]) if len(summary) == 1 else store.root
    return {
        "artifacts": summary,
        "device": str(device),
        "seeds": list(seeds),
        "uri": where.resolve().as_uri(),
    }


def _summarize(art: Artifact, log: Callable[[str], None]) -> dict[str, Any]:
    if not art.created:
        log(f"fold {art.partition} {art.kind}: {art.version} already exists; reused, not retrained")
    md = art.manifest["metadata"]
    return {
        "fold": art.partition,
        "model": art.kind,
        "version": art.version,
        "path": str(art.path),
        "reused": not art.created,
        "parameters": md.get("parameters"),
        "val_loss_mean": round(sum(md["val_loss"]) / len(md["val_loss"]), 4)
        if md.get("val_loss")
        else None,
        "train_seconds": md.get("train_seconds"),
    }


def _write_artifact(
    store: ArtifactStore,
    kind: str,
    key: str,
    version: str,
    train: Callable[[Path], None],
    metadata: dict[str, Any],
    summarize: Callable[[Artifact], dict[str, Any]],
) -> dict[str, Any]:
    """Rank 0's part of one artifact: write it (or reuse it) and summarize it. Under DDP the
    other ranks run `_follow_artifact` meanwhile, the same collectives in the same order: a
    broadcast of whether it trains, an agreement after each seed (in `_train`) and one after
    the artifact and its summary, where a failure of rank 0 raises on every rank."""
    if distributed.world()[1] == 1:
        return summarize(store.write(kind, key, version, train, metadata))
    started: list[bool] = []

    def write(folder: Path) -> None:
        started.append(distributed.broadcast_object(True))  # the other ranks join in
        train(folder)

    error: Exception | None = None
    out: dict[str, Any] = {}
    try:
        out = summarize(store.write(kind, key, version, write, metadata))
    except distributed.RankFailed:
        raise  # agreed on every rank already (a seed's writes)
    except Exception as e:  # decided below, on every rank
        error = e
    if not started:
        distributed.broadcast_object(False)  # reused (or failed before training): no training
    distributed.raise_if_any(error, f"to write the artifact {kind}/{key}/{version}")
    return out


def _follow_artifact(fit: Callable[[int], object], seeds: Sequence[int]) -> None:
    """A helper rank's part in rank 0's `_write_artifact`: fit every seed with rank 0 if it
    trains, meeting it after each seed's writes and after the artifact's."""
    if distributed.broadcast_object(None):  # rank 0 trains it (not reused)
        for seed in seeds:
            fit(seed)
            distributed.raise_if_any(None)  # rank 0's predictions and weights of the seed
    distributed.raise_if_any(None)  # rank 0's artifact files, manifest and summary


def _train(
    folder: Path,
    kind: str,
    data: FoldData,
    seeds: Sequence[int],
    s: SequenceSettings,
    log: Callable[[str], None],
    out: dict[str, Any],
) -> None:
    """Train every seed of one model on one fold and write the artifact's files to `folder`."""
    parts, history = [], {}
    started = time.perf_counter()
    for seed in seeds:
        f = SequenceForecaster(kind, seed, s).fit(data)  # under DDP with every rank
        # this process alone (the helper ranks wait here, see `_follow_artifact`)
        with distributed.agreed(f"to predict and save {kind} seed {seed} of fold {data.key}"):
            parts.append(to_long(f.predict(data), kind, seed, data.key, data.scored, data.targets))
            torch.save(f.state_dict(), folder / f"weights_seed{seed}.pt")
            history[str(seed)] = {"summary": f.summary, "epochs": f.history}
            log(
                f"fold {data.key} {kind} seed {seed}: best validation loss "
                f"{f.summary['best_val_loss']:.4f} after {f.summary['steps']} steps"
            )
    pl.concat(parts).write_parquet(folder / "predictions.parquet")
    (folder / "history.json").write_text(json.dumps(history, indent=2, default=str))
    (folder / "scaler.json").write_text(f.scaler.to_json())
    if f.lane_scalers:  # lane_norm: each lane's own training statistics (of the last seed)
        (folder / "lane_scalers.json").write_text(
            json.dumps({k: json.loads(v.to_json()) for k, v in f.lane_scalers.items()}, indent=2)
        )
    if f.anchor_fill is not None:  # the anchor before its first estimate, from training rows
        (folder / "anchor_fill.json").write_text(json.dumps(f.anchor_fill, indent=2))
    config = {
        "model": kind,
        "settings": s.to_json(),
        "backbone": asdict(f.config(data)),
        "train": asdict(f.train_config()),
        "feature_columns": data.feature_columns,
        "seeds": list(seeds),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    summaries = [history[str(x)]["summary"] for x in seeds]
    out.update(
        parameters=f.summary["parameters"],
        val_loss=[x["best_val_loss"] for x in summaries],  # the monitored metric, per seed
        best_epoch=[x["best_epoch"] for x in summaries],
        epochs_run=[x["epochs_run"] for x in summaries],
        steps=[x["steps"] for x in summaries],
        train_seconds=round(time.perf_counter() - started, 1),
    )


def main() -> None:
    """Under Dagster Pipes when launched by an asset; plain CLI otherwise."""
    import os

    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    piped = os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR) is not None
    # under torchrun: join the process group, on the CLI's device (--device cpu leaves CUDA
    # alone); under Pipes the settings arrive after joining, from rank 0
    info = distributed.init_from_env(device=None if piped else _cli_device())
    try:
        _main(info, piped, open_dagster_pipes)
    finally:
        distributed.shutdown()


def _cli_device(argv: Sequence[str] | None = None) -> str:
    """The --device of the command line (the settings' default without one)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default=SequenceSettings().device)
    return ap.parse_known_args(argv)[0].device


def _main(info: distributed.DistInfo, piped: bool, open_dagster_pipes: Callable) -> None:
    if piped and not info.is_main:  # rank 0 speaks to Dagster and sends the parameters
        extras = distributed.broadcast_object(None)
        train_sequence_models(
            extras.pop("data_dir"),
            extras.pop("folds"),
            extras.pop("models"),
            extras.pop("seeds"),
            extras,
            log=lambda _: None,
        )
        return
    if piped:
        with open_dagster_pipes() as pipes:
            extras = distributed.broadcast_object(dict(pipes.extras))
            md = train_sequence_models(
                extras.pop("data_dir"),
                extras.pop("folds"),
                extras.pop("models"),
                extras.pop("seeds"),
                extras,
                log=pipes.log.info,
            )
            versions = {f"{a['fold']}/{a['model']}": a["version"] for a in md["artifacts"]}
            pipes.report_asset_materialization(
                metadata={
                    "artifacts": {"raw_value": md["artifacts"], "type": "json"},
                    # where the artifacts are: <data>/artifacts/<model>/<fold>/<version>
                    "dagster/uri": {"raw_value": md["uri"], "type": "text"},
                    "device": md["device"],
                    "seeds": {"raw_value": md["seeds"], "type": "json"},
                },
                data_version=content_version("sequence_artifacts", versions),
            )
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--folds", nargs="+", required=True)
    ap.add_argument("--models", nargs="+", default=["mamba2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for key, value in asdict(SequenceSettings()).items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(ap.parse_args())
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING)
    out = train_sequence_models(
        args.pop("data_dir"),
        args.pop("folds"),
        args.pop("models"),
        args.pop("seeds"),
        args,
        log=print if info.is_main else lambda _: None,
    )
    if info.is_main:
        print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
