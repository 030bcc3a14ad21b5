"""The command-line runner behind `make demo` and `make evaluate`: its inputs and fold range."""

from datetime import datetime

import polars as pl
import pytest

from pipelines.run import _fold_range, real_inputs
from tests.conftest import NO_SHARED_DATA, SHARED_DATA
from warehouse import DataPaths, Lake


def _dataset_with_folds(root, keys):
    lake = Lake(DataPaths.at(root).lake)
    frame = pl.DataFrame({"symbol": ["A"], "ts": [datetime(2020, 1, 1)]})
    lake.write_snapshot(
        "training_dataset",
        frame,
        time_column="ts",
        version="v1",
        meta={"folds": [{"key": k} for k in keys]},
    )


def test_the_fold_range_follows_the_datasets_folds(tmp_path):
    _dataset_with_folds(tmp_path, ["2017", "2018", "2019", "2020"])
    assert _fold_range(tmp_path, None, None) == "2017...2020"
    assert _fold_range(tmp_path, "2019", None) == "2019...2020"
    assert _fold_range(tmp_path, None, 2) == "2019...2020"
    # a first fold after every fold of the data still evaluates the last one
    assert _fold_range(tmp_path, "2030", None) == "2020...2020"


def test_a_data_folder_without_the_real_files_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="btc_usd_daily_bitstamp.csv is missing"):
        real_inputs(tmp_path, tmp_path / "data", stocks=False)


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_SHARED_DATA)
def test_real_inputs_point_the_file_connectors_at_the_shared_files(tmp_path):
    sources, days = real_inputs(SHARED_DATA, tmp_path, stocks=False)
    assert sources["ohlcv_source"] == "file" and sources["symbols"] == ["BTC-USD"]
    assert sources["onchain_source"] == "coinmetrics_csv"
    assert sources["macro_source"] == "fred_file"
    assert days == "2011...2025"  # Bitstamp's whole history, from 2011-08-18
    assert sources["until"] == "2025-06-30"  # the file's last, maybe incomplete, day is left out
    sources, _ = real_inputs(SHARED_DATA, tmp_path, stocks=True)
    bars = pl.read_parquet(sources["ohlcv_path"])
    assert sorted(bars["symbol"].unique()) == ["AAPL", "BTC-USD", "SPY"]
    assert str(tmp_path) in sources["ohlcv_path"]  # built in the run's own data directory
