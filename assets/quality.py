"""Blocking data-quality checks on the raw tables, run by Great Expectations.

A failed check stops everything downstream of its asset in the same run.
"""

import dagster as dg
import polars as pl

from assets.ingest import INGEST_ASSETS, TABLE_OF
from assets.metadata import table_md
from pipelines.resources import WarehouseResource
from warehouse.quality import validate_table


def _quality_check(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    table = TABLE_OF[asset.key.to_user_string()]

    @dg.asset_check(
        asset=asset,
        name=f"{table}_quality",
        blocking=True,
        description=f"Great Expectations suite on table `{table}`: schema and types, not-null "
        "keys, unique increasing time per entity, value rules (OHLC consistency, "
        "positive prices, non-negative volume, publication after observation).",
    )
    def check(
        context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        start = end = None
        op_ctx = context.op_execution_context
        if op_ctx.has_partition_key or op_ctx.has_partition_key_range:
            window = op_ctx.partition_time_window
            start, end = window.start.replace(tzinfo=None), window.end.replace(tzinfo=None)
        rows = warehouse.warehouse().read(table, start, end)
        report = validate_table(table, rows)
        context.log.info(report.summary())
        failures = [
            {"rule": f.rule, "rows": f.unexpected_count, "examples": str(f.examples[:3])}
            for f in report.failures
        ]
        metadata = {
            "rows_checked": report.rows,
            "window": f"[{start}, {end})" if start else "whole table",
            "expectations": len(report.outcomes),
            "failed": len(failures),
        }
        if failures:
            metadata["failures"] = table_md(pl.DataFrame(failures), rows=50)
        return dg.AssetCheckResult(
            passed=report.success,
            severity=dg.AssetCheckSeverity.ERROR,
            description=report.summary()[:2000],
            metadata=metadata,
        )

    return check


QUALITY_CHECKS = [_quality_check(a) for a in INGEST_ASSETS]
