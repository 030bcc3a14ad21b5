"""Time the pipeline the way users run it: the real CLI, fresh data directories.

    python benchmarks/pipeline.py [--data ../shared/data] [--skip-demo]
                                  [--out benchmarks/results/pipeline.json]

1. The full-history backfill of the three ingest assets (and their quality checks) in one
   `dagster asset materialize` run over every ingest partition, 1960 to the data's last year:
   the real Bitcoin, Coin Metrics and FRED files in --data when they are there, else the
   synthetic market. Target: under 15 s of wall time on 2 cores (`backfill_seconds`, the CLI
   from start to exit; `backfill_run_seconds` is the run itself, from its start event to its
   end event).
2. `make demo`'s graph (`python -m pipelines.run demo`): target under 180 s (`demo_seconds`).
3. Step start under the forked executor: one ingest year of the synthetic market (three ingest
   steps and their checks) with the default multiprocess executor, whose forkserver preloads the
   project; for each step the seconds from its worker starting to the step starting
   (`step_start`: median and max; the first step also waits for the forkserver to import the
   project). Preloading is what keeps the others short.

Prints per-step durations from the runs' event logs and a final JSON line with the figures.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKFILL_TARGET_S = 15
DEMO_TARGET_S = 180


def _instance(work: Path) -> dict[str, str]:
    home = work / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "MAMBACAST_DATA_DIR": str(work),
        "DAGSTER_HOME": str(home),
        "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS": "true",
    }
    dagster = Path(sys.executable).parent / "dagster"
    subprocess.run([str(dagster), "instance", "migrate"], env=env, check=True, capture_output=True)
    return env


def _runs(home: str) -> list[dict]:
    """Each run's wall time (start to end event) and step durations, oldest first."""
    code = (
        "import json, dagster as dg\n"
        "from dagster import DagsterEventType as T\n"
        "with dg.DagsterInstance.get() as inst:\n"
        "    out = []\n"
        "    for run in reversed(inst.get_runs()):\n"
        "        ev = {e.dagster_event_type: e.timestamp for e in inst.all_logs(run.run_id)\n"
        "              if e.dagster_event_type in (T.RUN_START, T.RUN_SUCCESS, T.RUN_FAILURE)}\n"
        "        end = ev.get(T.RUN_SUCCESS, ev.get(T.RUN_FAILURE))\n"
        "        steps = {s.step_key: round(s.end_time - s.start_time, 2)\n"
        "                 for s in inst.get_run_step_stats(run.run_id) if s.end_time}\n"
        "        out.append({'status': run.status.value,\n"
        "                    'seconds': round(end - ev[T.RUN_START], 1) if end else None,\n"
        "                    'steps': dict(sorted(steps.items(), key=lambda kv: -kv[1]))})\n"
        "    print(json.dumps(out))\n"
    )
    env = {**os.environ, "DAGSTER_HOME": home}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _timed(cmd: list[str], env: dict[str, str], what: str) -> float:
    """Run `cmd` from the project root; its wall seconds, or exit with its output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds


def backfill(data: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mambacast-backfill-"))
    env = _instance(work)
    sys.path.insert(0, str(ROOT))
    from pipelines.run import real_inputs

    if data is not None:
        sources, years = real_inputs(data, work, stocks=False)
        last_year = years.split("...")[1]
        what = f"real files in {data}"
    else:
        sources, last_year, what = {}, str(time.gmtime().tm_year), "synthetic market"
    partition_range = f"1960...{last_year}"
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        "group:ingest",
        "--partition-range",
        partition_range,
    ]
    # in the run's own process, as the docs tell users to backfill (pipelines.defs.schedules
    # IN_PROCESS): no forkserver, no process per step
    config = {"execution": {"config": {"in_process": True}}}
    if sources:
        config["resources"] = {"sources": {"config": sources}}
    cmd += ["--config-json", json.dumps(config)]
    print(f"backfill: {' '.join(cmd[:9])} ({what})", flush=True)
    seconds = _timed(cmd, env, "backfill")
    (run,) = _runs(env["DAGSTER_HOME"])
    counts = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from warehouse import DataPaths, Warehouse; "
            f"w = Warehouse(DataPaths.at({str(work)!r})); "
            "print(json.dumps({t: w.count(t) for t in ('ohlcv', 'onchain', 'macro')}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "input": what,
        "partition_range": partition_range,
        "partitions": int(last_year) - 1960 + 1,
        "executor": "in_process",
        "seconds": round(seconds, 1),
        "run_seconds": run["seconds"],
        "rows_per_table": json.loads(counts.stdout),
        "step_seconds": run["steps"],
    }


def step_start() -> dict:
    """Seconds from STEP_WORKER_STARTING to STEP_START per step of a forked-executor run."""
    work = Path(tempfile.mkdtemp(prefix="mambacast-steps-"))
    env = _instance(work)
    dagster = str(Path(sys.executable).parent / "dagster")
    cmd = [dagster, "asset", "materialize", "-m", "pipelines.definitions"]
    cmd += ["--select", "group:ingest", "--partition", "2024"]
    print(f"step start: {' '.join(cmd[1:])} (forked steps)", flush=True)
    seconds = _timed(cmd, env, "step start run")
    code = (
        "import json, dagster as dg\n"
        "from dagster import DagsterEventType as T\n"
        "with dg.DagsterInstance.get() as inst:\n"
        "    (run,) = inst.get_runs()\n"
        "    ev = {}\n"
        "    for e in inst.all_logs(run.run_id):\n"
        "        if e.dagster_event_type in (T.STEP_WORKER_STARTING, T.STEP_START):\n"
        "            ev.setdefault(e.step_key, {})[e.dagster_event_type.value] = e.timestamp\n"
        "    print(json.dumps({k: round(v['STEP_START'] - v['STEP_WORKER_STARTING'], 3)\n"
        "                      for k, v in ev.items() if len(v) == 2}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    shutil.rmtree(work, ignore_errors=True)
    starts = json.loads(proc.stdout.strip().splitlines()[-1])
    values = sorted(starts.values())
    return {
        "seconds": round(seconds, 1),
        "steps": len(values),
        "median_seconds": values[len(values) // 2],
        "max_seconds": values[-1],
        "per_step": dict(sorted(starts.items())),
    }


def demo() -> dict:
    work = Path(tempfile.mkdtemp(prefix="mambacast-demo-"))
    env = _instance(work)
    cmd = [sys.executable, "-m", "pipelines.run", "demo"]
    print(f"demo: {' '.join(cmd)} (data dir {work})", flush=True)
    seconds = _timed(cmd, env, "demo")
    runs = _runs(env["DAGSTER_HOME"])
    shutil.rmtree(work, ignore_errors=True)
    steps: dict[str, float] = {}
    for r in runs:
        steps.update(r["steps"])
    return {
        "seconds": round(seconds, 1),
        "run_seconds": [r["seconds"] for r in runs],
        "step_seconds": dict(sorted(steps.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument(
        "--only-step-start",
        action="store_true",
        help="measure step start only (and write it alone to --out)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = ap.parse_args()
    data = Path(args.data).resolve()
    has_data = (data / "btc_usd_daily_bitstamp.csv").is_file()
    result: dict = {"benchmark": "pipeline"}
    result["step_start"] = step_start()
    print(
        f"  step start: median {result['step_start']['median_seconds']} s, max "
        f"{result['step_start']['max_seconds']} s over {result['step_start']['steps']} steps"
    )
    if args.only_step_start:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    result["backfill"] = backfill(data if has_data else None)
    print(
        f"  backfill in {result['backfill']['seconds']} s (run {result['backfill']['run_seconds']} s)"
    )
    for step, s in result["backfill"]["step_seconds"].items():
        print(f"    {step:<40} {s:>8.2f} s")
    if not args.skip_demo:
        result["demo"] = demo()
        print(f"  demo in {result['demo']['seconds']} s")
        for step, s in result["demo"]["step_seconds"].items():
            print(f"    {step:<40} {s:>8.2f} s")
    result |= {
        "backfill_seconds": result["backfill"]["seconds"],
        "backfill_target_seconds": BACKFILL_TARGET_S,
        "demo_seconds": result.get("demo", {}).get("seconds"),
        "demo_target_seconds": DEMO_TARGET_S,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
