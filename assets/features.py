"""Features and labels as Parquet, recomputed over the whole history after each ingest.

Recomputing is cheap (polars over the full table) and avoids stale labels: the label of a row
changes as the bars after it arrive.

The feature set follows the warehouse: macro columns for each series the macro table holds
(what was ingested, whatever the sources resource says now), on-chain columns for the metrics
with data; the ragged-edge rule (`ml.features.select_model_columns`) then decides which of
them models get, and the snapshot's `_meta.json` lists exactly those.
"""

from dataclasses import asdict

import dagster as dg
import polars as pl

from assets.ingest import macro_series, ohlcv_bars, onchain_metrics
from assets.metadata import (
    frame_summary,
    lake_table_definition,
    lake_table_result,
    table_md,
    uri,
)
from assets.partitions import SINGLE_RUN
from assets.resources import DUCKDB_POOL, WarehouseResource
from ml.features import (
    FeatureConfig,
    compute_features,
    feature_schema,
    macro_series_of,
    onchain_symbols_of,
    select_model_columns,
)
from ml.labels import (
    DIRECTION_CLASSES,
    LabelConfig,
    compute_labels,
    label_columns,
    label_schema,
)


class LabelsConfig(dg.Config):
    up_threshold: float = 0.05
    down_threshold: float = -0.05

    def to_ml(self) -> LabelConfig:
        return LabelConfig(up_threshold=self.up_threshold, down_threshold=self.down_threshold)


def _require_rows(table: str, n: int) -> None:
    if n == 0:
        raise dg.Failure(
            f"Raw table {table!r} is empty: materialize the ingest assets first "
            "(e.g. `make demo`, or `dagster asset materialize --select 'group:ingest' "
            "--partition-range ...`)."
        )


@dg.asset(
    deps=[ohlcv_bars, onchain_metrics, macro_series],
    group_name="features",
    pool=DUCKDB_POOL,  # refreshes its DuckDB view
    kinds={"polars", "parquet"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Leak-free features per (symbol, ts): returns, EMA, RSI, MACD, realized "
    "volatility, cyclical time, macro as of publication, on-chain ratios. Macro and on-chain "
    "values are carried forward up to a limit; an input missing at the end of the data or on "
    "too many bars is dropped from the model columns with a warning (metadata "
    "`dropped_inputs`). Declared columns: the default settings with the four FRED series; a "
    "materialization records the columns its macro and on-chain inputs gave.",
    metadata=lake_table_definition("features", feature_schema(FeatureConfig())),
)
def features(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    cfg = FeatureConfig()
    store, lake = warehouse.warehouse(), warehouse.lake()
    ohlcv = store.read("ohlcv")
    _require_rows("ohlcv", ohlcv.height)
    onchain, macro = store.read("onchain"), store.read("macro")
    frame = compute_features(ohlcv, onchain, macro, cfg)
    series, onchain_symbols = macro_series_of(macro), onchain_symbols_of(onchain)
    chosen = select_model_columns(frame, cfg, series, onchain_symbols)
    for verdict in chosen.dropped:
        context.log.warning(verdict.message())
    version = cfg.version()
    files = lake.write_snapshot(
        "features",
        frame,
        time_column="ts",
        version=version,
        meta={
            "config": asdict(cfg),
            "model_columns": chosen.columns,
            # null for symbols without on-chain data: not a sign of warm-up
            "onchain_columns": chosen.onchain_columns,
            # carried values: null on up to max_missing_share of the bars after the warm-up
            "carried_columns": chosen.carried_columns,
            "max_missing_share": cfg.max_missing_share,
            "warmup_bars": cfg.warmup_bars,
            "macro_series": list(series),
            "onchain_symbols": onchain_symbols,
            "inputs": [v.to_json() for v in chosen.verdicts],
        },
    )
    store.refresh_lake_views(lake, ["features"])
    context.log.info(
        f"features: {frame.height} rows x {frame.width} columns in {len(files)} files; "
        f"{len(chosen.columns)} model columns, {len(chosen.dropped)} inputs dropped"
    )
    inputs = pl.DataFrame(
        [
            {
                "input": f"{v.source}:{v.name}",
                "kept": v.kept,
                "missing_share": v.missing_share,
                "last_carried": v.last_carried,
                "reason": "; ".join(v.reasons),
            }
            for v in chosen.verdicts
        ],
        schema={
            "input": pl.String,
            "kept": pl.Boolean,
            "missing_share": pl.Float64,
            "last_carried": pl.String,
            "reason": pl.String,
        },
    )
    return dg.MaterializeResult(
        metadata={
            **frame_summary(frame),
            **lake_table_result("features", frame),
            "feature_version": version,
            **uri(lake.version_dir("features", version)),
            "files": len(files),
            "model_columns": dg.MetadataValue.json(chosen.columns),
            "dropped_inputs": dg.MetadataValue.json(
                {v.name: "; ".join(v.reasons) for v in chosen.dropped}
            ),
            "inputs": table_md(inputs, rows=len(chosen.verdicts) or 1),
            "preview": table_md(frame.select(["symbol", "ts", *chosen.columns[:8]]).tail(5)),
        }
    )


@dg.asset(
    deps=[ohlcv_bars],
    group_name="features",
    pool=DUCKDB_POOL,  # refreshes its DuckDB view
    kinds={"polars", "parquet"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="Forward labels per (symbol, ts): log returns over 1/5/10/30/90 bars, "
    "3-class 90-bar direction, forward 30-bar realized volatility. The last h "
    "rows of each label are null.",
    metadata=lake_table_definition("labels", label_schema(LabelConfig())),
)
def labels(
    context: dg.AssetExecutionContext, config: LabelsConfig, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    cfg = config.to_ml()
    store, lake = warehouse.warehouse(), warehouse.lake()
    ohlcv = store.read("ohlcv")
    _require_rows("ohlcv", ohlcv.height)
    frame = compute_labels(ohlcv, cfg)
    version = cfg.version()
    files = lake.write_snapshot(
        "labels",
        frame,
        time_column="ts",
        version=version,
        meta={"config": asdict(cfg), "columns": label_columns(cfg)},
    )
    store.refresh_lake_views(lake, ["labels"])
    direction = f"direction_{cfg.direction_horizon}"
    counts = frame[direction].drop_nulls().value_counts().sort(direction)
    balance = {DIRECTION_CLASSES[int(k)]: int(v) for k, v in counts.iter_rows()}
    context.log.info(f"labels: {frame.height} rows, {direction} class counts {balance}")
    return dg.MaterializeResult(
        metadata={
            **frame_summary(frame),
            **lake_table_result("labels", frame),
            "label_version": version,
            **uri(lake.version_dir("labels", version)),
            "files": len(files),
            "direction_class_counts": dg.MetadataValue.json(balance),
            "null_counts": dg.MetadataValue.json(
                {
                    c: int(n)
                    for c, n in frame.select(label_columns(cfg))
                    .null_count()
                    .row(0, named=True)
                    .items()
                }
            ),
            "preview": table_md(frame.drop_nulls().tail(5)),
        }
    )
