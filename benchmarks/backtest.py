"""Backtest many parameter sets at once on ten years of seeded synthetic daily bars.

    python benchmarks/backtest.py [--bars 3650] [--param-sets 1000] [--repeat 3]
                                  [--out benchmarks/results/backtest.json]

Prices follow a random walk with slowly varying volatility; the direction probabilities carry a
little skill about the next bar and the sigma forecast is the true volatility with noise, all
from one seed. The grid crosses thresholds x long-only/long-short x holding periods (1, 5, 10,
30, 90) x vol targets (none, 0.1, 0.2, 0.3, 0.5) x two cost levels (10+5 bps, 0 bps).
`seconds` is `ml.backtest.run_grid` end to end (frame in; positions, costs, paths, metrics,
baselines, summary and deflated Sharpe out), the fastest of --repeat runs; `core_seconds` the
numpy part alone (`evaluate`). `loop_seconds_estimate` times `run_backtest` on a sample of the
sets one at a time and scales it to the whole grid; the sample's metrics must equal the grid's.
Prints a final JSON line. Target: seconds < 2 on 2 cores for 3,650 bars x 1,000 sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.backtest import (  # noqa: E402
    METRIC_COLUMNS,
    BacktestConfig,
    evaluate,
    parameter_grid,
    periods_per_year,
    run_backtest,
    run_grid,
)

TARGET_SECONDS = 2.0
SETS_PER_THRESHOLD = 100  # 2 sides x 5 holding periods x 5 vol targets x 2 cost levels


def synthetic_frame(n_bars: int, seed: int) -> pl.DataFrame:
    """One symbol's daily bars (every calendar day) with p_down, p_up and sigma forecasts."""
    rng = np.random.default_rng(seed)
    vol = 0.03 * np.exp(0.4 * np.sin(np.arange(n_bars) / 180.0) + rng.normal(0, 0.1, n_bars))
    ret = rng.normal(0.0003, 1.0, n_bars) * vol
    open_ = 100.0 * np.exp(np.cumsum(ret))
    close = open_ * np.exp(rng.normal(0, 0.005, n_bars))
    # skill: the score leans towards the sign of the next open-to-open move
    nxt = np.concatenate([ret[2:], [0.0, 0.0]]) / vol
    up = 1 / (1 + np.exp(-(0.08 * nxt + rng.normal(0, 1.0, n_bars))))
    return pl.DataFrame(
        {
            "symbol": "SYN-USD",
            "ts": [datetime(2015, 1, 1) + timedelta(days=i) for i in range(n_bars)],
            "open": open_,
            "close": close,
            "model_p_down": 0.8 * (1 - up),
            "model_p_up": 0.8 * up,
            "model_sigma": vol * np.exp(rng.normal(0, 0.2, n_bars)),
        }
    )


def grid_for(n_sets: int) -> pl.DataFrame:
    """The first n_sets of ceil(n_sets / 100) thresholds (the default 0.1 first, so the default
    set is in every grid; then 0, 0.02, ...) crossed with the other axes."""
    k = math.ceil(n_sets / SETS_PER_THRESHOLD)
    others = [round(0.02 * i, 2) for i in range(k + 1) if round(0.02 * i, 2) != 0.1]
    grid = parameter_grid(
        thresholds=[0.1, *others][:k],
        allow_short=(True, False),
        holding_periods=(1, 5, 10, 30, 90),
        vol_targets=(None, 0.1, 0.2, 0.3, 0.5),
        costs_bps=((10.0, 5.0), (0.0, 0.0)),
    )
    return grid.head(n_sets)


def best_of(repeat: int, fn, *args):
    """(fastest wall time over `repeat` calls, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=3650)
    ap.add_argument("--param-sets", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the fastest counts")
    ap.add_argument("--loop-sample", type=int, default=20, help="sets timed one at a time")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backtest.json"))
    args = ap.parse_args()

    frame = synthetic_frame(args.bars, args.seed)
    cfg = BacktestConfig()
    grid = grid_for(args.param_sets)
    ppy = periods_per_year(frame["ts"])

    seconds, result = best_of(args.repeat, run_grid, frame, grid, cfg)
    params = result.params.drop("is_default")
    core_seconds, _ = best_of(
        args.repeat,
        evaluate,
        frame["open"].to_numpy(),
        frame["model_p_down"].to_numpy(),
        frame["model_p_up"].to_numpy(),
        params,
        ppy,
        frame["model_sigma"].to_numpy(),
    )
    n_sets = params.height
    print(
        f"{n_sets:,} parameter sets x {args.bars:,} bars: run_grid {seconds:.3f} s "
        f"({n_sets / seconds:,.0f} backtests/s), numpy core {core_seconds:.3f} s",
        flush=True,
    )

    # the same sets one at a time, through run_backtest, on an evenly spread sample
    sample = params.gather(np.linspace(0, n_sets - 1, min(args.loop_sample, n_sets)).astype(int))
    t0 = time.perf_counter()
    alone = []
    for row in sample.iter_rows(named=True):
        row_cfg = BacktestConfig(**{k: v for k, v in row.items() if k != "param_id"})
        _, metrics = run_backtest(frame, row_cfg)
        alone.append(metrics.filter(pl.col("strategy") == "model").select(METRIC_COLUMNS))
    per_set = (time.perf_counter() - t0) / sample.height
    grid_rows = result.metrics.join(sample.select("param_id"), on="param_id", how="semi")
    diff = float(
        np.nanmax(np.abs(pl.concat(alone).to_numpy() - grid_rows.select(METRIC_COLUMNS).to_numpy()))
    )
    print(
        f"one set at a time: {per_set * 1e3:.1f} ms per set, ~{per_set * n_sets:.1f} s for the "
        f"grid; max |grid - alone| over {sample.height} sets = {diff:.2e}",
        flush=True,
    )
    summary = result.summary.row(0, named=True)
    print(
        f"default ({summary['default_params']}): Sharpe {summary['default_sharpe']:.2f}; "
        f"best of {summary['n_trials']} at the default costs ({summary['best_params']}): "
        f"Sharpe {summary['best_sharpe']:.2f}, expected max by luck "
        f"{summary['expected_max_sharpe']:.2f}, deflated Sharpe {summary['best_deflated_sharpe']:.3f}",
        flush=True,
    )

    out = {
        "bars": args.bars,
        "param_sets": n_sets,
        "seconds": round(seconds, 4),
        "backtests_per_s": round(n_sets / seconds, 1),
        "core_seconds": round(core_seconds, 4),
        "loop_seconds_estimate": round(per_set * n_sets, 3),
        "speedup_vs_loop": round(per_set * n_sets / seconds, 1),
        "max_abs_diff_grid_vs_alone": diff,
        "repeat": args.repeat,
        "cores": os.cpu_count(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "target_seconds": TARGET_SECONDS,
        "target_met": seconds < TARGET_SECONDS,
        "default_sharpe": round(summary["default_sharpe"], 4),
        "best_sharpe": round(summary["best_sharpe"], 4),
        "n_trials": summary["n_trials"],
        "best_deflated_sharpe": round(summary["best_deflated_sharpe"], 4),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
