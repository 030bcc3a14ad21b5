"""Blocking leakage checks on features, labels and the training dataset.

The logic is in ml/leakage.py; each check reads its inputs, runs one rule and reports the
offending rows. A failure stops everything downstream of the checked asset in the same run.
"""

from collections.abc import Callable
from dataclasses import fields, replace

import dagster as dg
import polars as pl

import ml.features as ml_features
from assets.features import features, labels
from assets.metadata import check_result
from assets.resources import WarehouseResource
from assets.training import training_dataset
from ml.dataset import TRAIN
from ml.labels import LabelConfig, label_columns
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
from ml.walkforward import Fold, assign_fold

Rules = Callable[[WarehouseResource], list[LeakageReport]]


def _leakage_check(
    asset: dg.AssetsDefinition, name: str
) -> Callable[[Rules], dg.AssetChecksDefinition]:
    """Declare the blocking check `name` on `asset` from a function that runs its rules.

    The function's docstring, with its line breaks folded, is the check's description, so each
    check states its rule once. Every rule's verdict is logged; the failed ones are reported
    with their offending rows.
    """

    def declare(rules: Rules) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=asset,
            name=name,
            blocking=True,
            description=" ".join((rules.__doc__ or "").split()),
        )
        def check(
            context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
        ) -> dg.AssetCheckResult:
            reports = rules(warehouse)
            for r in reports:
                (context.log.info if r.passed else context.log.error)(r.summary())
            failed = [r for r in reports if not r.passed]
            return check_result(
                passed=not failed,
                summary="\n".join(r.summary() for r in (failed or reports)),
                metadata={
                    "rules": dg.MetadataValue.json({r.rule: r.passed for r in reports}),
                    "rows_checked": max(r.checked for r in reports),
                    "offending_rows": sum(r.offending.height for r in failed),
                },
                failing={f"offending_{i}": r.offending for i, r in enumerate(failed)},
            )

        return check

    return declare


def _stored_feature_config(meta: dict) -> ml_features.FeatureConfig:
    """The FeatureConfig a features snapshot was written with, from its _meta.json 'config'
    (JSON turned its tuples into lists); fields the snapshot lacks keep their defaults."""
    names = {f.name for f in fields(ml_features.FeatureConfig)}
    given = meta.get("config") or {}
    return ml_features.FeatureConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in names}
    )


PRICE_COLUMNS = ("open", "high", "low", "close", "log_close")


@_leakage_check(features, "features_truncation_invariance")
def features_truncation_invariance(warehouse: WarehouseResource) -> list[LeakageReport]:
    """Reads the features snapshot the features asset stored (the current version, which
    downstream assets read), recomputes the features on all the raw data and on the raw tables
    cut at four dates (three on different publication weekdays, then the last day: bars before
    the cut, on-chain days over before it, macro values published before it) and requires the
    stored model columns and prices to equal the recomputed ones on every row (before each
    cut)."""
    store, lake = warehouse.warehouse(), warehouse.lake()
    version = lake.current_version("features")
    meta = lake.read_meta("features", version)
    cfg = _stored_feature_config(meta)
    if cfg.version() != version:
        rule = "truncation_invariance(stored features at t depend only on data known at t)"
        return [
            LeakageReport(
                rule,
                False,
                0,
                pl.DataFrame({"stored_version": [version], "current_version": [cfg.version()]}),
                f"the stored features snapshot (version {version}) was not written by the "
                f"current feature code (version {cfg.version()} for its config), so it cannot be "
                "checked against a recomputation: materialize the features asset again",
            )
        ]
    report = check_truncation_invariance(
        store.read("ohlcv"),
        store.read("onchain"),
        store.read("macro"),
        # looked up at call time (tests plant leaks in ml.features)
        lambda o, c, m: ml_features.compute_features(o, c, m, cfg),
        # the model inputs, and the prices the training dataset copies from the snapshot (the
        # backtest, the evaluation and the latest forecast read them)
        [*(c for c in PRICE_COLUMNS if c not in meta["model_columns"]), *meta["model_columns"]],
        stored=lake.read("features", version),
    )
    return [report]


@_leakage_check(labels, "labels_alignment")
def labels_alignment(warehouse: WarehouseResource) -> list[LeakageReport]:
    """Every label window starts after the row's time (label_end_ts > ts) and the last h rows
    of each h-bar label are null in every symbol."""
    lake = warehouse.lake()
    meta = lake.read_meta("labels")
    max_horizon = LabelConfig.from_dict(meta["config"]).max_horizon
    return [check_label_alignment(lake.read("labels"), meta["columns"], max_horizon)]


@_leakage_check(training_dataset, "training_split_hygiene")
def training_split_hygiene(warehouse: WarehouseResource) -> list[LeakageReport]:
    """In every walk-forward fold (from _meta.json 'folds'), no training row's label window
    reaches val_start - embargo, no validation row's reaches test_start - embargo, and each
    row's split matches its time."""
    lake = warehouse.lake()
    data = lake.read("training_dataset")
    reports = []
    for fold in (Fold.from_json(f) for f in lake.read_meta("training_dataset")["folds"]):
        report = check_split_hygiene(
            assign_fold(data, fold), fold.val_start, fold.test_start, fold.embargo
        )
        reports.append(replace(report, rule=f"fold {fold.key}: {report.rule}"))
    return reports


@_leakage_check(training_dataset, "training_scalers_fit_on_train_only")
def training_scalers_fit_on_train_only(warehouse: WarehouseResource) -> list[LeakageReport]:
    """In every walk-forward fold, the feature scaler of the sequence-model training path
    equals a Standardizer refitted on the fold's training rows, and stays the same when every
    non-training row is perturbed."""
    lake = warehouse.lake()
    meta = lake.read_meta("training_dataset")
    data = lake.read("training_dataset")
    cols, lcfg = meta["feature_columns"], meta["label_config"]
    feats = data.select(["symbol", "ts", *cols])
    labs = data.select(["symbol", "ts", *label_columns(LabelConfig.from_dict(lcfg))])
    reports = []
    for fold in (Fold.from_json(f) for f in meta["folds"]):
        rows = assign_fold(data, fold)
        splits = rows.select(["symbol", "ts", "split"])
        inputs = feats.filter(pl.col("ts") < fold.test_end)

        def fit(frame: pl.DataFrame, splits: pl.DataFrame = splits):
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
            inputs.select(["symbol", "ts"])
            .join(splits, on=["symbol", "ts"], how="left")["split"]
            .eq(TRAIN)
            .fill_null(False)
        )
        for report in (
            check_scaler_matches_training_rows(fit(inputs), rows, cols),
            check_fit_independence(
                fit, inputs, is_train, cols, same=standardizer_close, name="lanes scaler"
            ),
        ):
            reports.append(replace(report, rule=f"fold {fold.key}: {report.rule}"))
    return reports


LEAKAGE_CHECKS = [
    features_truncation_invariance,
    labels_alignment,
    training_split_hygiene,
    training_scalers_fit_on_train_only,
]
