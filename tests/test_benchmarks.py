"""The benchmark scripts run end to end on small inputs and report what their issues ask for:
figures on stdout, the same JSON as the last stdout line and in the results file."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(script: str, out: Path, *args: str, timeout: int = 300) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    return last


def test_features_benchmark_small_run(tmp_path):
    last = _run_benchmark(
        "features.py",
        tmp_path / "features.json",
        "--rows",
        "20000",
        "--repeat",
        "1",
        "--no-shared-data",
    )
    assert last["rows"] == 20_000
    for key in ("polars_s", "pandas_ta_s", "speedup", "speedup_shared"):
        assert last[key] > 0, key
    assert last["indicators_compared"] == 19

    # the polars indicators equal pandas-ta-classic's on the benchmark's own bars
    assert last["max_rel_diff_vs_pandas_ta"] < 1e-9
    assert last["max_rel_diff_shared_vs_pandas_ta"] < 1e-9


def test_backtest_benchmark_small_run(tmp_path):
    last = _run_benchmark(
        "backtest.py",
        tmp_path / "backtest.json",
        "--bars",
        "400",
        "--param-sets",
        "150",
        "--repeat",
        "1",
        "--loop-sample",
        "3",
        timeout=120,
    )
    assert (last["bars"], last["param_sets"]) == (400, 150)
    assert last["seconds"] > 0 and last["backtests_per_s"] > 0
    assert last["cores"] >= 1 and isinstance(last["target_met"], bool)
    assert last["max_abs_diff_grid_vs_alone"] < 1e-12
    assert 0 <= last["best_deflated_sharpe"] <= 1
