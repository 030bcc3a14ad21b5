"""The latest forecast: after each refresh, the newest trained Mamba2's forecast at the newest
bar of every symbol, kept in the DuckDB table `forecasts`.

The model's recurrent state is carried from one refresh to the next (`ml.live`): each run feeds
the model the bars that arrived since the last one, not the whole history. torch is imported
inside the asset, so loading the definitions stays fast.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from assets.features import features, labels
from assets.metadata import png_md, raw_table_definition, table_md, table_name
from assets.partitions import SINGLE_RUN
from assets.resources import DUCKDB_POOL, WarehouseResource
from assets.training import dataset_rows, mamba_model, training_dataset
from ml.sequence_names import MAMBA2
from ml.walkforward import Fold
from warehouse.artifacts import Artifact, ArtifactError
from warehouse.lake import LakeError
from warehouse.schema import FORECASTS

FORECAST_GROUP = "forecast"
MAX_PLOTS = 5  # symbols plotted in the metadata


class LatestForecastConfig(dg.Config):
    model: str = MAMBA2  # the sequence model whose newest artifact forecasts
    # on a run without a saved state: forecasts for the bars of the last `backfill_days` that
    # are out of sample for the model (after its validation window), for the plot and the table
    backfill_days: int = 365
    plot_days: int = 365  # the recent as-of bars the metadata plot shows
    device: str = "cpu"  # or "auto" / "cuda"


def newest_model(store, meta: dict, kind: str) -> Artifact | None:
    """The latest artifact of `kind` for the newest walk-forward fold that has one."""
    for fold in reversed(meta["folds"]):
        try:
            return store.latest(kind, fold["key"])
        except ArtifactError:
            continue
    return None


@dg.asset(
    deps=[features, labels, training_dataset, mamba_model],
    group_name=FORECAST_GROUP,
    pool=DUCKDB_POOL,  # writes the forecasts table
    kinds={"pytorch", "duckdb"},
    code_version="1",
    output_required=False,  # skipped until a model is trained
    backfill_policy=SINGLE_RUN,  # may share a partition-range run with the fold assets
    description="The newest trained Mamba2's forecast at every symbol's newest bar (direction "
    "probabilities, p10/p90 and sigma, multi-horizon returns, the seeds' mean), carrying the "
    "recurrent state forward over the bars since the last run only; stored in the DuckDB table "
    "`forecasts` keyed by symbol, as-of bar and model version (a re-run replaces its rows).",
    metadata=raw_table_definition(FORECASTS),
)
def latest_forecast(
    context: dg.AssetExecutionContext, config: LatestForecastConfig, warehouse: WarehouseResource
):
    import torch

    from ml.forecasters import TargetSpec
    from ml.forecasters.neural import SequenceForecaster
    from ml.labels import LabelConfig
    from ml.live import carry_forward, live_fold_data, load_state, save_state

    lake, store, wh = warehouse.lake(), warehouse.artifacts(), warehouse.warehouse()
    if not lake.exists("training_dataset"):
        context.log.warning("No training dataset yet: nothing to forecast with. Skipped.")
        return
    meta = lake.read_meta("training_dataset")
    art = newest_model(store, meta, config.model)
    if art is None:
        context.log.warning(
            f"No trained {config.model} model yet: materialize `mamba_model` (the retrain_job) "
            "for a fold first. Skipped."
        )
        return
    md = art.manifest["metadata"]
    fold = Fold.from_json(md["fold"])
    seeds = [
        SequenceForecaster.from_artifact(art.path, s, device=config.device) for s in md["seeds"]
    ]
    torch.set_num_threads(seeds[0].settings.threads)
    needed = seeds[0].input_columns
    rows = dataset_rows(lake)
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise dg.Failure(
            f"The {config.model} model {art.version} (fold {fold.key}) reads the feature "
            f"columns {missing}, which the stored features no longer have (their definition "
            "changed): materialize `mamba_model` for the current fold again."
        )
    _check_inputs(lake, meta, md, config.model, art.version)
    targets = TargetSpec.from_label_config(LabelConfig.from_dict(meta["label_config"]))
    _check_heads(seeds[0], targets, art.version)
    lanes = seeds[0].lanes(live_fold_data(rows, fold, needed, targets))
    state_path = warehouse.paths.forecast_state_file(config.model, art.version)
    state_dir = state_path.parent
    newest = rows["ts"].max()
    fresh_from = max(fold.val_end, newest - timedelta(days=config.backfill_days))
    result = carry_forward(seeds, lanes.groups, targets, load_state(state_path), fresh_from)
    written = _store(wh, result.forecasts, art, fold, targets)
    # after the rows: a lost state only costs a replay
    save_state(state_path, result.state, root=warehouse.paths.forecast_state)
    for old in state_dir.glob("*"):  # other model versions' states, stray temporary files
        if old != state_path:
            old.unlink(missing_ok=True)
    groups = len(lanes.groups)
    if not result.restarted:
        mode = "carried the saved state forward"
    else:
        mode = "recomputed from the start of the history: " + "; ".join(result.restarted)
        if len(result.restarted) < groups:
            mode += "; the other lane groups' states carried forward"
    context.log.info(
        f"{config.model} {art.version} (fold {fold.key}): {mode}; ran {result.bars_run} bars, "
        f"wrote {written} forecasts up to {newest:%Y-%m-%d}"
    )
    stored = wh.read("forecasts", start=newest - timedelta(days=config.plot_days)).filter(
        pl.col("model_version") == art.version
    )
    latest = stored.filter(pl.col("as_of") == pl.col("as_of").max().over("symbol"))
    outcomes = lake.read("labels").select(
        "symbol",
        pl.col("ts").alias("as_of"),
        targets.quantile,
        targets.sigma,
    )
    metadata = {
        "model": config.model,
        "model_version": art.version,
        "fold": fold.key,
        "as_of": dg.MetadataValue.text(f"{newest:%Y-%m-%d}"),  # the newest bar of any symbol
        "mode": mode,
        # bar positions the model ran over, summed over the lane groups (calendars)
        "bars_run": dg.MetadataValue.int(result.bars_run),
        "rows_written": dg.MetadataValue.int(written),  # new or replaced
        "dagster/row_count": dg.MetadataValue.int(wh.count("forecasts")),  # every version
        "dagster/table_name": table_name(FORECASTS.name),
        "latest": table_md(
            latest.select(
                "symbol",
                "as_of",
                *[c for c in _prediction_columns(targets) if c in latest.columns],
            ),
            rows=50,
        ),
    }
    if stored.height:
        from ml.report import plot_recent_forecasts

        joined = stored.join(outcomes, on=["symbol", "as_of"], how="left")
        symbols = sorted(joined["symbol"].unique().to_list())
        if len(symbols) > MAX_PLOTS:
            metadata["plots"] = f"the first {MAX_PLOTS} of {len(symbols)} symbols"
        for symbol in symbols[:MAX_PLOTS]:
            fig = plot_recent_forecasts(joined, symbol, targets)
            metadata[f"plot_{symbol}"] = png_md(fig, f"{symbol} recent forecasts")
    yield dg.MaterializeResult(metadata=metadata)


def _check_inputs(lake, meta: dict, md: dict, model: str, version: str) -> None:
    """Fail when the stored features are no longer defined as those the model was trained on
    (same column names, another definition: the model would read inputs it never saw)."""
    try:
        trained = lake.read_meta("training_dataset", md["data_version"])["feature_version"]
    except (LakeError, KeyError):  # that dataset version was pruned: compare with the current
        trained = meta["feature_version"]
    now = lake.read_meta("features")["version"]
    if trained != now:
        raise dg.Failure(
            f"The {model} model {version} was trained on features version {trained}; the stored "
            f"features are version {now} (their definition changed): materialize the "
            "training_dataset and `mamba_model` for the current fold again."
        )


def _check_heads(f, targets, version: str) -> None:
    """Fail when the label configuration no longer matches the model's heads (the columns
    would be read from the wrong horizon)."""
    horizons = tuple(sorted({*targets.return_horizons, targets.direction_horizon}))
    if tuple(f.backbone.horizons) != horizons or tuple(f.backbone.quantiles) != tuple(
        targets.quantile_levels
    ):
        raise dg.Failure(
            f"The model {version} has heads for horizons {list(f.backbone.horizons)} and "
            f"quantiles {list(f.backbone.quantiles)}; the label configuration now asks for "
            f"{list(horizons)} and {list(targets.quantile_levels)}: retrain `mamba_model`."
        )


def _prediction_columns(targets) -> list[str]:
    # imported here: the ml.forecasters package loads every forecaster (LightGBM, arch, scipy)
    from ml.forecasters.base import ALL_TARGETS

    return [c for t in ALL_TARGETS for c in targets.prediction_columns(t)]


def _store(wh, forecasts: pl.DataFrame, art: Artifact, fold: Fold, targets) -> int:
    """Upsert the forecasts (the columns the label configuration leaves out are null)."""
    if forecasts.is_empty():
        return 0
    rows = forecasts.with_columns(
        model_version=pl.lit(art.version),
        model=pl.lit(art.kind),
        fold=pl.lit(fold.key),
        direction_horizon=pl.lit(targets.direction_horizon, dtype=pl.Int64),
        sigma_window=pl.lit(targets.sigma_window, dtype=pl.Int64),
        created_at=pl.lit(
            datetime.now(UTC).replace(tzinfo=None, microsecond=0), dtype=pl.Datetime("us")
        ),
    )
    rows = rows.with_columns(
        [pl.lit(None, dtype=t).alias(c) for c, t in FORECASTS.columns.items() if c not in rows]
    ).select(list(FORECASTS.columns))
    return wh.upsert("forecasts", rows, source="latest_forecast").rows_inserted
