"""Data-quality checks: Great Expectations suites plus polars rules on the raw tables, and a
suite on the `features` snapshot.

The blocking checks stop everything downstream of their asset in the same run; the extreme-move
check only warns (markets do jump). Inside a blocking check, rules of severity "warning" (an
on-chain or macro source that lags or ends before the window end) are logged and shown in the
metadata without failing it: the features' ragged-edge rule handles such inputs.
"""

from datetime import timedelta

import dagster as dg

from assets.features import features
from assets.ingest import INGEST_ASSETS, RULES, TABLE_OF, partition_window
from assets.metadata import check_result, report_metadata
from assets.resources import MarketSourcesResource, WarehouseResource
from ml.features import FeatureConfig, onchain_feature_columns
from warehouse.quality import (
    QualityReport,
    validate_features,
    validate_moves,
    validate_window,
)


def _window(context: dg.AssetCheckExecutionContext, sources: MarketSourcesResource):
    """The checked window: the run's partition window up to the sources' cutoff (the whole
    window, also after an incremental ingest wrote only its last days)."""
    op_ctx = context.op_execution_context
    if op_ctx.has_partition_key or op_ctx.has_partition_key_range:
        start, end = partition_window(op_ctx, sources)
        return start, max(start, end)
    return None, None


def _result(
    context: dg.AssetCheckExecutionContext,
    report: QualityReport,
    window: str,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """Log the suite's summary and report its failed expectations and its warnings in a table
    each (rule, count of unexpected rows, a few examples) next to the window it covered."""
    (context.log.warning if report.warnings else context.log.info)(report.summary())
    return check_result(
        passed=report.success,
        summary=report.summary(),
        metadata=report_metadata(report, window),
        severity=severity,
    )


def _quality_check(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    table = TABLE_OF[asset.key.to_user_string()]

    @dg.asset_check(
        asset=asset,
        name=f"{table}_quality",
        blocking=True,
        description=f"Great Expectations suite on table `{table}`: schema and types, not-null "
        "keys, unique increasing time per entity, value rules (OHLC consistency, "
        "positive prices, non-negative volume, publication after observation); and polars "
        "rules: no gaps (calendar days for entities trading on weekends; otherwise business "
        "days beyond US federal holidays, a few more for macro series), macro values not "
        "forward-filled, newest row fresh against the window end (for on-chain and macro "
        "rows, and macro series without a new value by then, a warning only).",
    )
    def check(
        context: dg.AssetCheckExecutionContext,
        warehouse: WarehouseResource,
        sources: MarketSourcesResource,
    ) -> dg.AssetCheckResult:
        start, end = _window(context, sources)
        store = warehouse.warehouse()
        report = validate_window(table, store.read, start, end, RULES)
        return _result(context, report, f"[{start}, {end})" if start else "whole table")

    return check


@dg.asset_check(
    asset=INGEST_ASSETS[0],
    name="ohlcv_extreme_moves",
    blocking=False,
    description=f"Warns about one-bar moves with |log return| > {RULES.max_abs_log_return} "
    "(naming the bars); not blocking.",
)
def ohlcv_extreme_moves(
    context: dg.AssetCheckExecutionContext,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.AssetCheckResult:
    start, end = _window(context, sources)
    lo = None if start is None else start - timedelta(days=RULES.lookback_days)
    rows = warehouse.warehouse().read("ohlcv", lo, end)
    report = validate_moves(rows, start, RULES)
    window = f"[{start}, {end})" if start else "whole table"
    return _result(context, report, window, dg.AssetCheckSeverity.WARN)


@dg.asset_check(
    asset=features,
    name="features_quality",
    blocking=True,
    description="Great Expectations suite on the features snapshot: model columns (from "
    "_meta.json) present and numeric, unique (symbol, ts), RSI in 0..100, model columns not "
    "null after the warm-up (on-chain columns only on symbols with on-chain data; carried "
    "macro and on-chain columns on all but max_missing_share of those bars, and on each "
    "symbol's newest bar).",
)
def features_quality(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    lake = warehouse.lake()
    meta = lake.read_meta("features")
    # snapshots written before the ragged-edge rule lack the newer keys: the old defaults
    onchain = meta.get("onchain_columns", onchain_feature_columns(FeatureConfig()))
    report = validate_features(
        lake.read("features"),
        list(meta["model_columns"]),
        tuple(onchain),
        int(meta.get("warmup_bars", FeatureConfig().warmup_bars)),
        carried_columns=tuple(meta.get("carried_columns", ())),
        max_missing_share=float(meta.get("max_missing_share", 0.0)),
        onchain_symbols=meta.get("onchain_symbols"),
    )
    return _result(context, report, "whole snapshot")


QUALITY_CHECKS = [
    *(_quality_check(a) for a in INGEST_ASSETS),
    ohlcv_extreme_moves,
    features_quality,
]
