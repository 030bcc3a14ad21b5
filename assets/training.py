"""Training: the split dataset, the model artifact, out-of-sample predictions and evaluation."""

import json
import sys

import dagster as dg
import numpy as np
import polars as pl

from assets.features import features, labels
from assets.metadata import frame_summary, table_md
from ml.backbone import PRESETS
from ml.baselines import Persistence, climatology
from ml.dataset import TEST, TRAIN, VAL, SplitConfig, assign_splits, split_boundaries
from ml.gbm import DirectionGBM, GBMConfig, config_dict
from ml.labels import DIRECTION_CLASSES, LabelConfig
from ml.metrics import block_bootstrap_ci, classification_report, log_loss_per_row
from pipelines.partitions import SINGLE_RUN
from pipelines.resources import WarehouseResource
from warehouse.artifacts import content_version, frame_fingerprint

SPLIT = "holdout"  # the partition of model / evaluation / backtest artifacts for the single split
# lake versions kept of the tables whose version changes with the data (dataset, predictions)
KEEP_VERSIONS = 5


class SplitSettings(dg.Config):
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    embargo_days: int = 5


class ModelSettings(dg.Config):
    learning_rate: float = 0.03
    max_rounds: int = 400
    num_leaves: int = 15
    seed: int = 7


@dg.asset(
    deps=[features, labels],
    group_name="training",
    kinds={"polars", "parquet"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Features joined to labels with a chronological train / val / test split; "
    "training and validation rows whose label windows reach the next segment "
    "(plus an embargo) are purged.",
)
def training_dataset(
    context: dg.AssetExecutionContext, config: SplitSettings, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    cfg = SplitConfig(config.val_fraction, config.test_fraction, config.embargo_days)
    lake = warehouse.lake()
    fmeta, lmeta = lake.read_meta("features"), lake.read_meta("labels")
    feats, labs = lake.read("features"), lake.read("labels")
    cols = fmeta["model_columns"]
    warm = [c for c in cols if c not in fmeta["onchain_columns"]]
    rows = (
        feats.select(["symbol", "ts", "open", "close", "log_close", *cols])
        .join(labs, on=["symbol", "ts"], how="inner")
        .drop_nulls(warm)
        .sort(["symbol", "ts"])
    )
    bounds = split_boundaries(rows["ts"], cfg)
    data = assign_splits(rows, bounds)
    counts = {s: int(data.filter(pl.col("split") == s).height) for s in (TRAIN, VAL, TEST)}
    purged = rows.height - data.height
    version = content_version(
        "training_dataset",
        fmeta["version"],
        lmeta["version"],
        cfg.__dict__,
        frame_fingerprint(data),
    )
    lake.write_snapshot(
        "training_dataset",
        data,
        time_column="ts",
        version=version,
        keep_versions=KEEP_VERSIONS,
        meta={
            "feature_version": fmeta["version"],
            "label_version": lmeta["version"],
            "feature_columns": cols,
            "label_config": lmeta["config"],
            "split": bounds.to_json(),
            "counts": counts,
            "purged_rows": purged,
        },
    )
    warehouse.warehouse().refresh_lake_views(lake, ["training_dataset"])
    context.log.info(
        f"training_dataset {version}: {counts}, {purged} rows purged, "
        f"val from {bounds.val_start:%Y-%m-%d}, test from {bounds.test_start:%Y-%m-%d}"
    )
    return dg.MaterializeResult(
        metadata={
            **frame_summary(data),
            "data_version": version,
            "split_counts": dg.MetadataValue.json(counts),
            "purged_rows": purged,
            "val_start": str(bounds.val_start.date()),
            "test_start": str(bounds.test_start.date()),
            "path": dg.MetadataValue.path(str(lake.version_dir("training_dataset", version))),
        }
    )


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"lightgbm"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="LightGBM 3-class 90-bar direction model, trained on the training split, "
    "early-stopped on validation; an immutable versioned artifact.",
)
def model(
    context: dg.AssetExecutionContext, config: ModelSettings, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    data = lake.read("training_dataset")
    target = f"direction_{LabelConfig.from_dict(meta['label_config']).direction_horizon}"
    cfg = GBMConfig(
        learning_rate=config.learning_rate,
        max_rounds=config.max_rounds,
        num_leaves=config.num_leaves,
        seed=config.seed,
    )
    version = content_version(config_dict(cfg), meta["version"], target)
    trained: dict = {}

    def write(folder):
        m = DirectionGBM.fit(
            data.filter(pl.col("split") == TRAIN),
            data.filter(pl.col("split") == VAL),
            meta["feature_columns"],
            target,
            cfg,
            log=context.log.info,
        )
        m.save(folder)
        (folder / "config.json").write_text(json.dumps(config_dict(cfg), indent=2))
        trained["importance"] = m.feature_importance()
        trained["best_round"] = m.booster.best_iteration

    art = store.write(
        "model",
        SPLIT,
        version,
        write,
        {
            "target": target,
            "data_version": meta["version"],
            "config": config_dict(cfg),
            "split": meta["split"],
        },
    )
    if not art.created:
        context.log.info(f"model {version} already exists at {art.path}; reused, not retrained")
    importance = trained.get("importance") or DirectionGBM.load(art.path).feature_importance()
    top = pl.DataFrame({"feature": list(importance)[:10], "gain": list(importance.values())[:10]})
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "path": dg.MetadataValue.path(str(art.path)),
            "reused_existing": not art.created,
            "data_version": meta["version"],
            "target": target,
            "best_round": trained.get("best_round", -1),
            "top_features": table_md(top),
        }
    )


class MambaSettings(dg.Config):
    preset: str = "tiny"  # tiny (CPU demo), baseline, sparse_mhsa
    epochs: int = 8
    tbptt_len: int = 128
    lr: float = 2e-3
    seed: int = 7
    device: str = "auto"  # auto: CUDA when the training process sees a GPU


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"pytorch"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Mamba2 forecaster (direction, quantiles, sigma, returns) trained with "
    "truncated BPTT in a separate process launched through Dagster Pipes; an immutable "
    "versioned artifact with weights, config, scaler and out-of-sample predictions.",
)
def mamba_model(
    context: dg.AssetExecutionContext,
    config: MambaSettings,
    warehouse: WarehouseResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    if config.preset not in PRESETS:
        raise dg.Failure(f"Unknown Mamba2 preset {config.preset!r}; use one of {sorted(PRESETS)}")
    if config.epochs < 1 or config.tbptt_len < 1:
        raise dg.Failure("epochs and tbptt_len must be >= 1")
    lake = warehouse.lake()
    lake.read_meta("training_dataset")  # fails with a clear message before launching
    return pipes_subprocess_client.run(
        command=[sys.executable, "-m", "pipelines.train_mamba"],
        context=context,
        extras={"data_dir": str(warehouse.paths.root), **config.model_dump()},
    ).get_materialize_result()


FORECASTERS = ("lightgbm", "mamba2", "climatology", "persistence")
MODELS = ("lightgbm", "mamba2")  # the forecasters that are backtested


@dg.asset(
    deps=[model, mamba_model],
    group_name="training",
    kinds={"polars", "parquet"},
    code_version="2",
    backfill_policy=SINGLE_RUN,
    description="Out-of-sample direction probabilities on the validation and test rows from "
    "LightGBM and Mamba2, with the climatology and persistence baselines on the same rows.",
)
def predictions(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    data = lake.read("training_dataset")
    art = _current(store.latest("model", SPLIT), meta, "model")
    mamba = _current(store.latest("mamba2", SPLIT), meta, "mamba_model")
    target = art.manifest["metadata"]["target"]
    gbm = DirectionGBM.load(art.path)
    train = data.filter((pl.col("split") == TRAIN) & pl.col(target).is_not_null())
    oos = data.filter(pl.col("split") != TRAIN).sort(["symbol", "ts"])
    pers = Persistence(LabelConfig.from_dict(meta["label_config"])).fit(train, target)
    probs = {
        "lightgbm": gbm.predict_proba(oos),
        "climatology": climatology(train[target].to_numpy(), oos.height),
        "persistence": pers.predict_proba(oos),
    }
    cols = {
        f"{name}_p_{cls}": p[:, k]
        for name, p in probs.items()
        for k, cls in enumerate(DIRECTION_CLASSES)
    }
    out = oos.select(["symbol", "ts", "split", "open", "close"]).with_columns(
        **{k: pl.Series(v) for k, v in cols.items()}
    )
    mamba_preds = pl.read_parquet(mamba.file("predictions.parquet")).drop("split")
    mamba_preds = mamba_preds.rename(
        {c: c.replace("mamba_", "mamba2_") for c in mamba_preds.columns if c.startswith("mamba_")}
    )
    out = out.join(mamba_preds, on=["symbol", "ts"], how="left")
    missing = out.filter(pl.col("mamba2_p_up").is_null()).height
    if missing:
        raise dg.Failure(
            f"Mamba2 artifact {mamba.version} lacks predictions for {missing} "
            "out-of-sample rows: materialize `mamba_model` again."
        )
    out = out.with_columns(
        lightgbm_version=pl.lit(art.version), mamba2_version=pl.lit(mamba.version)
    )
    pred_version = content_version("predictions", art.version, mamba.version, meta["version"])
    lake.write_snapshot(
        "predictions",
        out,
        time_column="ts",
        version=pred_version,
        keep_versions=KEEP_VERSIONS,
        meta={
            "model_version": art.version,
            "mamba2_version": mamba.version,
            "data_version": meta["version"],
            "target": target,
        },
    )
    warehouse.warehouse().refresh_lake_views(lake, ["predictions"])
    latest = (
        out.sort("ts")
        .group_by("symbol", maintain_order=True)
        .last()
        .select(
            [
                "symbol",
                "ts",
                "lightgbm_p_down",
                "lightgbm_p_up",
                "mamba2_p_down",
                "mamba2_p_up",
                "mamba2_q_low",
                "mamba2_q_high",
            ]
        )
    )
    context.log.info(
        f"predictions: {out.height} out-of-sample rows from LightGBM {art.version} "
        f"and Mamba2 {mamba.version}"
    )
    return dg.MaterializeResult(
        metadata={
            **frame_summary(out),
            "model_version": art.version,
            "mamba2_version": mamba.version,
            "predictions_version": pred_version,
            "path": dg.MetadataValue.path(str(lake.version_dir("predictions", pred_version))),
            "latest_forecast": table_md(latest),
        }
    )


def _current(art, meta: dict, asset: str):
    """The artifact, if it was trained on the current training dataset."""
    if art.manifest["metadata"]["data_version"] != meta["version"]:
        raise dg.Failure(
            f"The latest {art.kind} artifact {art.version} was trained on data version "
            f"{art.manifest['metadata']['data_version']}, but the training dataset is now "
            f"{meta['version']}: materialize `{asset}` again first."
        )
    return art


@dg.asset(
    deps=[predictions],
    group_name="training",
    kinds={"polars"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Direction metrics on the test rows (never used for training or early "
    "stopping), model beside the baselines, with block-bootstrap intervals.",
)
def evaluation(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    lake, store = warehouse.lake(), warehouse.artifacts()
    pmeta = lake.read_meta("predictions")
    target = pmeta["target"]
    horizon = int(target.split("_")[-1])
    preds = lake.read("predictions").filter(pl.col("split") == TEST)
    labs = lake.read("labels").select(["symbol", "ts", target])
    rows = (
        preds.join(labs, on=["symbol", "ts"], how="inner")
        .filter(pl.col(target).is_not_null())
        .sort(["symbol", "ts"])
    )
    if rows.height < 30:
        raise dg.Failure(
            f"Only {rows.height} labelled test rows: too few to evaluate. Ingest a longer range."
        )
    y = rows[target].to_numpy().astype(np.int64)
    names = FORECASTERS
    p = {n: rows.select([f"{n}_p_{c}" for c in DIRECTION_CLASSES]).to_numpy() for n in names}
    table = [{"forecaster": n, **classification_report(y, p[n])} for n in names]
    intervals = []
    for name, base in [(m, b) for m in MODELS for b in ("climatology", "persistence")]:
        diff = log_loss_per_row(y, p[name]) - log_loss_per_row(y, p[base])
        lo, hi = block_bootstrap_ci(diff, block=horizon)
        intervals.append(
            {
                "model": name,
                "baseline": base,
                "mean_log_loss_diff": float(diff.mean()),
                "ci95_low": lo,
                "ci95_high": hi,
                "model_better": bool(hi < 0),
            }
        )
    metrics = pl.DataFrame(table)
    version = content_version(
        "evaluation", pmeta["model_version"], pmeta["mamba2_version"], frame_fingerprint(rows)
    )
    art = store.write(
        "evaluation",
        SPLIT,
        version,
        lambda d: (d / "metrics.json").write_text(
            json.dumps(
                {"rows": rows.height, "metrics": table, "log_loss_vs_baselines": intervals},
                indent=2,
            )
        ),
        {
            "model_version": pmeta["model_version"],
            "mamba2_version": pmeta["mamba2_version"],
            "test_rows": rows.height,
        },
    )
    context.log.info(f"evaluation on {rows.height} test rows:\n{metrics}")
    return dg.MaterializeResult(
        metadata={
            "test_rows": rows.height,
            "test_period": f"{rows['ts'].min():%Y-%m-%d} .. {rows['ts'].max():%Y-%m-%d}",
            "model_version": pmeta["model_version"],
            "mamba2_version": pmeta["mamba2_version"],
            "metrics": table_md(metrics),
            "log_loss_vs_baselines": table_md(pl.DataFrame(intervals)),
            **{
                f"{name}_log_loss": float(
                    metrics.filter(pl.col("forecaster") == name)["log_loss"][0]
                )
                for name in FORECASTERS
            },
            "path": dg.MetadataValue.path(str(art.path)),
        }
    )
