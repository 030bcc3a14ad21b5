"""Ingest: raw OHLCV bars, on-chain metrics and macro series into DuckDB, one year per partition.

A partition (or a range of them, in one run) deletes its window's rows for the configured
entities and inserts the fetched rows in one transaction: re-runs never duplicate rows. The
write is audited before it is published: inside the transaction, the table's blocking quality
suite runs on the staged window (the rows its check will read), and a failure rolls the write
back, so a bad fetch never costs the good rows it would have replaced. A write that would delete
stored rows of its window without replacing them fails too, unless `allow_shrink` confirms it. The
window ends at the sources' cutoff (today 00:00 UTC, or `until`), so only complete days are
stored; with `incremental` set in the asset's config (the daily refresh sets it) it starts after
the newest stored bar, so a refresh fetches and writes only the new days, however many were
missed.
"""

from dataclasses import replace
from datetime import datetime, timedelta

import dagster as dg
import polars as pl
from pydantic import Field

from assets.metadata import raw_table_definition, report_metadata, table_md, table_name
from assets.partitions import SINGLE_RUN, ingest_partitions
from assets.resources import DUCKDB_POOL, MarketSourcesResource, WarehouseResource
from warehouse import Warehouse
from warehouse.quality import (
    FRESHNESS_RULE,
    QualityReport,
    RuleConfig,
    added_failures,
    check_bars,
    frame_reader,
    validate_window,
)
from warehouse.schema import MACRO, OHLCV, ONCHAIN, ohlcv_table
from warehouse.store import Reader, ShrinkingWindowError

# Days an incremental fetch re-reads before the newest stored row: sources revise their newest
# rows (a day's volume, preliminary on-chain metrics, FRED values in csv mode), and a one-day
# hole would otherwise stay. The window is replaced, so the overlap is rewritten, never doubled.
OVERLAP_DAYS = {"ohlcv": 3, "onchain": 7, "macro": 30}


class IngestConfig(dg.Config):
    incremental: bool = Field(
        default=False,
        description="Fetch only what is new: start after the newest stored bar (of the entity "
        "that lags most), less `overlap_days`, instead of at the partition's start. The daily "
        "refresh sets it; without it the partition window is re-fetched and replaced whole",
    )
    overlap_days: int | None = Field(
        default=None,
        ge=0,
        description="Days re-read before the resume point in incremental mode (default: 3 for "
        "bars, 7 for on-chain rows, 30 for macro series, which are revised)",
    )
    allow_shrink: bool = Field(
        default=False,
        description="Confirm a write that deletes stored rows of its window without replacing "
        "them (a source that no longer serves some rows). Without it such a write fails and "
        "nothing is written: a truncated file or a short page must not delete stored data "
        "quietly",
    )


# the rules of the ingest tables' blocking checks (assets/quality.py), also run on staged writes
RULES = RuleConfig()


class AuditFailure(Exception):
    """The staged write adds failures to its table's blocking quality suite; it is rolled back.

    `report` is the suite on the staged state, `failures` what the write added to it."""

    def __init__(self, report: QualityReport, failures: list) -> None:
        self.report = report
        self.failures = failures
        # the staged state's outcomes less the failures the table already had, plus the
        # intraday bars' rule when it failed: what the write is judged on
        kept = [o for o in report.outcomes if o.success or any(o is f for f in failures)]
        extra = [f for f in failures if not any(f is o for o in report.outcomes)]
        self.added = QualityReport(report.table, report.rows, report.entities, kept + extra)
        super().__init__(self.added.summary())


# how far past the newest stored row the next fetch starts: one bar
_BAR = {"1d": timedelta(days=1), "1h": timedelta(hours=1), "1m": timedelta(minutes=1)}


def publish(
    store: Warehouse,
    table: str,
    timeframe: str,
    rows,
    window: tuple[datetime, datetime],
    source,
    checked: tuple[datetime, datetime],
    allow_shrink: bool = False,
    log=None,
) -> list:
    """Write-audit-publish `rows` (fetched from `source` for `window`) into `table`: stage the
    replace in one transaction, audit it, and commit only if the audit passes.

    The audit runs the table's blocking suite (what its check reads after the write: the daily
    table for bars, over the `checked` window) on the staged state and fails on the failures
    the write adds: ones the stored state did not have (read in the same transaction before the
    delete), so an old gap or an entity no longer configured does not block a good write, and
    not freshness, which the check judges after the write. For 1h and 1m bars the written rows
    of their own table must also be consistent bars. Raises AuditFailure or
    ShrinkingWindowError, the warehouse unchanged; returns the WriteResults otherwise.
    """
    lookback = checked[0] - timedelta(days=RULES.lookback_days)
    stored: dict[str, pl.DataFrame] = {}

    def baseline(read: Reader) -> None:
        stored["rows"] = read(table, lookback, checked[1])  # judged only if the audit fails

    def audit(read: Reader) -> None:
        report = validate_window(table, read, *checked, RULES)
        failures = [f for f in report.failures if f.expectation != FRESHNESS_RULE]
        if failures:
            before = validate_window(table, frame_reader(stored["rows"]), *checked, RULES)
            failures = added_failures(replace(report, outcomes=failures), before)
        if timeframe != "1d":  # the written rows themselves: the rows being published
            bars = check_bars(ohlcv_table(timeframe), rows)
            failures += [] if bars.success else [bars]
        if failures:
            raise AuditFailure(report, failures)
        if log is not None:
            log(f"Audit of the staged write passed: {report.summary()}")

    write = {"allow_shrink": allow_shrink, "audit": audit, "baseline": baseline}
    start, end = window
    if table == "ohlcv":
        return store.replace_bars(
            timeframe, rows, start, end, source.entities, source.name, **write
        )
    return [store.replace_window(table, rows, start, end, source.entities, source.name, **write)]


def partition_window(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, sources: MarketSourcesResource
) -> tuple[datetime, datetime]:
    """The run's partition window, its end clipped to the sources' cutoff (may then be empty)."""
    window = context.partition_time_window
    start, end = window.start.replace(tzinfo=None), window.end.replace(tzinfo=None)
    return start, min(end, sources.cutoff())


def resume_point(store: Warehouse, table: str, entities, timeframe: str) -> datetime | None:
    """Where an incremental fetch starts: the day holding the bar after the newest stored one,
    taking the entity that lags most; None while some entity has no rows yet."""
    summary = store.summary(table)
    last = dict(zip(summary["entity"].to_list(), summary["last"].to_list(), strict=True))
    if not entities or any(e not in last for e in entities):
        return None
    newest = min(last[e] for e in entities)
    if not isinstance(newest, datetime):  # on-chain and macro rows are keyed by date
        newest = datetime.combine(newest, datetime.min.time())
    nxt = newest + _BAR.get(timeframe, timedelta(days=1))
    return datetime.combine(nxt.date(), datetime.min.time())


def table_metadata(
    context: dg.AssetExecutionContext, store: Warehouse, table: str
) -> dict[str, dg.MetadataValue | str]:
    """Dagster's table keys for the stored table after a write: its DuckDB name, its rows, and
    the rows of the run's partition (`dagster/partition_row_count`). A range run records one
    materialization per partition with the same metadata, so it gets each year's rows in
    `partition_row_counts` instead of one count that would be wrong for every partition."""
    window = context.partition_time_window
    years = store.rows_per_year(
        table, window.start.replace(tzinfo=None), window.end.replace(tzinfo=None)
    )
    keys = context.partition_keys
    metadata: dict[str, dg.MetadataValue | str] = {
        "dagster/table_name": table_name(table),
        "dagster/row_count": dg.MetadataValue.int(store.count(table)),
    }
    if len(keys) == 1:
        metadata["dagster/partition_row_count"] = dg.MetadataValue.int(years.get(keys[0], 0))
    else:
        metadata["partition_row_counts"] = dg.MetadataValue.json({k: years.get(k, 0) for k in keys})
    return metadata


def ingest_window(
    context: dg.AssetExecutionContext,
    table: str,
    config: IngestConfig,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.MaterializeResult:
    source = sources.source(table)
    store = warehouse.warehouse()
    timeframe = getattr(source, "timeframe", "1d")
    stored = ohlcv_table(timeframe) if table == "ohlcv" else table  # the table written
    start, end = partition_window(context, sources)
    # what the table's blocking check reads after the write (for bars the daily table, whatever
    # the source's timeframe): the staged write is audited on the same rows
    checked = (start, max(start, end))
    if config.incremental:
        resume = resume_point(store, stored, list(source.entities), timeframe)
        if resume is not None:
            overlap = OVERLAP_DAYS[table] if config.overlap_days is None else config.overlap_days
            context.log.info(
                f"Incremental: the newest stored {stored} rows end before {resume:%Y-%m-%d}; "
                f"fetching from {overlap} day(s) before it"
            )
            start = max(start, resume - timedelta(days=overlap))
    if start >= end:
        context.log.info(
            f"Nothing to fetch for {table}: the window [{start:%Y-%m-%d}, {end:%Y-%m-%d}) is "
            "empty (everything before the cutoff is stored, or the partition lies after it)"
        )
        return dg.MaterializeResult(
            metadata={
                "source": source.name,
                "window": f"empty: nothing to fetch before {end:%Y-%m-%d}",
                "timeframe": timeframe,
                "rows_inserted": 0,
                "rows_replaced": 0,
                **table_metadata(context, store, table),
            }
        )
    context.log.info(
        f"Fetching {table} from source {source.name!r} for {list(source.entities)}, "
        f"[{start:%Y-%m-%d}, {end:%Y-%m-%d})"
    )
    rows = source.fetch(start, end)
    context.log.info(
        f"Fetched {rows.height} rows; staging them in one transaction and auditing "
        f"{table} over [{checked[0]:%Y-%m-%d}, {checked[1]:%Y-%m-%d}) before publishing"
    )

    try:
        results = publish(
            store,
            table,
            timeframe,
            rows,
            (start, end),
            source,
            checked,
            config.allow_shrink,
            context.log.info,
        )
    except AuditFailure as failed:
        added, window = failed.added, f"[{checked[0]:%Y-%m-%d}, {checked[1]:%Y-%m-%d})"
        # the verdict is the table's blocking check's own, recorded under its name, so the UI
        # shows the failed evaluation where it shows every other one
        context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=context.asset_key,
                check_name=f"{table}_quality",
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"Audit of the staged write (rolled back): {added.summary()}"[:2000],
                metadata=report_metadata(added, window),
            )
        )
        raise dg.Failure(
            description=f"The fetched rows would add failures to the blocking check "
            f"{table}_quality on {window} ({added.summary()}); nothing was written: the stored "
            "rows are as they were. Fix the source (or its file) and re-run.",
            metadata=report_metadata(added, window),
        ) from None
    except ShrinkingWindowError as exc:
        asset = context.asset_key.to_user_string()
        where = (
            f" Source {source.name!r} reads {source.path}." if getattr(source, "path", "") else ""
        )
        raise dg.Failure(
            description=f"{exc}{where} To confirm: --config-json "
            f'\'{{"ops": {{"{asset}": {{"config": {{"allow_shrink": true}}}}}}}}\''
        ) from None
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
            "timeframe": timeframe,
            "rows_written": dg.MetadataValue.json({r.table: r.rows_inserted for r in results}),
            "rows_inserted": result.rows_inserted,
            "rows_replaced": result.rows_deleted,
            **table_metadata(context, store, result.table),
            "per_entity": table_md(store.summary(table), rows=50),
            "preview": table_md(rows.tail(5)),
            "database": dg.MetadataValue.path(str(store.path)),
        }
    )


_COMMON = {
    "partitions_def": ingest_partitions,
    # the daily refresh runs at 01:00 UTC: by 03:00 each ingest should have been materialized
    # since 01:00, or the UI marks it stale (the schedule starts stopped: stale until turned on)
    "freshness_policy": dg.FreshnessPolicy.cron(
        deadline_cron="0 3 * * *", lower_bound_delta=timedelta(hours=2)
    ),
    "backfill_policy": SINGLE_RUN,
    "group_name": "ingest",
    "pool": DUCKDB_POOL,
    "kinds": {"duckdb", "polars"},
    "code_version": "2",
}


@dg.asset(
    description="Daily OHLCV bars per symbol (table `ohlcv`, key symbol + ts; an hourly or "
    "minute source also fills `ohlcv_1h` / `ohlcv_1m`, from which the daily bars are built).",
    metadata=raw_table_definition(OHLCV),
    **_COMMON,
)
def ohlcv_bars(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.MaterializeResult:
    return ingest_window(context, "ohlcv", config, warehouse, sources)


@dg.asset(
    description="Daily Bitcoin on-chain metrics (table `onchain`, key asset + date).",
    metadata=raw_table_definition(ONCHAIN),
    **_COMMON,
)
def onchain_metrics(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.MaterializeResult:
    return ingest_window(context, "onchain", config, warehouse, sources)


@dg.asset(
    description="Macro series with publication dates (table `macro`, key series + date).",
    metadata=raw_table_definition(MACRO),
    **_COMMON,
)
def macro_series(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    warehouse: WarehouseResource,
    sources: MarketSourcesResource,
) -> dg.MaterializeResult:
    return ingest_window(context, "macro", config, warehouse, sources)


INGEST_ASSETS = [ohlcv_bars, onchain_metrics, macro_series]
TABLE_OF = {"ohlcv_bars": "ohlcv", "onchain_metrics": "onchain", "macro_series": "macro"}
