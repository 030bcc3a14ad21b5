"""Print where a pipeline run left its results: `python -m pipelines.report [DATA_DIR]`."""

from __future__ import annotations

import os
import sys

import polars as pl

from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.artifacts import ArtifactError
from warehouse.paths import DEFAULT_DATA_DIR

pl.Config.set_tbl_hide_dataframe_shape(True)
pl.Config.set_tbl_rows(20)
pl.Config.set_float_precision(4)


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
        model = arts.latest("model", "holdout")
        mamba = arts.latest("mamba2", "holdout")
        evaluation = arts.latest("evaluation", "holdout")
        backtest = arts.latest("backtest", "holdout")
    except ArtifactError as exc:
        out.append(f"  {exc}")
        return "\n".join(out)
    out.append(f"  LightGBM model {model.version}: {model.path}")
    out.append(f"  Mamba2 model {mamba.version}: {mamba.path}")
    ev = pl.read_json(evaluation.file("metrics.json"))
    metrics = pl.DataFrame(ev["metrics"][0].to_list())
    out += [
        f"  evaluation {evaluation.version} on {ev['rows'][0]} out-of-sample test rows "
        "(90-bar direction):",
        _indent(str(metrics), 4),
    ]
    bt = pl.read_parquet(backtest.file("metrics.parquet")).select(
        ["symbol", "strategy", "total_return", "sharpe", "max_drawdown", "turnover_per_year"]
    )
    out += [
        f"  backtest {backtest.version} (test period, after costs):",
        _indent(str(bt), 4),
        f"  equity curves: {backtest.file('equity.png')}",
    ]
    out += ["", "Browse everything in the Dagster UI: make ui  (http://127.0.0.1:3000)"]
    return "\n".join(out)


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
