"""Without ../shared/data the real-file tests skip, and the run's summary says so in a banner."""

import os
import subprocess
import sys
from pathlib import Path


def test_without_the_real_files_the_summary_says_so_loudly(tmp_path):
    # run in a child pytest with the shared data pointed elsewhere: the skips are named in a
    # banner of their own, not only in the short skip list
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_shared_data.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "daily_bitstamp or hourly_bitstamp",
        ],
        cwd=root,
        env={**os.environ, "MAMBACAST_SHARED_DATA": str(tmp_path / "absent")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "REAL DATA NOT TESTED" in proc.stdout
    assert "2 tests on the real files were skipped" in proc.stdout
