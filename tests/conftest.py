from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from warehouse import DataPaths, Warehouse
from warehouse.sources import make_source

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    return DataPaths.at(tmp_path / "data")


@pytest.fixture
def warehouse(paths: DataPaths) -> Warehouse:
    return Warehouse(paths, lock_timeout_s=60)


@pytest.fixture(scope="session")
def synthetic_ohlcv() -> pl.DataFrame:
    """Six years of the default synthetic market, all symbols."""
    return make_source("ohlcv", "synthetic").fetch(datetime(2016, 1, 1), datetime(2022, 1, 1))


@pytest.fixture(scope="session")
def synthetic_onchain() -> pl.DataFrame:
    return make_source("onchain", "synthetic").fetch(datetime(2016, 1, 1), datetime(2022, 1, 1))


@pytest.fixture(scope="session")
def synthetic_macro() -> pl.DataFrame:
    return make_source("macro", "synthetic").fetch(datetime(2015, 10, 1), datetime(2022, 1, 1))
