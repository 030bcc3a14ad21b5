"""Print where a pipeline run left its results: `python -m pipelines.report [DATA_DIR]`."""

from __future__ import annotations

import json
import os
import sys

import polars as pl

from ml.evaluation import metric_table
from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.artifacts import ArtifactError
from warehouse.paths import DEFAULT_DATA_DIR

pl.Config.set_tbl_hide_dataframe_shape(True)
pl.Config.set_tbl_rows(20)
pl.Config.set_float_precision(4)
pl.Config.set_tbl_cols(12)

# the targets and metrics the summary prints (the HTML report has them all)
HEADLINE = {
    "direction_90": ["log_loss", "brier", "balanced_accuracy"],
    "quantiles_90": ["loss", "coverage", "coverage_ci95_low", "coverage_ci95_high", "winkler"],
    "sigma_30": ["qlike", "mz_r2"],
    "returns_30": ["mae", "rank_ic", "hit_rate"],
}


def report(data_dir: str) -> str:
    paths = DataPaths.at(data_dir)
    if not paths.duckdb_file.exists():
        return f"No warehouse at {paths.duckdb_file}: run `make demo` first."
    out = [f"Data directory: {paths.root}", "", f"Warehouse (DuckDB): {paths.duckdb_file}"]
    store = Warehouse(paths)
    for table in ("ohlcv", "onchain", "macro"):
        out.append(f"  {table}:\n{_indent(str(store.summary(table)))}")
    lake = Lake(paths.lake)
    out += ["", f"Parquet lake: {paths.lake}  (DuckDB views lake_<table> in the warehouse)"]
    for name in ("features", "labels", "training_dataset", "predictions"):
        if lake.exists(name):
            out.append(
                f"  {name:<17} {len(lake.files(name)):>3} files  {lake.version_dir(name)}"
                f"  ({len(lake.versions(name))} version(s) stored)"
            )
    arts = ArtifactStore(paths.artifacts)
    out += ["", f"Artifacts: {paths.artifacts}"]
    try:
        evaluation = arts.latest("evaluation", "walk_forward")
    except ArtifactError as exc:
        out.append(f"  {exc}")
        return "\n".join(out)
    results = json.loads(evaluation.file("evaluation.json").read_text())
    out.append(
        f"  evaluation {evaluation.version}: folds {', '.join(results['folds'])}, "
        f"{results['test_rows']} out-of-sample test rows ({', '.join(results['symbols'])})"
    )
    for name, columns in HEADLINE.items():
        table = metric_table(results, name, columns)
        if table.height:
            r = results["targets"][name]
            out += [
                f"  {name} on {r['rows']} rows {r['period'][0]}..{r['period'][1]} "
                "(sorted by loss; in_mcs_90: in the 90% Model Confidence Set):",
                _indent(str(table.select(["forecaster", *columns, "in_mcs_90"])), 4),
            ]
    out += _latest_forecast(store)
    bt = pl.DataFrame(results["backtest"]["metrics"]).select(
        ["symbol", "strategy", "total_return", "sharpe", "max_drawdown", "turnover_per_year"]
    )
    out += [
        "  walk-forward backtest (every fold's test window, after costs):",
        _indent(str(bt), 4),
        f"  report with plots: {evaluation.file('evaluation.html')}",
        "",
        "Browse everything in the Dagster UI: make ui  (http://127.0.0.1:3000)",
    ]
    return "\n".join(out)


def _latest_forecast(store: Warehouse) -> list[str]:
    """The newest forecast per symbol in the forecasts table (what latest_forecast wrote)."""
    rows = store.read("forecasts")
    if rows.is_empty():
        return []
    # the model version written last, each symbol's newest bar
    version = rows.sort("created_at")["model_version"][-1]
    mine = rows.filter(pl.col("model_version") == version)
    latest = mine.filter(pl.col("as_of") == pl.col("as_of").max().over("symbol"))
    h, w = int(latest["direction_horizon"][0]), int(latest["sigma_window"][0])
    return [
        f"  latest forecast ({latest['model'][0]} {latest['model_version'][0]}, fold "
        f"{latest['fold'][0]}; direction and q10/q90 over {h} bars, sigma over {w}):",
        _indent(
            str(
                latest.select(
                    "symbol",
                    pl.col("as_of").dt.date(),
                    "p_down",
                    "p_flat",
                    "p_up",
                    "q10",
                    "q90",
                    "sigma",
                    *[c for c in ("ret_1", "ret_30") if latest[c].is_not_null().any()],
                ).sort("symbol")
            ),
            4,
        ),
    ]


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


if __name__ == "__main__":
    print(
        report(
            sys.argv[1]
            if len(sys.argv) > 1
            else os.environ.get("MAMBACAST_DATA_DIR", DEFAULT_DATA_DIR)
        )
    )
