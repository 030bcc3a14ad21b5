"""Run the whole walk-forward graph from the command line, with a progress display:

    python -m pipelines.run demo                       # synthetic market, the data dir in use
    python -m pipelines.run evaluate --data ../shared/data [--stocks]

Two real `dagster asset materialize` runs against the instance in $DAGSTER_HOME (so every run
shows up in the UI): ingest + checks + features + labels + the training dataset over a range of
ingest (year) partitions; then every model, prediction and backtest asset over the walk-forward
folds the dataset supports, and the evaluation of every fold, in the same run. `evaluate` ingests the real files through the
file connectors into a data directory of its own and writes reports/evaluation.{json,html}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from warehouse import ArtifactStore, DataPaths, Lake

# the fold assets over the folds, then (unpartitioned) the evaluation of every fold and the
# newest model's latest forecast
FOLD_ASSETS = (
    "model,mamba_model,sequence_baselines,literature_baselines,predictions,backtest,evaluation,"
    "latest_forecast"
)
HEARTBEAT_S = 30  # seconds without progress after which a "still running" line is printed
# lines of the dagster CLI's log worth showing as progress
PROGRESS = re.compile(
    r"STEP_START|STEP_SUCCESS|STEP_FAILURE|RUN_FAILURE|fold \S+:|fold \S+ \S+ (seed|done)|"
    r"\[\d+/\d+\]|evaluation:|training_dataset "
)


def _materialize(
    select: str, log: Path, partition_range: str | None = None, config: dict | None = None
) -> None:
    """One `dagster asset materialize` run; its full output goes to `log`, progress to stdout."""
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        select,
    ]
    if partition_range:
        cmd += ["--partition-range", partition_range]
    if config:
        cmd += ["--config-json", json.dumps(config)]
    started = time.perf_counter()
    print(f"\n==> {select}" + (f" [{partition_range}]" if partition_range else ""), flush=True)
    last = [started]  # when progress was last shown
    done = threading.Event()

    def heartbeat() -> None:
        # long quiet stretches (Dagster recording thousands of partition events) still show life
        while not done.wait(5):
            if time.perf_counter() - last[0] >= HEARTBEAT_S:
                print(f"  {time.perf_counter() - started:6.0f}s  ... still running", flush=True)
                last[0] = time.perf_counter()

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if PROGRESS.search(line):
                msg = line.rstrip().split(" - ")[-1]
                print(f"  {time.perf_counter() - started:6.0f}s  {msg[:150]}", flush=True)
                last[0] = time.perf_counter()
        code = proc.wait()
    done.set()
    beat.join()
    if code != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"`{select}` failed (exit {code}); the end of {log}:\n" + "\n".join(tail))
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)


def _fold_range(data_dir: Path, first: str | None, last_n: int | None) -> str:
    meta = Lake(DataPaths.at(data_dir).lake).read_meta("training_dataset")
    keys = [f["key"] for f in meta["folds"]]
    if first:
        keys = [k for k in keys if k >= first] or keys[-1:]
    if last_n:
        keys = keys[-last_n:]
    return f"{keys[0]}...{keys[-1]}"


def run_graph(
    data_dir: Path,
    partition_range: str,
    sources: dict | None,
    sequence: dict,
    first_fold: str | None = None,
    last_folds: int | None = None,
    baselines: dict | None = None,
) -> Path:
    """The three runs; returns the evaluation artifact's folder."""
    log = data_dir / "run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = {"resources": {"sources": {"config": sources}}} if sources else None
    _materialize("*training_dataset", log, partition_range, config)
    folds = _fold_range(data_dir, first_fold, last_folds)
    fold_config = {
        "ops": {
            "mamba_model": {"config": sequence},
            "sequence_baselines": {"config": baselines or sequence},
            "literature_baselines": {"config": baselines or sequence},
        }
    }
    _materialize(FOLD_ASSETS, log, folds, fold_config)
    print(f"\nwhole graph in {time.perf_counter() - started:.0f} s; full log: {log}")
    return ArtifactStore(DataPaths.at(data_dir).artifacts).latest("evaluation", "walk_forward").path


def real_inputs(data: Path, data_dir: Path, stocks: bool) -> tuple[dict, str]:
    """Source config for the shared real files, and the range of ingest (year) partitions
    that holds the Bitcoin file's whole history."""
    btc = data / "btc_usd_daily_bitstamp.csv"
    for f in (btc, data / "btc_onchain_daily_coinmetrics.csv", data / "macro_fred_daily.csv"):
        if not f.is_file():
            raise SystemExit(f"{f} is missing: DATA must be the folder with the real CSV files")
    ohlcv, symbols = str(btc.resolve()), ["BTC-USD"]
    if stocks:
        # one tidy file with a symbol column, built in this run's own data directory
        frames = [
            pl.read_csv(btc).rename({"volume_btc": "volume"}).with_columns(symbol=pl.lit("BTC-USD"))
        ]
        for name, sym in (("SPY_daily_stooq.csv", "SPY"), ("AAPL_daily_stooq.csv", "AAPL")):
            frames.append(pl.read_csv(data / "stocks" / name).with_columns(symbol=pl.lit(sym)))
            symbols.append(sym)
        cols = ["symbol", "date", "open", "high", "low", "close", "volume"]
        path = data_dir / "inputs" / "ohlcv.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.concat(
            [f.select(cols).with_columns(pl.col("volume").cast(pl.Float64)) for f in frames]
        ).write_parquet(path)
        ohlcv = str(path)
    days = pl.read_csv(btc, columns=["date"])["date"]
    first, last = date.fromisoformat(days.min()), date.fromisoformat(days.max())
    sources = {
        # the file's last day may be incomplete: ingest up to the day before it
        "until": last.isoformat(),
        "ohlcv_source": "file",
        "ohlcv_path": ohlcv,
        "symbols": symbols,
        "onchain_source": "coinmetrics_csv",
        "onchain_path": str((data / "btc_onchain_daily_coinmetrics.csv").resolve()),
        "macro_source": "fred_file",
        "macro_path": str((data / "macro_fred_daily.csv").resolve()),
    }
    return sources, f"{first.year}...{(last - timedelta(days=1)).year}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the synthetic market, in the data directory in use")
    # sized for a few minutes on 2 cores: six years, the last two folds, Mamba2 with 3 seeds and
    # one seed of each sequence baseline (`make evaluate` runs every fold, 3 seeds each)
    demo.add_argument("--range", default="2019...2024", help="ingest (year) partitions")
    demo.add_argument("--last-folds", type=int, default=2)
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    demo.add_argument("--baseline-seeds", type=int, nargs="+", default=[0])
    ev = sub.add_parser("evaluate", help="the real files, in a data directory of their own")
    ev.add_argument("--data", required=True, help="folder with the real CSV files")
    ev.add_argument("--stocks", action="store_true", help="add SPY and AAPL beside BTC")
    ev.add_argument("--first-fold", default="2018")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ev.add_argument("--reports", default="reports")
    args = ap.parse_args()
    data_dir = Path(os.environ.get("MAMBACAST_DATA_DIR", "data")).resolve()
    sequence = {"seeds": args.seeds}
    if args.command == "demo":
        art = run_graph(
            data_dir,
            args.range,
            None,
            sequence,
            last_folds=args.last_folds,
            baselines={"seeds": args.baseline_seeds},
        )
        print(f"evaluation report: {art / 'evaluation.html'}")
        return
    sources, partition_range = real_inputs(Path(args.data), data_dir, args.stocks)
    art = run_graph(data_dir, partition_range, sources, sequence, first_fold=args.first_fold)
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    for f in art.iterdir():
        if f.suffix in (".json", ".html", ".png") and f.name != "manifest.json":
            shutil.copy2(f, reports / f.name)
    print(f"report: {reports / 'evaluation.html'} and {reports / 'evaluation.json'}")


if __name__ == "__main__":
    main()
