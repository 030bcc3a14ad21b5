"""Blocking leakage checks on features, labels and the training dataset.

The logic is in ml/leakage.py; each check reads its inputs, runs one rule and reports the
offending rows. A failure stops everything downstream of the checked asset in the same run.
"""

from datetime import datetime, timedelta

import dagster as dg
import polars as pl

import ml.features as ml_features
from assets.features import features, labels
from assets.metadata import table_md
from assets.training import training_dataset
from ml.dataset import TRAIN
from ml.labels import LabelConfig
from ml.leakage import (
    LeakageReport,
    check_fit_independence,
    check_label_alignment,
    check_scaler_matches_training_rows,
    check_split_hygiene,
    check_truncation_invariance,
    lanes_scaler,
    standardizer_close,
)
from pipelines.resources import WarehouseResource


def _result(context: dg.AssetCheckExecutionContext, *reports: LeakageReport) -> dg.AssetCheckResult:
    for r in reports:
        (context.log.info if r.passed else context.log.error)(r.summary())
    failed = [r for r in reports if not r.passed]
    metadata: dict = {
        "rules": dg.MetadataValue.json({r.rule: r.passed for r in reports}),
        "rows_checked": max(r.checked for r in reports),
        "offending_rows": sum(r.offending.height for r in failed),
    }
    for i, r in enumerate(failed):
        metadata[f"offending_{i}"] = table_md(r.offending, rows=20)
    text = "\n".join(r.summary() for r in (failed or reports))
    return dg.AssetCheckResult(
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=text[:2000],
        metadata=metadata,
    )


@dg.asset_check(
    asset=features,
    name="features_truncation_invariance",
    blocking=True,
    description="Recomputes the features on the raw tables cut at three dates (bars before the "
    "cut, on-chain days over before it, macro values published before it) and requires the "
    "model columns to equal the full run's on every row before each cut.",
)
def features_truncation_invariance(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    store, lake = warehouse.warehouse(), warehouse.lake()
    cfg = ml_features.FeatureConfig()
    report = check_truncation_invariance(
        store.read("ohlcv"),
        store.read("onchain"),
        store.read("macro"),
        lambda o, c, m: ml_features.compute_features(o, c, m, cfg),
        lake.read_meta("features")["model_columns"],
    )
    return _result(context, report)


@dg.asset_check(
    asset=labels,
    name="labels_alignment",
    blocking=True,
    description="Every label window starts after the row's time (label_end_ts > ts) and the "
    "last h rows of each h-bar label are null in every symbol.",
)
def labels_alignment(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    lake = warehouse.lake()
    meta = lake.read_meta("labels")
    report = check_label_alignment(
        lake.read("labels"), meta["columns"], LabelConfig.from_dict(meta["config"]).max_horizon
    )
    return _result(context, report)


@dg.asset_check(
    asset=training_dataset,
    name="training_split_hygiene",
    blocking=True,
    description="No training row's label window reaches val_start - embargo and no validation "
    "row's reaches test_start - embargo (boundaries from _meta.json 'split').",
)
def training_split_hygiene(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    lake = warehouse.lake()
    split = lake.read_meta("training_dataset")["split"]
    report = check_split_hygiene(
        lake.read("training_dataset"),
        datetime.fromisoformat(split["val_start"]),
        datetime.fromisoformat(split["test_start"]),
        timedelta(days=int(split["embargo_days"])),
    )
    return _result(context, report)


@dg.asset_check(
    asset=training_dataset,
    name="training_scalers_fit_on_train_only",
    blocking=True,
    description="The feature scaler of the Mamba2 training path equals a Standardizer refitted "
    "on the training rows, and stays the same when every non-training row is perturbed.",
)
def training_scalers_fit_on_train_only(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    lake = warehouse.lake()
    meta = lake.read_meta("training_dataset")
    data = lake.read("training_dataset")
    cols, lcfg = meta["feature_columns"], meta["label_config"]
    feats, labs = lake.read("features"), lake.read("labels")
    splits = data.select(["symbol", "ts", "split"])

    def fit(frame: pl.DataFrame):
        return lanes_scaler(
            frame,
            labs,
            splits,
            cols,
            lcfg["horizons"],
            lcfg["direction_horizon"],
            lcfg["vol_window"],
        )

    is_train = (
        feats.select(["symbol", "ts"])
        .join(splits, on=["symbol", "ts"], how="left")["split"]
        .eq(TRAIN)
        .fill_null(False)
    )
    matches = check_scaler_matches_training_rows(fit(feats), data, cols)
    independent = check_fit_independence(
        fit, feats, is_train, cols, same=standardizer_close, name="Mamba2 lanes scaler"
    )
    return _result(context, matches, independent)


LEAKAGE_CHECKS = [
    features_truncation_invariance,
    labels_alignment,
    training_split_hygiene,
    training_scalers_fit_on_train_only,
]
