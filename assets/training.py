"""Walk-forward training: the dataset, a model set per fold (partition), and each fold's
out-of-sample predictions.

The dataset holds every row with features and labels; `ml.walkforward` decides which rows
train, validate and test each fold. Fold assets are partitioned by `fold_partitions` (one
partition per test window) and write immutable, versioned artifacts `<kind>/<fold>/<version>/`.

The forecasters (LightGBM, arch, scipy; torch behind the sequence models) are imported inside
the assets that run them, so loading the definitions stays fast.
"""

import json
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from assets.features import features, labels
from assets.metadata import frame_summary, lake_table_definition, lake_table_result, table_md, uri
from assets.partitions import FOLD_MONTHS, SINGLE_RUN, fold_partitions
from assets.resources import DUCKDB_POOL, WarehouseResource
from ml.features import FeatureConfig, feature_schema, model_feature_columns
from ml.labels import LabelConfig, label_schema
from ml.sequence_names import CLASSIC_BASELINE_NAMES, LITERATURE_BASELINE_NAMES, MAMBA2
from ml.walkforward import Fold, WalkForwardConfig, assign_fold, walk_forward_folds
from pipelines.launchers import TrainingLauncher
from warehouse.artifacts import ArtifactError, content_version, frame_fingerprint

if TYPE_CHECKING:
    from ml.forecasters import TargetSpec

# lake versions kept of the tables whose version changes with the data (dataset, predictions)
KEEP_VERSIONS = 5
SEQUENCE_BASELINES = list(CLASSIC_BASELINE_NAMES)  # lstm, gru, transformer, cnn_lstm
LITERATURE_BASELINES = list(LITERATURE_BASELINE_NAMES)  # mamba1, s4d, attention_lstm


class WalkForwardSettings(dg.Config):
    window: str = "expanding"  # or "rolling"
    train_days: int = 0  # rolling windows only
    val_days: int = 365
    embargo_days: int = 5
    min_train_rows: int = 500

    def to_ml(self) -> WalkForwardConfig:
        return WalkForwardConfig(step_months=FOLD_MONTHS, **self.model_dump())


def dataset_schema() -> dict[str, pl.DataType]:
    """The training dataset's declared columns with the default settings: the bar's key and
    prices, every candidate model column, the labels. A snapshot holds the model columns its
    data supports (an input missing at the end of the data is dropped; the features asset's
    `dropped_inputs`), so its materialization records its exact schema."""
    fcfg = FeatureConfig()
    stored, labelled = feature_schema(fcfg), label_schema(LabelConfig())
    price = ["symbol", "ts", "open", "high", "low", "close", "log_close"]
    return {
        **{c: stored[c] for c in (*price, *model_feature_columns(fcfg))},
        **{c: t for c, t in labelled.items() if c not in ("symbol", "ts")},
    }


def dataset_rows(lake) -> pl.DataFrame:
    """Every row as the training dataset holds it: the stored features (prices and the model
    inputs) joined to the labels (null where their window runs past the data), past the
    features' warm-up, sorted by (symbol, ts). `latest_forecast` reads the newest rows so."""
    fmeta = lake.read_meta("features")
    feats, labs = lake.read("features"), lake.read("labels")
    cols = fmeta["model_columns"]
    warm = [c for c in cols if c not in fmeta["onchain_columns"]]
    price = [c for c in ("open", "high", "low", "close", "log_close") if c in feats.columns]
    return (
        feats.select(["symbol", "ts", *price, *cols])
        .join(labs, on=["symbol", "ts"], how="inner")
        .drop_nulls(warm)
        .sort(["symbol", "ts"])
    )


@dg.asset(
    deps=[features, labels],
    group_name="training",
    pool=DUCKDB_POOL,  # refreshes its DuckDB view
    kinds={"polars", "parquet"},
    code_version="2",
    backfill_policy=SINGLE_RUN,
    description="Features joined to labels, every row; the walk-forward folds the data "
    "supports (test windows, validation, purge of whole label windows, embargo) in its meta.",
    metadata=lake_table_definition("training_dataset", dataset_schema()),
)
def training_dataset(
    context: dg.AssetExecutionContext, config: WalkForwardSettings, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    try:
        cfg = config.to_ml()
    except ValueError as e:
        raise dg.Failure(f"Invalid walk-forward settings: {e}") from e
    lake = warehouse.lake()
    fmeta, lmeta = lake.read_meta("features"), lake.read_meta("labels")
    cols = fmeta["model_columns"]
    data = dataset_rows(lake)
    try:
        folds = walk_forward_folds(data, cfg)
    except ValueError as e:
        raise dg.Failure(str(e)) from e
    version = content_version(
        "training_dataset", fmeta["version"], lmeta["version"], frame_fingerprint(data)
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
            "walk_forward": cfg.to_json(),
            "folds": [f.to_json() for f in folds],
        },
    )
    warehouse.warehouse().refresh_lake_views(lake, ["training_dataset"])
    table = pl.DataFrame(
        [
            {
                "fold": f.key,
                "train_from": f"{f.train_start:%Y-%m-%d}",
                "val_from": f"{f.val_start:%Y-%m-%d}",
                "test": f"{f.test_start:%Y-%m-%d} .. {f.test_end:%Y-%m-%d}",
                **{k: int(v) for k, v in assign_fold(data, f).group_by("split").len().iter_rows()},
            }
            for f in folds
        ]
    )
    context.log.info(f"training_dataset {version}: {data.height} rows, folds\n{table}")
    return dg.MaterializeResult(
        metadata={
            **frame_summary(data),
            **lake_table_result("training_dataset", data),
            "data_version": version,
            "folds": table_md(table, rows=100),
            "fold_keys": dg.MetadataValue.json([f.key for f in folds]),
            **uri(lake.version_dir("training_dataset", version)),
        }
    )


def _fold(meta: dict, key: str) -> Fold:
    folds = {f["key"]: f for f in meta["folds"]}
    if key not in folds:
        raise dg.Failure(
            f"Fold {key!r} is not supported by the training dataset (too little training "
            f"history, or no test rows yet); its folds are {list(folds)}. Materialize those "
            f"partitions, e.g. --partition-range {next(iter(folds))}...{list(folds)[-1]}"
        )
    return Fold.from_json(folds[key])


def _targets(meta: dict) -> "TargetSpec":
    from ml.forecasters import TargetSpec

    return TargetSpec.from_label_config(LabelConfig.from_dict(meta["label_config"]))


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"lightgbm", "xgboost", "scikitlearn", "polars"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="4",
    description="Per walk-forward fold: LightGBM, XGBoost and RandomForest (every target) and "
    "the statistical baselines "
    "(zero return, climatology, persistence, historical quantiles, EWMA, GARCH(1,1)-t, HAR), "
    "fitted on the fold's training rows; an immutable artifact with their predictions of the "
    "fold's validation and test rows.",
)
def model(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    from ml.forecasters import REGISTRY, fold_data
    from ml.forecasters.base import FORECASTERS_CODE_VERSION
    from ml.walkforward_run import fit_registered

    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    rows = lake.read("training_dataset")
    bars = warehouse.warehouse().read("ohlcv")
    names = sorted(REGISTRY)
    summary = []
    for key in context.partition_keys:
        fold = _fold(meta, key)
        version = content_version(
            "model", FORECASTERS_CODE_VERSION, names, meta["version"], fold.to_json()
        )
        info: dict = {}

        def write(folder, fold=fold, info=info):
            data = fold_data(rows, bars, fold, meta["feature_columns"], _targets(meta))
            long, fitted = fit_registered(data, names, log=context.log.info)
            long.write_parquet(folder / "predictions.parquet")
            (folder / "fit_info.json").write_text(json.dumps(fitted, indent=2, default=str))
            info.update(seconds=round(sum(f["seconds"] for f in fitted.values()), 1))

        art = store.write(
            "model",
            key,
            version,
            write,
            {"data_version": meta["version"], "fold": fold.to_json(), "forecasters": names},
        )
        if not art.created:
            context.log.info(f"fold {key}: model {version} exists; reused, not refitted")
        summary.append({"fold": key, "version": version, "reused": not art.created, **info})
    return dg.MaterializeResult(
        metadata={
            "folds": table_md(pl.DataFrame(summary), rows=100),
            "forecasters": dg.MetadataValue.json(names),
            "data_version": meta["version"],
            # one fold: its artifact; a range: the folder of every fold's
            **uri(art.path if len(context.partition_keys) == 1 else store.root / "model"),
        }
    )


class SequenceModelSettings(dg.Config):
    """The sequence models' training settings (ml.forecasters.neural.SequenceSettings; the
    defaults are those the ablations in docs/ABLATIONS.md chose)."""

    preset: str = "tiny"  # the Mamba2 backbone size: tiny (CPU), baseline, sparse_mhsa
    epochs: int = 8
    tbptt_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    dropout: float = 0.0
    patience: int = 3
    monitor: str = "direction"  # validation metric for early stopping: a target, or "total"
    min_steps: int = 100  # optimizer steps past warm-up before early stopping may stop
    seeds: list[int] = [0, 1, 2]
    device: str = "auto"  # auto: CUDA when the training process sees a GPU
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int = 1  # CPU threads per training process (Mamba2 and the baselines run side by side)
    stateful: bool = True  # False: the state restarts every tbptt_len bars
    lane_norm: bool = True  # standardize each lane with its own training rows (False: pooled)
    onchain: bool = True  # False: leave out the on-chain inputs
    sigma_anchor: bool = True  # heads in units of EWMA volatility from past returns


def _run_sequences(
    context: dg.AssetExecutionContext,
    config: SequenceModelSettings,
    warehouse: WarehouseResource,
    launcher: TrainingLauncher,
    models: list[str],
) -> dg.MaterializeResult:
    from ml.backbone import PRESETS

    if config.preset not in PRESETS:
        raise dg.Failure(f"Unknown Mamba2 preset {config.preset!r}; use one of {sorted(PRESETS)}")
    if config.epochs < 1 or config.tbptt_len < 1 or not config.seeds:
        raise dg.Failure("epochs and tbptt_len must be >= 1 and seeds must not be empty")
    monitors = ("direction", "quantiles", "sigma", "returns", "total")
    if config.monitor not in monitors or config.amp not in ("auto", "bf16", "off"):
        raise dg.Failure(
            f"monitor={config.monitor!r} / amp={config.amp!r}: use a monitor of {monitors} "
            "and amp auto, bf16 or off"
        )
    meta = warehouse.lake().read_meta("training_dataset")  # a clear message before launching
    for key in context.partition_keys:
        _fold(meta, key)
    # a subprocess beside this step, or a Kubernetes pod (pipelines/launchers.py)
    return launcher.launch(
        context,
        {
            "data_dir": str(warehouse.paths.root),
            "folds": list(context.partition_keys),
            "models": models,
            **config.model_dump(),
        },
    ).get_materialize_result()


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"pytorch"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="3",
    description="Per walk-forward fold: the Mamba2 forecaster (direction, quantiles, sigma, "
    "returns), one per seed, trained with truncated BPTT in a separate process launched "
    "through Dagster Pipes; an immutable artifact with weights and predictions.",
)
def mamba_model(
    context: dg.AssetExecutionContext,
    config: SequenceModelSettings,
    warehouse: WarehouseResource,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    return _run_sequences(context, config, warehouse, training_launcher, [MAMBA2])


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"pytorch"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="3",
    description="Per walk-forward fold: the LSTM, GRU, Transformer and CNN-LSTM baselines at "
    "Mamba2's parameter count, trained through the same trainer, lanes, heads and loss, one "
    "per seed, in a Pipes subprocess.",
)
def sequence_baselines(
    context: dg.AssetExecutionContext,
    config: SequenceModelSettings,
    warehouse: WarehouseResource,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    return _run_sequences(context, config, warehouse, training_launcher, SEQUENCE_BASELINES)


@dg.asset(
    deps=[training_dataset],
    group_name="training",
    kinds={"pytorch"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="1",
    description="Per walk-forward fold: the sequence models of the literature Mambacast's users "
    "come from, at Mamba2's parameter count and through the same trainer, lanes, heads and "
    "loss: Mamba1 (MambaStock's selective scan), S4D (diagonal state space, S4D-Lin, "
    "zero-order hold) and the Bitcoin tutorials' LSTM with attention pooling over a window; "
    "one per seed, in a Pipes subprocess beside the other training steps.",
)
def literature_baselines(
    context: dg.AssetExecutionContext,
    config: SequenceModelSettings,
    warehouse: WarehouseResource,
    training_launcher: TrainingLauncher,
) -> dg.MaterializeResult:
    return _run_sequences(context, config, warehouse, training_launcher, LITERATURE_BASELINES)


def _past_predictions(store, meta: dict, fold: Fold) -> list:
    """The predictions artifacts of the folds before `fold` made from the current dataset:
    their test rows are out of sample for every forecaster, so the ensemble weights of `fold`
    are fitted on them."""
    arts = []
    for f in meta["folds"]:
        if f["key"] >= fold.key:
            break
        try:
            art = store.latest("predictions", f["key"])
        except ArtifactError:
            continue
        if art.manifest["metadata"]["data_version"] == meta["version"]:
            arts.append(art)
    return arts


def _fold_artifacts(store, key: str, meta: dict) -> list:
    """The latest artifact of every model asset for fold `key`, each trained on the current
    dataset; a clear failure names the asset to materialize otherwise."""
    wanted = {"model": "model", MAMBA2: "mamba_model"}
    wanted.update(dict.fromkeys(SEQUENCE_BASELINES, "sequence_baselines"))
    wanted.update(dict.fromkeys(LITERATURE_BASELINES, "literature_baselines"))
    arts = []
    for kind, asset in wanted.items():
        try:
            art = store.latest(kind, key)
        except ArtifactError as e:
            raise dg.Failure(
                f"Fold {key}: no {kind} artifact. Materialize `{asset}` for it."
            ) from e
        if art.manifest["metadata"]["data_version"] != meta["version"]:
            raise dg.Failure(
                f"Fold {key}: the latest {kind} artifact {art.version} was trained on data "
                f"version {art.manifest['metadata']['data_version']}, the training dataset is "
                f"now {meta['version']}: materialize `{asset}` for fold {key} again first."
            )
        arts.append(art)
    return arts


@dg.asset(
    deps=[model, mamba_model, sequence_baselines, literature_baselines],
    group_name="training",
    kinds={"polars", "parquet"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="4",
    description="Per walk-forward fold: every forecaster's predictions of the fold's "
    "validation and test rows in one table, neural models as each seed and their mean, plus "
    "the ensemble (weights fitted on the earlier folds' out-of-sample rows whose labels end "
    "before this fold's validation end; the first fold's is the simple average) and the simple "
    "average, and the RandomForest + XGBoost + LSTM ensemble of the tutorials (weights fitted "
    "on this fold's validation rows) with its simple average.",
)
def predictions(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    from ml.forecasters.base import FORECASTERS_CODE_VERSION
    from ml.walkforward_run import (
        ASSEMBLY_CODE_VERSION,
        seed_means,
        with_ensembles,
        with_rf_xgb_lstm,
    )

    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    targets = _targets(meta)
    rows = lake.read("training_dataset")
    labels = rows.select(["symbol", "ts", *targets.label_columns()])
    ends = rows.select(["symbol", "ts", "label_end_ts"])
    summary = []
    for key in sorted(context.partition_keys):  # earlier folds first: they weight later ones
        fold = _fold(meta, key)
        arts = _fold_artifacts(store, key, meta)
        past = _past_predictions(store, meta, fold)
        version = content_version(
            "predictions",
            [a.version for a in arts],
            [a.version for a in past],
            FORECASTERS_CODE_VERSION,
            ASSEMBLY_CODE_VERSION,
        )
        info: dict = {}

        def write(folder, arts=arts, past=past, fold=fold, info=info):
            long = pl.concat(
                [pl.read_parquet(a.file("predictions.parquet")) for a in arts],
                how="vertical_relaxed",
            )
            long = pl.concat([long, seed_means(long)])
            history = (
                pl.concat([pl.read_parquet(a.file("predictions.parquet")) for a in past])
                .filter(pl.col("split") == "test")
                .join(ends, on=["symbol", "ts"], how="inner")
                .filter(pl.col("label_end_ts") < fold.val_end)
                .drop("label_end_ts")
                if past
                else None
            )
            long, weights = with_ensembles(long, history, labels, targets)
            long, tutorial = with_rf_xgb_lstm(long, labels, targets)
            weights.update(tutorial)
            long.write_parquet(folder / "predictions.parquet")
            (folder / "ensemble_weights.json").write_text(json.dumps(weights, indent=2))
            info.update(
                rows=long.height,
                forecasters=long["forecaster"].n_unique(),
                ensemble_fitted_on=weights["ensemble_fitted_on_rows"],
            )

        art = store.write(
            "predictions",
            key,
            version,
            write,
            {
                "data_version": meta["version"],
                "fold": fold.to_json(),
                "sources": {a.kind: a.version for a in arts},
            },
        )
        summary.append({"fold": key, "version": art.version, "reused": not art.created, **info})
    return dg.MaterializeResult(
        metadata={
            "folds": table_md(pl.DataFrame(summary), rows=100),
            "data_version": meta["version"],
            # one fold: its artifact; a range: the folder of every fold's
            **uri(art.path if len(context.partition_keys) == 1 else store.root / "predictions"),
        }
    )
