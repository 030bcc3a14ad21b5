"""Data-quality checks: Great Expectations suites plus polars rules on the raw tables, and a
suite on the `features` snapshot.

The blocking checks stop everything downstream of their asset in the same run; the extreme-move
check only warns (markets do jump).
"""

from datetime import timedelta

import dagster as dg
import polars as pl

from assets.features import features
from assets.ingest import INGEST_ASSETS, TABLE_OF
from assets.metadata import check_result
from ml.features import FeatureConfig, onchain_feature_columns
from pipelines.resources import WarehouseResource
from warehouse.quality import (
    QualityReport,
    RuleConfig,
    merge_reports,
    validate_features,
    validate_moves,
    validate_rules,
    validate_table,
)

RULES = RuleConfig()


def _window(context: dg.AssetCheckExecutionContext):
    op_ctx = context.op_execution_context
    if op_ctx.has_partition_key or op_ctx.has_partition_key_range:
        window = op_ctx.partition_time_window
        return window.start.replace(tzinfo=None), window.end.replace(tzinfo=None)
    return None, None


def _result(
    context: dg.AssetCheckExecutionContext,
    report: QualityReport,
    window: str,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """Log the suite's summary and report its failed expectations in one table (rule, count of
    unexpected rows, a few examples) next to the window it covered."""
    context.log.info(report.summary())
    failures = [
        {"rule": f.rule, "rows": f.unexpected_count, "examples": str(f.examples[:3])}
        for f in report.failures
    ]
    return check_result(
        passed=report.success,
        summary=report.summary(),
        metadata={
            "rows_checked": report.rows,
            "window": window,
            "expectations": len(report.outcomes),
            "failed": len(failures),
        },
        failing={"failures": pl.DataFrame(failures)} if failures else None,
        rows=50,
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
        "rules: no gaps (calendar days for entities trading on weekends, business days "
        "otherwise), macro series not stale, newest row fresh against the window end.",
    )
    def check(
        context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        start, end = _window(context)
        store = warehouse.warehouse()
        if start is None:
            context_rows = store.read(table)
            rows = context_rows
        else:
            context_rows = store.read(table, start - timedelta(days=RULES.lookback_days), end)
            rows = store.read(table, start, end)
        report = merge_reports(
            validate_table(table, rows), validate_rules(table, context_rows, start, end, RULES)
        )
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
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    start, end = _window(context)
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
    "null after the warm-up (on-chain columns only on symbols trading on weekends).",
)
def features_quality(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    lake = warehouse.lake()
    meta = lake.read_meta("features")
    onchain = meta.get("onchain_columns") or onchain_feature_columns(FeatureConfig())
    kwargs = {"warmup_bars": int(meta["warmup_bars"])} if "warmup_bars" in meta else {}
    report = validate_features(
        lake.read("features"), list(meta["model_columns"]), tuple(onchain), **kwargs
    )
    return _result(context, report, "whole snapshot")


QUALITY_CHECKS = [
    *(_quality_check(a) for a in INGEST_ASSETS),
    ohlcv_extreme_moves,
    features_quality,
]
