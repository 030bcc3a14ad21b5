"""Time the whole graph the way `make demo` runs it: the real CLI, ten years, a fresh data dir.

    python benchmarks/pipeline.py [--range 2015-01-01...2024-12-31] [--out benchmarks/results/pipeline.json]

Prints per-step durations from the run's event log and a final JSON line with at least
`seconds`, `partitions` and `rows`. Target: the ten-year run in under 180 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--range", default="2015-01-01...2024-12-31")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mambacast-bench-"))
    home = work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "MAMBACAST_DATA_DIR": str(work),
        "DAGSTER_HOME": str(home),
        "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
    }
    subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "instance", "migrate"],
        env=env,
        check=True,
        capture_output=True,
    )
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        "*",
        "--partition-range",
        args.range,
    ]
    print(f"running: {' '.join(cmd)}\n  data dir {work}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")

    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    from pipelines.definitions import ALL_ASSETS
    from warehouse import DataPaths, Warehouse

    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        steps = {
            s.step_key: round(s.end_time - s.start_time, 2)
            for s in instance.get_run_step_stats(run.run_id)
            if s.end_time
        }
    wh = Warehouse(DataPaths.at(work))
    rows = {t: wh.count(t) for t in ("ohlcv", "onchain", "macro")}
    start, end = (date.fromisoformat(d) for d in args.range.split("..."))
    result = {
        "benchmark": "pipeline",
        "range": args.range,
        "partitions": (end - start).days + 1,
        "assets": len(ALL_ASSETS),
        "seconds": round(seconds, 1),
        "rows": sum(rows.values()),
        "rows_per_table": rows,
        "step_seconds": dict(sorted(steps.items(), key=lambda kv: -kv[1])),
        "target_seconds": 180,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    for step, s in result["step_seconds"].items():
        print(f"  {step:<40} {s:>8.2f} s")
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
