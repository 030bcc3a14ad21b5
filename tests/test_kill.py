"""A writer killed in the middle of its transaction leaves the previous data intact."""

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from warehouse import DataPaths, Warehouse
from warehouse.sources import make_source

START = datetime(2021, 3, 1)
END = START + timedelta(days=10)

# The child replaces the same window with doubled prices, but stops for good right after its
# DELETE has run inside the open transaction, and tells the parent so through a marker file.
CHILD = """
import sys, time
from pathlib import Path
from datetime import datetime, timedelta
import polars as pl
import warehouse.store as store
from warehouse import DataPaths, Warehouse
from warehouse.sources import make_source

root, marker = sys.argv[1], Path(sys.argv[2])
real_delete = store._delete_window

def delete_then_hang(*args, **kwargs):
    n = real_delete(*args, **kwargs)
    marker.write_text(str(n))
    time.sleep(600)
    return n

store._delete_window = delete_then_hang
start = datetime(2021, 3, 1)
end = start + timedelta(days=10)
src = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1m")
bars = src.fetch(start, end).with_columns(pl.col(["open", "high", "low", "close"]) * 2)
Warehouse(DataPaths.at(root)).replace_bars("1m", bars, start, end, src.entities)
"""


def _snapshot(wh: Warehouse) -> dict[str, pl.DataFrame]:
    return {t: wh.read(t) for t in ("ohlcv_1m", "ohlcv_1h", "ohlcv")}


def test_killing_a_writer_mid_transaction_keeps_the_previous_rows(tmp_path: Path):
    root = tmp_path / "data"
    wh = Warehouse(DataPaths.at(root), lock_timeout_s=60)
    src = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1m")
    wh.replace_bars("1m", src.fetch(START, END), START, END, src.entities)
    before = _snapshot(wh)
    assert before["ohlcv_1m"].height == 14400

    marker = tmp_path / "deleted"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(marker)],
        cwd=Path(__file__).resolve().parents[1],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()
            assert time.time() < deadline, "the child never reached its DELETE"
            time.sleep(0.05)
        assert marker.read_text() == "14400"  # the child had deleted the window, uncommitted
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    # the lock died with the process; the database recovers to the last committed state
    after = _snapshot(Warehouse(DataPaths.at(root), lock_timeout_s=10))
    for table, frame in before.items():
        assert after[table].equals(frame), table
