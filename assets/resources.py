"""Resources: where the data lives, and which source feeds each ingest asset."""

from __future__ import annotations

from datetime import UTC, date, datetime

import dagster as dg
from pydantic import Field

from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.sources import Source, make_source
from warehouse.sources.base import accepted_options, check_safe_entities
from warehouse.sources.synthetic import MACRO_SERIES, ONCHAIN_ASSETS, SYMBOLS

# DuckDB allows one writer process at a time: every asset that writes warehouse.duckdb (the
# ingest tables, the lake views) is in this Dagster concurrency pool, which the instance
# (pipelines/dagster.yaml) limits to one step across all runs; the warehouse's file lock stays as
# the guard for writers outside Dagster.
DUCKDB_POOL = "duckdb_writer"


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
    """Which connector feeds each raw table, and its options. Synthetic is the default.

    Each connector takes the options it knows (see README "Use real data") and ignores the rest.
    """

    ohlcv_source: str = Field(default="synthetic", description="synthetic | file | ccxt | yfinance")
    symbols: list[str] = Field(default_factory=lambda: list(SYMBOLS))
    timeframe: str = Field(
        default="",
        description="Bar size fetched: 1d, 1h or 1m; empty: the source's default "
        "(1d, or what a file holds)",
    )
    exchange: str = Field(default="binance", description="ccxt exchange id")
    ohlcv_path: str = Field(default="", description="CSV/Parquet file for ohlcv_source=file")
    auto_adjust: bool = Field(default=True, description="yfinance: split/dividend-adjusted prices")
    onchain_source: str = Field(
        default="synthetic", description="synthetic | coinmetrics | coinmetrics_csv"
    )
    onchain_assets: list[str] = Field(default_factory=lambda: list(ONCHAIN_ASSETS))
    onchain_path: str = Field(default="", description="CSV for onchain_source=coinmetrics_csv")
    macro_source: str = Field(default="synthetic", description="synthetic | fred | fred_file")
    macro_series: list[str] = Field(default_factory=lambda: list(MACRO_SERIES))
    fred_mode: str = Field(default="auto", description="fred: auto | api | csv (keyless)")
    fred_api_key: str | None = Field(
        default=None,
        description="Set from EnvVar FRED_API_KEY only (the UI and the run's records then show "
        "the variable's name, never the key)",
    )
    fred_api_root: str = Field(
        default="", description="fred: the API's root URL; empty: FRED's (a local server in tests)"
    )
    macro_path: str = Field(default="", description="CSV for macro_source=fred_file")
    seed: int = Field(default=42, ge=0, description="Seed of the synthetic market")
    synthetic_planted_signal: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Strength of the synthetic market's planted signal (0 = off, 1 = the "
        "documented strength): a known driver published in on-chain tx_count that moves BTC-USD "
        "forward returns and volatility (docs/FEATURES_AND_LABELS.md)",
    )

    until: str = Field(
        default="",
        description="Ingest only rows before this day (YYYY-MM-DD, exclusive), to replay history "
        "as of a date or leave out a file's incomplete last day; empty: today 00:00 UTC, so only "
        "complete days are stored",
    )

    def cutoff(self) -> datetime:
        """The exclusive end of every ingest window: `until`, or today 00:00 UTC."""
        today = datetime.combine(datetime.now(UTC).date(), datetime.min.time())
        if not self.until:
            return today
        try:
            day = date.fromisoformat(self.until)
        except ValueError:
            raise ValueError(
                f"sources.until={self.until!r} is not a date: use YYYY-MM-DD, or leave it empty "
                "for today"
            ) from None
        return min(today, datetime.combine(day, datetime.min.time()))

    def source(self, table: str) -> Source:
        """The configured connector for `table`; raises SourceError on unknown names or options."""
        name, options = {
            "ohlcv": (
                self.ohlcv_source,
                {
                    "symbols": tuple(self.symbols),
                    "timeframe": self.timeframe,
                    "seed": self.seed,
                    "planted": self.synthetic_planted_signal,
                    "exchange": self.exchange,
                    "path": self.ohlcv_path,
                    "auto_adjust": self.auto_adjust,
                },
            ),
            "onchain": (
                self.onchain_source,
                {
                    "assets": tuple(self.onchain_assets),
                    "seed": self.seed,
                    "planted": self.synthetic_planted_signal,
                    "path": self.onchain_path,
                },
            ),
            "macro": (
                self.macro_source,
                {
                    "series": tuple(self.macro_series),
                    "seed": self.seed,
                    "planted": self.synthetic_planted_signal,
                    "mode": self.fred_mode,
                    "api_key": self.fred_api_key,
                    "api_root": self.fred_api_root,
                    "path": self.macro_path,
                },
            ),
        }[table]
        options = {k: v for k, v in options.items() if v != ""}  # unset: the source's default
        source = make_source(table, name, **accepted_options(table, name, options))
        # The names every row is stored under (file connectors read theirs from the file):
        # safe as DuckDB values and lake partition folders, whatever the connector checked.
        check_safe_entities(source.entities, source=name, what=f"{table} entities")
        return source

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Fail at the start of the run, before any step writes, if the configuration is invalid.
        self.cutoff()
        for table in ("ohlcv", "onchain", "macro"):
            self.source(table)
