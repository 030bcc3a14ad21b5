"""The Definitions object that `dagster dev`, the webserver and the CLI load."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg

from assets.backtest import backtest
from assets.evaluation import evaluation
from assets.features import features, labels
from assets.forecast import FORECAST_GROUP, latest_forecast
from assets.ingest import INGEST_ASSETS
from assets.leakage import LEAKAGE_CHECKS
from assets.partitions import fold_partitions, ingest_partitions
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource, WarehouseResource
from assets.training import (
    literature_baselines,
    mamba_model,
    model,
    predictions,
    sequence_baselines,
    training_dataset,
)
from pipelines.alerts import AlertsResource, run_failure_alert
from pipelines.launchers import TrainingLauncher
from warehouse.paths import DEFAULT_DATA_DIR

ALL_ASSETS = [
    *INGEST_ASSETS,
    features,
    labels,
    training_dataset,
    model,
    mamba_model,
    sequence_baselines,
    literature_baselines,
    predictions,
    backtest,
    evaluation,
    latest_forecast,
]

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingest"),
    description="Fetch raw bars, on-chain and macro rows for the chosen partitions; run the "
    "quality checks.",
)
features_job = dg.define_asset_job(
    "features_job",
    selection=dg.AssetSelection.groups("features"),
    description="Recompute features and labels from the warehouse.",
)
daily_refresh_job = dg.define_asset_job(
    "daily_refresh_job",
    selection=dg.AssetSelection.groups("ingest", "features", FORECAST_GROUP),
    partitions_def=INGEST_ASSETS[0].partitions_def,
    description="Year partitions through ingest and checks, then features and labels, then "
    "the newest model's latest forecast; with `incremental` set on the sources only the days "
    "after the newest stored bar are fetched, and the forecast runs over those bars only.",
)
retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.groups("training", "backtest", "evaluation"),
    partitions_def=fold_partitions,
    description="Rebuild the training dataset, then for the chosen walk-forward fold(s): train "
    "every model, predict, backtest; then evaluate over every fold.",
)

# The refresh runs the year partition(s) that the new days fall in, with `incremental` set on
# each ingest asset: it fetches from shortly before its newest stored bar to today 00:00 UTC.
INCREMENTAL = {"ops": {a.op.name: {"config": {"incremental": True}} for a in INGEST_ASSETS}}
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
    for asset in INGEST_ASSETS:
        keys = [
            k
            for k in instance.get_materialized_partitions(asset.key)
            if ingest_partitions.has_partition_key(k)  # not keys of an older partitioning
        ]
        if keys:
            newest.append(max(keys))
    if len(newest) < len(INGEST_ASSETS):
        return dg.SkipReason(
            "Nothing to refresh yet: backfill the history first, e.g. `dagster asset materialize "
            "-m pipelines.definitions --select 'group:ingest' --partition-range 1960..."
            f"{year}` (with the sources configured), then the schedule keeps it current"
        )
    failed = [
        key.to_user_string()
        for checks in QUALITY_CHECKS
        for key in checks.check_keys
        if key.asset_key in {a.key for a in INGEST_ASSETS}
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
    job=daily_refresh_job,
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
    job=retrain_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Sunday 03:00 UTC: retrain the current walk-forward fold (its test window runs "
    "to the newest bar), backtest it and re-evaluate every fold.",
)
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    keys = fold_partitions.get_partition_keys(current_time=context.scheduled_execution_time)
    return dg.RunRequest(partition_key=keys[-1])


ALERT_WEBHOOK_ENV = "MAMBACAST_ALERT_WEBHOOK"


def default_resources(data_dir: str | None = None) -> dict[str, dg.ConfigurableResource]:
    root = data_dir or os.environ.get("MAMBACAST_DATA_DIR") or DEFAULT_DATA_DIR
    return {
        "warehouse": WarehouseResource(data_dir=str(Path(root).expanduser().resolve())),
        # Where mamba_model, sequence_baselines and literature_baselines train: a Pipes subprocess beside the step by
        # default, a Kubernetes pod with `kind: k8s` (deploy/k8s/pipes_training.yaml)
        "training_launcher": TrainingLauncher(),
        # The key is passed as an EnvVar reference, so the UI shows the name, never the value.
        "sources": MarketSourcesResource(
            fred_api_key=dg.EnvVar("FRED_API_KEY") if os.environ.get("FRED_API_KEY") else None
        ),
        # the webhook URL carries its token: an EnvVar reference too
        "alerts": AlertsResource(
            webhook_url=dg.EnvVar(ALERT_WEBHOOK_ENV) if os.environ.get(ALERT_WEBHOOK_ENV) else None
        ),
    }


# Step processes fork from a server that has already imported the project, so a step starts in
# well under a second instead of re-importing dagster and polars (~2.5 s on 2 cores). Great
# Expectations is preloaded too: every quality check needs it and it takes ~3 s to import, once
# instead of once per check. The training stacks (torch, LightGBM, scipy, matplotlib) are not
# preloaded: the few steps using them import them.
# Three at a time lets steps run side by side; DuckDB writers are serialized across runs by the
# `duckdb_writer` concurrency pool (and the warehouse's file lock), not by the executor.
MULTIPROCESS = {
    "max_concurrent": 3,
    "start_method": {
        "forkserver": {"preload_modules": ["pipelines.definitions", "great_expectations"]}
    },
}
executor = dg.multi_or_in_process_executor.configured(
    lambda cfg: {"in_process": {}} if cfg["in_process"] else {"multiprocess": MULTIPROCESS},
    name="mambacast_executor",
    config_schema={
        "in_process": dg.Field(
            bool,
            default_value=False,
            description="Run every step in the run's process, one after another, instead of "
            "forked step processes (faster for runs of many small steps)",
        )
    },
    description="Forked step processes (three at a time, the project preloaded), or in_process",
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=[*QUALITY_CHECKS, *LEAKAGE_CHECKS],
    jobs=[ingest_job, features_job, daily_refresh_job, retrain_job],
    schedules=[daily_refresh_schedule, weekly_retrain_schedule],
    sensors=[run_failure_alert],
    resources=default_resources(),
    executor=executor,
)
