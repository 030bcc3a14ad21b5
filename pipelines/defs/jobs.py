"""The jobs: asset selections by group, so a new asset of a group joins its job by being there."""

import dagster as dg

from assets.forecast import FORECAST_GROUP
from assets.partitions import fold_partitions, ingest_partitions

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
    partitions_def=ingest_partitions,
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
