"""Ingest N synthetic 1-minute bars through the asset's code path, then ingest them again.

    python benchmarks/ingest.py [--rows 5000000] [--out benchmarks/results/ingest.json]

The timed path is what the `ohlcv_bars` asset does after fetching (`assets.ingest.publish`):
validate the frame against the declared schema, then in one transaction delete the window,
insert the minute bars, rebuild the hourly and daily bars from them, refuse a write that loses
stored keys, and audit the staged state (the daily table's blocking suite, the minute bars'
consistency) before the commit. A third run writes the same bars without the guard and the
audit (`Warehouse.replace_bars` alone), so the write-audit-publish overhead is measured in the
same run. Fetching (generating) the bars is timed apart. Prints a final JSON line with `rows`,
`seconds`, `rows_per_s` and `rerun_rows_added`.
Targets: rows_per_s >= 1,000,000 on 2 cores; rerun_rows_added == 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.ingest import publish  # noqa: E402
from warehouse import DataPaths, Warehouse  # noqa: E402
from warehouse.sources import make_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    args = ap.parse_args()

    days = -(-args.rows // 1440)  # whole UTC days, as daily partitions are
    start = datetime(2015, 1, 1)
    end = start + timedelta(days=days)
    source = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1m")
    t0 = time.perf_counter()
    bars = source.fetch(start, end)
    fetch_s = time.perf_counter() - t0
    print(
        f"generated {bars.height:,} minute bars ({start:%Y-%m-%d} .. {end:%Y-%m-%d}) "
        f"in {fetch_s:.2f} s",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="mambacast-ingest-"))
    try:
        wh = Warehouse(DataPaths.at(work))
        wh.count("ohlcv")  # create the schema outside the timing
        runs = []
        for label in ("first", "rerun", "rerun_unaudited"):
            before = wh.count("ohlcv_1m")
            t0 = time.perf_counter()
            if label == "rerun_unaudited":
                results = wh.replace_bars(
                    "1m", bars, start, end, source.entities, source.name, allow_shrink=True
                )
            else:
                results = publish(wh, "ohlcv", "1m", bars, (start, end), source, (start, end))
            seconds = time.perf_counter() - t0
            after = wh.count("ohlcv_1m")
            runs.append(
                {
                    "run": label,
                    "seconds": round(seconds, 3),
                    "rows_per_s": round(bars.height / seconds),
                    "rows_added": after - before,
                    "tables": {r.table: r.rows_after for r in results},
                }
            )
            print(
                f"{label}: {seconds:.2f} s, {bars.height / seconds:,.0f} rows/s, "
                f"rows added {after - before:,}, tables {runs[-1]['tables']}",
                flush=True,
            )
        db_mb = (work / "warehouse.duckdb").stat().st_size / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first, rerun, bare = runs
    result = {
        "benchmark": "ingest",
        "rows": bars.height,
        "seconds": first["seconds"],
        "rows_per_s": first["rows_per_s"],
        "rerun_seconds": rerun["seconds"],
        "rerun_rows_per_s": rerun["rows_per_s"],
        "rerun_rows_added": rerun["rows_added"],
        "rerun_unaudited_seconds": bare["seconds"],
        "audit_overhead_ratio": round(rerun["seconds"] / bare["seconds"], 2),
        "fetch_seconds": round(fetch_s, 3),
        "derived_rows": {k: v for k, v in first["tables"].items() if k != "ohlcv_1m"},
        "duckdb_mb": round(db_mb, 1),
        "targets": {"rows_per_s": 1_000_000, "rerun_rows_added": 0},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
