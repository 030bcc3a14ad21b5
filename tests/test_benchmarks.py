"""The feature benchmark runs end to end on a small input and reports what the issue asks for."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_features_benchmark_small_run(tmp_path):
    out = tmp_path / "features.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "features.py"),
            "--rows",
            "20000",
            "--repeat",
            "1",
            "--no-shared-data",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["rows"] == 20_000
    for key in ("polars_s", "pandas_ta_s", "speedup", "speedup_shared"):
        assert last[key] > 0, key
    assert last["indicators_compared"] == 19
    # the polars indicators equal pandas-ta-classic's on the benchmark's own bars
    assert last["max_rel_diff_vs_pandas_ta"] < 1e-9
    assert last["max_rel_diff_shared_vs_pandas_ta"] < 1e-9
