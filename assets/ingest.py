"""Ingest: raw OHLCV bars, on-chain metrics and macro series into DuckDB, one day per partition.

A partition (or a range of them, in one run) deletes that window's rows for the configured
entities and inserts the fetched rows in one transaction: re-runs never duplicate rows.
"""

import dagster as dg

from assets.metadata import table_md
from assets.partitions import SINGLE_RUN, daily_partitions
from assets.resources import MarketSourcesResource, WarehouseResource


def ingest_window(
    context: dg.AssetExecutionContext,
    table: str,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.MaterializeResult:
    source = sources.source(table)
    window = context.partition_time_window
    start, end = window.start.replace(tzinfo=None), window.end.replace(tzinfo=None)
    context.log.info(
        f"Fetching {table} from source {source.name!r} for {list(source.entities)}, "
        f"[{start:%Y-%m-%d}, {end:%Y-%m-%d})"
    )
    rows = source.fetch(start, end)
    context.log.info(f"Fetched {rows.height} rows; writing them in one transaction")
    store = warehouse.warehouse()
    if table == "ohlcv":
        results = store.replace_bars(
            getattr(source, "timeframe", "1d"), rows, start, end, source.entities, source.name
        )
    else:
        results = [store.replace_window(table, rows, start, end, source.entities, source.name)]
    for r in results:
        context.log.info(
            f"{r.table}: replaced {r.rows_deleted} rows with {r.rows_inserted}; "
            f"table now has {r.rows_after} rows"
        )
    result = results[-1]  # the daily table for bars; downstream assets read it
    return dg.MaterializeResult(
        metadata={
            "source": source.name,
            "window": f"[{start:%Y-%m-%d}, {end:%Y-%m-%d})",
            "timeframe": getattr(source, "timeframe", "1d"),
            "rows_written": dg.MetadataValue.json({r.table: r.rows_inserted for r in results}),
            "rows_inserted": result.rows_inserted,
            "rows_replaced": result.rows_deleted,
            "table_rows": result.rows_after,
            "per_entity": table_md(store.summary(table), rows=50),
            "preview": table_md(rows.tail(5)),
            "table": f"{store.path}::{result.table}",
        }
    )


_COMMON = {
    "partitions_def": daily_partitions,
    "backfill_policy": SINGLE_RUN,
    "group_name": "ingest",
    "kinds": {"duckdb", "polars"},
    "code_version": "1",
}


@dg.asset(description="Daily OHLCV bars per symbol (table `ohlcv`, key symbol + ts).", **_COMMON)
def ohlcv_bars(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, sources: MarketSourcesResource
) -> dg.MaterializeResult:
    return ingest_window(context, "ohlcv", warehouse, sources)


@dg.asset(
    description="Daily Bitcoin on-chain metrics (table `onchain`, key asset + date).", **_COMMON
)
def onchain_metrics(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, sources: MarketSourcesResource
) -> dg.MaterializeResult:
    return ingest_window(context, "onchain", warehouse, sources)


@dg.asset(
    description="Macro series with publication dates (table `macro`, key series + date).", **_COMMON
)
def macro_series(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, sources: MarketSourcesResource
) -> dg.MaterializeResult:
    return ingest_window(context, "macro", warehouse, sources)


INGEST_ASSETS = [ohlcv_bars, onchain_metrics, macro_series]
TABLE_OF = {"ohlcv_bars": "ohlcv", "onchain_metrics": "onchain", "macro_series": "macro"}
