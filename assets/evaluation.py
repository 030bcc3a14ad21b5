"""The evaluation: every fold's out-of-sample test rows stitched together, every target scored
for every forecaster on the same rows, with significance, plots and a self-contained report.

The evaluation stack (scipy, arch, statsmodels, matplotlib) is imported inside the asset, so
loading the definitions stays fast.
"""

import dagster as dg
import polars as pl

from assets.backtest import TRADED, BacktestSettings, backtest, backtest_grid
from assets.metadata import png_md, table_md, uri
from assets.partitions import SINGLE_RUN
from assets.resources import DUCKDB_POOL, WarehouseResource
from assets.training import KEEP_VERSIONS, _targets, predictions
from warehouse.artifacts import ArtifactError, content_version

PARTITION = "walk_forward"  # the artifact partition of the evaluation over all folds


class EvaluationSettings(dg.Config):
    n_boot: int = 1000  # block-bootstrap resamples per comparison
    mcs_reps: int = 1000  # Model Confidence Set bootstrap replications
    backtest: BacktestSettings = BacktestSettings()  # the stitched walk-forward backtest


def stitched_predictions(warehouse: WarehouseResource, log) -> tuple[pl.DataFrame, list, dict]:
    """The latest predictions artifact of every fold of the current dataset (test rows only),
    the fold keys found, and the dataset meta. Folds not materialized are listed in the log."""
    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    parts, found, missing = [], [], []
    for fold in meta["folds"]:
        try:
            art = store.latest("predictions", fold["key"])
        except ArtifactError:
            missing.append(fold["key"])
            continue
        if art.manifest["metadata"]["data_version"] != meta["version"]:
            missing.append(fold["key"])
            continue
        found.append((fold["key"], art.version))
        parts.append(
            pl.read_parquet(art.file("predictions.parquet")).filter(pl.col("split") == "test")
        )
    if missing:
        log(f"evaluation: folds {missing} have no predictions for the current dataset; left out")
    if not parts:
        raise dg.Failure(
            "No fold has predictions for the current training dataset: materialize "
            "model, mamba_model, sequence_baselines, literature_baselines and predictions for "
            "its folds "
            f"({[f['key'] for f in meta['folds']]}) first."
        )
    return pl.concat(parts, how="vertical_relaxed"), found, meta


def model_parameters(warehouse: WarehouseResource, found: list) -> dict[str, dict]:
    """Per neural model: its trainable parameter count (the same in every fold: the widths are
    matched to Mamba2's once per input width), from the artifacts the predictions were built
    from, with the range over folds if they differ."""
    store = warehouse.artifacts()
    counts: dict[str, set[int]] = {}
    for fold, version in found:
        sources = store.get("predictions", fold, version).manifest["metadata"].get("sources", {})
        for kind, source in sources.items():
            n = store.get(kind, fold, source).manifest["metadata"].get("parameters")
            if isinstance(n, int):
                counts.setdefault(kind, set()).add(n)
    return {k: {"min": min(v), "max": max(v)} for k, v in sorted(counts.items())}


@dg.asset(
    deps=[predictions, backtest],
    group_name="evaluation",
    pool=DUCKDB_POOL,  # refreshes its DuckDB view
    kinds={"polars", "matplotlib"},
    code_version="3",
    backfill_policy=SINGLE_RUN,
    description="Every fold's test rows: each target (direction, p10/p90, sigma, returns at "
    "1/5/10/30 bars) scored for every forecaster on the same rows, models against every "
    "baseline (Diebold-Mariano with HAC lags, block-bootstrap intervals within symbols, the 90% "
    "Model Confidence Set, a non-overlapping subsample), the stitched walk-forward backtest, "
    "plots and an HTML report.",
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    from ml.backtest import BACKTEST_CODE_VERSION, run_backtest, run_grid
    from ml.evaluation import EVALUATION_CODE_VERSION, MODELS, evaluate, metric_table
    from ml.report import REPORT_CODE_VERSION, build_figures, write_report
    from ml.walkforward_run import backtest_frame

    lake, store = warehouse.lake(), warehouse.artifacts()
    long, found, meta = stitched_predictions(warehouse, context.log.info)
    targets = _targets(meta)
    data = lake.read("training_dataset")
    labels = data.select(["symbol", "ts", *targets.label_columns()])
    results = evaluate(
        long, labels, targets, n_boot=config.n_boot, mcs_reps=config.mcs_reps, log=context.log.info
    )
    results["parameters"] = model_parameters(warehouse, found)
    cfg = config.backtest.to_ml()
    traded = tuple(n for n in TRADED if n in set(long["forecaster"]))
    frame = backtest_frame(
        long, data.select(["symbol", "ts", "open", "close", "log_ret_90"]), traded
    )
    paths, bt_metrics = run_backtest(frame, cfg, forecasters=traded)
    grid = run_grid(frame, backtest_grid(cfg), cfg, forecasters=traded)
    results["backtest"] = {
        "config": dict(cfg.__dict__),
        "metrics": bt_metrics.to_dicts(),
        "grid_summary": grid.summary.to_dicts(),
    }
    scored = long.join(labels, on=["symbol", "ts"], how="left")
    figures = build_figures(results, scored, paths, targets)
    version = content_version(
        "evaluation",
        EVALUATION_CODE_VERSION,
        BACKTEST_CODE_VERSION,
        REPORT_CODE_VERSION,
        found,
        config.model_dump(),
    )
    art = store.write(
        "evaluation",
        PARTITION,
        version,
        lambda folder: write_report(
            folder, results, figures, bt_metrics, "Mambacast walk-forward evaluation"
        ),
        {
            "folds": [k for k, _ in found],
            "predictions": dict(found),
            "data_version": meta["version"],
        },
    )
    # every fold's out-of-sample rows in one queryable lake table (DuckDB view lake_predictions)
    lake.write_snapshot(
        "predictions",
        long,
        time_column="ts",
        version=content_version("predictions_oos", found),
        keep_versions=KEEP_VERSIONS,
        meta={"folds": dict(found), "data_version": meta["version"]},
    )
    warehouse.warehouse().refresh_lake_views(lake, ["predictions"])
    direction = f"direction_{targets.direction_horizon}"
    headline = {}
    for m in MODELS:
        r = results["targets"][direction].get("metrics", {}).get(m)
        if r:
            headline[f"{m}_{direction}_log_loss"] = float(r["log_loss"])
    md = {
        "folds": dg.MetadataValue.json([k for k, _ in found]),
        "test_rows": results["test_rows"],
        **uri(art.path),
        "report": dg.MetadataValue.path(str(art.path / "evaluation.html")),
        "evaluation_version": version,
        **headline,
    }
    for name in results["targets"]:
        table = metric_table(results, name)
        if table.height:
            md[f"metrics_{name}"] = table_md(table, rows=40)
    md["backtest"] = table_md(
        bt_metrics.select(["symbol", "strategy", "total_return", "cagr", "sharpe", "max_drawdown"]),
        rows=60,
    )
    for name, fig in figures.items():
        md[f"plot_{name}"] = png_md(fig, name)
    context.log.info(f"evaluation {version}: {results['test_rows']} test rows, folds {found}")
    return dg.MaterializeResult(metadata=md)
