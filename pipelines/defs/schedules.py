"""The schedules: the daily refresh (ingest, features, the latest forecast) and the weekly
retrain of the current walk-forward fold. Both start stopped."""

from __future__ import annotations

from datetime import datetime, timedelta

import dagster as dg

# modules, not their definitions: see pipelines/defs/__init__.py
from assets import ingest, partitions, quality
from pipelines.defs import jobs

# The refresh runs the year partition(s) that the new days fall in, with `incremental` set on
# each ingest asset: it fetches from shortly before its newest stored bar to today 00:00 UTC.
INCREMENTAL = {"ops": {a.op.name: {"config": {"incremental": True}} for a in ingest.INGEST_ASSETS}}
# Runs of small steps (the ingest backfill, the daily refresh) finish sooner in one process: the
# forkserver and a process per step cost ~7 s and ~1 s each on 2 cores, more than their data
# work. Run config `execution: {config: {in_process: true}}` runs the steps one after another in
# the run's own process (the schedules' refresh runs do).
IN_PROCESS = {"execution": {"config": {"in_process": True}}}


def refresh_request(
    instance: dg.DagsterInstance, now: datetime, run_key: str | None = None
) -> dg.RunRequest | dg.SkipReason:
    """The refresh run for `now`: from the newest ingested year of the asset that lags most (so
    days missed across a new year are caught up too) through the year of yesterday, in one run.

    In the run's own process (IN_PROCESS); incremental unless a quality check of an ingest
    asset failed last time: then the years are re-fetched whole, so a bad or missing row behind
    the newest one is not kept for good."""
    year = (now - timedelta(days=1)).year
    newest = []
    for asset in ingest.INGEST_ASSETS:
        keys = [
            k
            for k in instance.get_materialized_partitions(asset.key)
            # not keys of an older partitioning
            if partitions.ingest_partitions.has_partition_key(k)
        ]
        if keys:
            newest.append(max(keys))
    if len(newest) < len(ingest.INGEST_ASSETS):
        return dg.SkipReason(
            "Nothing to refresh yet: backfill the history first, e.g. `dg launch --assets "
            f"'group:ingest' --partition-range 1960...{year}` (or `dagster asset materialize "
            "-m pipelines.definitions --select 'group:ingest' --partition-range "
            f"1960...{year}`), with the sources configured; then the schedule keeps it current"
        )
    ingest_keys = {a.key for a in ingest.INGEST_ASSETS}
    failed = [
        key.to_user_string()
        for checks in quality.QUALITY_CHECKS
        for key in checks.check_keys
        if key.asset_key in ingest_keys
        and (record := instance.get_latest_asset_check_evaluation_record(key)) is not None
        and record.event is not None
        and record.event.asset_check_evaluation is not None
        and not record.event.asset_check_evaluation.passed
        and record.event.asset_check_evaluation.severity == dg.AssetCheckSeverity.ERROR
    ]
    first = min(int(min(newest)), year)
    return dg.RunRequest(
        run_key=run_key,
        # in one process: a refresh is a handful of small steps (see IN_PROCESS)
        run_config=IN_PROCESS if failed else {**INCREMENTAL, **IN_PROCESS},
        tags={
            # Dagster's range tags (no public constant for them)
            "dagster/asset_partition_range_start": str(first),
            "dagster/asset_partition_range_end": str(year),
            "mambacast/refresh": "full, after failed checks: " + ", ".join(failed)
            if failed
            else "incremental",
        },
    )


@dg.schedule(
    job=jobs.daily_refresh_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every day 01:00 UTC: fetch the days since the newest stored bar (yesterday, "
    "or every missed day) through ingest and checks, rebuild features and labels, and "
    "forecast from the newest bar (latest_forecast).",
)
def daily_refresh_schedule(
    context: dg.ScheduleEvaluationContext,
) -> dg.RunRequest | dg.SkipReason:
    now = context.scheduled_execution_time
    return refresh_request(context.instance, now, run_key=f"refresh-{now:%Y-%m-%d}")


@dg.schedule(
    job=jobs.retrain_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sunday 03:00 UTC: retrain the current walk-forward fold (its test window runs "
    "to the newest bar), backtest it and re-evaluate every fold.",
)
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    keys = partitions.fold_partitions.get_partition_keys(
        current_time=context.scheduled_execution_time
    )
    return dg.RunRequest(partition_key=keys[-1])
