"""Resources: where the data lives, and which source feeds each ingest asset."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.lake import PARTITION_VALUE
from warehouse.sources import Source, make_source
from warehouse.sources.base import SourceError, accepted_options, check_safe_entities
from warehouse.sources.fred import API_ROOT as FRED_API_ROOT
from warehouse.sources.fred import KEY_ENV as FRED_KEY_ENV
from warehouse.sources.synthetic import MACRO_SERIES, ONCHAIN_ASSETS, SYMBOLS

# DuckDB allows one writer process at a time: every asset that writes warehouse.duckdb (the
# ingest tables, the lake views) is in this Dagster concurrency pool, which the instance
# (pipelines/dagster.yaml) limits to one step across all runs; the warehouse's file lock stays as
# the guard for writers outside Dagster.
DUCKDB_POOL = "duckdb_writer"

# Set to 1 (tests do) to let a source's API root be a server on this machine (plain http too).
ALLOW_LOOPBACK_ENV = "MAMBACAST_ALLOW_LOOPBACK_SOURCES"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_api_root(field: str, value: str, official: str) -> None:
    """Raise SourceError unless `value` is empty, `official` (the API's own https root), or,
    with MAMBACAST_ALLOW_LOOPBACK_SOURCES=1, a root on a loopback host (http allowed).

    The root is ordinary run config and the API key is sent to it: anyone who can launch a
    run could otherwise point it at their own server and receive the key.
    """
    if value == "" or value.rstrip("/") == official:
        return
    loopback_ok = os.environ.get(ALLOW_LOOPBACK_ENV) == "1"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError:
        parts = None
    is_loopback = (
        parts is not None
        and parts.scheme in ("http", "https")
        and parts.hostname in _LOOPBACK_HOSTS
        and parts.username is None
        and parts.password is None
    )
    if is_loopback and loopback_ok:
        return
    hint = (
        f" (a loopback root is allowed only with {ALLOW_LOOPBACK_ENV}=1 in the environment)"
        if is_loopback
        else ""
    )
    raise SourceError(
        f"sources.{field}={value!r} is refused{hint}: the API key is sent to this URL. Leave "
        f"{field} empty (or set it to {official!r}); only a test against a local server "
        f"(http://127.0.0.1, localhost or [::1]) may set another root, with "
        f"{ALLOW_LOOPBACK_ENV}=1."
    )


def _run_config_literals(context: dg.InitResourceContext | None, field: str) -> bool:
    """Whether the run's own config sets `field` of any resource to a literal string."""
    run = getattr(context, "dagster_run", None) if context is not None else None
    resources = (getattr(run, "run_config", None) or {}).get("resources") or {}
    return any(
        isinstance(entry, dict)
        and isinstance(entry.get("config"), dict)
        and isinstance(entry["config"].get(field), str)
        for entry in resources.values()
    )


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
        default="",
        description="fred: the API's root URL; empty or https://api.stlouisfed.org/fred: FRED's. "
        "Anything else is refused (the key is sent there), except a loopback server when "
        "MAMBACAST_ALLOW_LOOPBACK_SOURCES=1 (tests)",
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

    def _fred_key(self) -> str | None:
        """The FRED key, after checking it came from the FRED_API_KEY environment variable.

        A literal key in run config or code would be stored in the run's records; only the
        reference `{"env": "FRED_API_KEY"}` (dg.EnvVar) keeps it out. Raises SourceError.
        """
        key: Any = self.fred_api_key
        if key is None or key == "":
            return None
        if isinstance(key, dg.EnvVar) and key.env_var_name == FRED_KEY_ENV:
            return key.get_value()  # the reference itself, not resolved yet (outside a run)
        if isinstance(key, dg.EnvVar) or key != os.environ.get(FRED_KEY_ENV):
            raise SourceError(
                "sources.fred_api_key is set to a literal value, which would be stored in the "
                f"run's records: set it from the environment variable instead, as "
                f'{{"env": "{FRED_KEY_ENV}"}} in run config (dg.EnvVar("{FRED_KEY_ENV}") in '
                f"code), with {FRED_KEY_ENV} exported; or leave it unset."
            )
        return key

    def check_config(self) -> None:
        """Raise SourceError when an option could send the key elsewhere or store it."""
        self._fred_key()
        check_api_root("fred_api_root", self.fred_api_root, FRED_API_ROOT)

    def source(self, table: str) -> Source:
        """The configured connector for `table`; raises SourceError on unknown names or options."""
        self.check_config()
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
                    "api_key": self._fred_key(),
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
        # Requests may use a wider alphabet (BTC/USDT, EURUSD=X), but what is stored must also
        # be a lake partition value, or the features step fails after the ingest was written.
        unstorable = [e for e in source.entities if not PARTITION_VALUE.fullmatch(e)]
        if unstorable:
            raise SourceError(
                f"{table} entities {unstorable} from source {name!r} cannot be stored: the lake "
                "names a folder after each one and allows only letters, digits and . _ ^ -. "
                "Rename them in the symbols option or the file's symbol column (e.g. 'BTC-USDT' "
                "for 'BTC/USDT', 'EURUSD' for 'EURUSD=X'); ccxt maps its pairs itself."
            )
        return source

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Fail at the start of the run, before any step writes, if the configuration is invalid.
        if self.fred_api_key is not None and _run_config_literals(context, "fred_api_key"):
            raise SourceError(
                "sources.fred_api_key is a literal string in the run config, which stores the "
                f'key in the run\'s records: use {{"env": "{FRED_KEY_ENV}"}} instead, with '
                f"{FRED_KEY_ENV} exported."
            )
        self.cutoff()
        for table in ("ohlcv", "onchain", "macro"):
            self.source(table)
