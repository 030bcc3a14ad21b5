"""The one place that knows where Mambacast keeps its data on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = "data"


@dataclass(frozen=True)
class DataPaths:
    """Every storage location derives from one data directory.

    data/
      warehouse.duckdb        raw tables (ohlcv, onchain, macro) and views over the lake
      warehouse.duckdb.lock   serializes writers across processes
      lake/<table>/...        Parquet, hive layout
      artifacts/<kind>/...    immutable versioned model and backtest outputs
      forecast_state/         the recurrent states latest_forecast carries from day to day
      dagster_home/           the Dagster instance (runs, event log) the UI reads
    """

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> DataPaths:
        return cls(Path(root).expanduser().resolve())

    @property
    def duckdb_file(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def lock_file(self) -> Path:
        return self.root / "warehouse.duckdb.lock"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def forecast_state(self) -> Path:
        return self.root / "forecast_state"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"
