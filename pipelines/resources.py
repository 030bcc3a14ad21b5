"""Resources: where the data lives, and which source feeds each ingest asset."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.sources import Source, make_source
from warehouse.sources.synthetic import MACRO_SERIES, ONCHAIN_ASSETS, SYMBOLS


class WarehouseResource(dg.ConfigurableResource):
    """The data directory: DuckDB file, Parquet lake and artifact store."""

    data_dir: str = Field(description="Folder holding warehouse.duckdb, lake/ and artifacts/")
    lock_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a step waits for the DuckDB writer lock"
    )

    @property
    def paths(self) -> DataPaths:
        return DataPaths.at(self.data_dir)

    def warehouse(self) -> Warehouse:
        return Warehouse(self.paths, self.lock_timeout_s)

    def lake(self) -> Lake:
        return Lake(self.paths.lake)

    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.paths.artifacts)


class MarketSourcesResource(dg.ConfigurableResource):
    """Which connector feeds each raw table, and what it fetches. Synthetic is the default."""

    ohlcv_source: str = "synthetic"
    onchain_source: str = "synthetic"
    macro_source: str = "synthetic"
    symbols: list[str] = Field(default_factory=lambda: list(SYMBOLS))
    onchain_assets: list[str] = Field(default_factory=lambda: list(ONCHAIN_ASSETS))
    macro_series: list[str] = Field(default_factory=lambda: list(MACRO_SERIES))
    seed: int = Field(default=42, ge=0, description="Seed of the synthetic market")

    def source(self, table: str) -> Source:
        """The configured connector for `table`; raises SourceError on unknown names or symbols."""
        if table == "ohlcv":
            return make_source(
                "ohlcv", self.ohlcv_source, symbols=tuple(self.symbols), seed=self.seed
            )
        if table == "onchain":
            return make_source(
                "onchain", self.onchain_source, assets=tuple(self.onchain_assets), seed=self.seed
            )
        return make_source(
            "macro", self.macro_source, series=tuple(self.macro_series), seed=self.seed
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Fail at the start of the run, before any step writes, if the configuration is invalid.
        for table in ("ohlcv", "onchain", "macro"):
            self.source(table)
