"""Declared schemas and keys of the warehouse tables (the raw ones and the forecasts), and
validation at the source boundary."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


class SchemaError(ValueError):
    """A frame does not match the declared schema of the table it is meant for."""


@dataclass(frozen=True)
class TableSpec:
    """A raw warehouse table: ordered columns with polars and DuckDB types, a key, a time column."""

    name: str
    columns: dict[str, pl.DataType]
    key: tuple[str, ...]
    time_column: str
    entity_column: str

    def duckdb_ddl(self) -> str:
        # Keys are NOT NULL but carry no index: a primary-key index makes bulk replaces of
        # millions of minute bars ~10x slower. Uniqueness holds by construction (conform()
        # rejects duplicate keys, replace_window() deletes the window before inserting) and is
        # verified by the quality checks.
        cols = ",\n  ".join(
            f"{c} {duckdb_type(t)}" + (" NOT NULL" if c in self.key else "")
            for c, t in self.columns.items()
        )
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols}\n)"


_DUCKDB_TYPES = {
    pl.String: "VARCHAR",
    pl.Datetime: "TIMESTAMP",
    pl.Date: "DATE",
    pl.Float64: "DOUBLE",
    pl.Int64: "BIGINT",
    pl.Int32: "INTEGER",
    pl.Int8: "TINYINT",
    pl.Boolean: "BOOLEAN",
}


def duckdb_type(dtype: pl.DataType) -> str:
    """The DuckDB type a polars column is stored (or read through a lake view) as."""
    try:
        return _DUCKDB_TYPES[type(dtype)]
    except KeyError:
        raise SchemaError(
            f"No DuckDB type declared for polars {dtype}: add it to warehouse.schema"
        ) from None


# Bars are keyed by their open time, naive UTC; a daily bar at 2024-01-05 covers that UTC day.
OHLCV = TableSpec(
    name="ohlcv",
    columns={
        "symbol": pl.String(),
        "ts": pl.Datetime("us"),
        "open": pl.Float64(),
        "high": pl.Float64(),
        "low": pl.Float64(),
        "close": pl.Float64(),
        "volume": pl.Float64(),
    },
    key=("symbol", "ts"),
    time_column="ts",
    entity_column="symbol",
)

OHLCV_1H = TableSpec("ohlcv_1h", OHLCV.columns, OHLCV.key, "ts", "symbol")
OHLCV_1M = TableSpec("ohlcv_1m", OHLCV.columns, OHLCV.key, "ts", "symbol")

# Bar tables by timeframe; a finer table is resampled into every coarser one on write.
OHLCV_TABLES = {"1m": "ohlcv_1m", "1h": "ohlcv_1h", "1d": "ohlcv"}
TIMEFRAME_BUCKET = {"1m": "1 minute", "1h": "1 hour", "1d": "1 day"}


def ohlcv_table(timeframe: str) -> str:
    try:
        return OHLCV_TABLES[timeframe]
    except KeyError:
        raise SchemaError(
            f"Unknown bar timeframe {timeframe!r}; use one of {list(OHLCV_TABLES)}"
        ) from None


def coarser_timeframes(timeframe: str) -> list[str]:
    """Timeframes that bars of `timeframe` are resampled into: 1m -> 1h, 1d; 1h -> 1d."""
    order = list(OHLCV_TABLES)
    return order[order.index(timeframe) + 1 :] if timeframe in order else []


ONCHAIN = TableSpec(
    name="onchain",
    columns={
        "asset": pl.String(),
        "date": pl.Date(),
        "tx_count": pl.Float64(),
        "active_addresses": pl.Float64(),
        "fees_native": pl.Float64(),
        "hash_rate": pl.Float64(),
        "difficulty": pl.Float64(),
        "utxo_count": pl.Float64(),
    },
    key=("asset", "date"),
    time_column="date",
    entity_column="asset",
)

# `published` is the date a value became public; feature joins use it, never `date`.
MACRO = TableSpec(
    name="macro",
    columns={
        "series": pl.String(),
        "date": pl.Date(),
        "value": pl.Float64(),
        "published": pl.Date(),
    },
    key=("series", "date"),
    time_column="date",
    entity_column="series",
)

# The forecasts of `latest_forecast`: one row per (symbol, as-of bar, model version), written
# by Warehouse.upsert, so a re-run for the same bar replaces its row. `as_of` is the open time of
# the newest bar the forecast saw; the horizons count bars after it. Return columns the label
# configuration leaves out are null.
FORECASTS = TableSpec(
    name="forecasts",
    columns={
        "symbol": pl.String(),
        "as_of": pl.Datetime("us"),
        "model_version": pl.String(),
        "model": pl.String(),
        "fold": pl.String(),
        "p_down": pl.Float64(),
        "p_flat": pl.Float64(),
        "p_up": pl.Float64(),
        "q10": pl.Float64(),
        "q90": pl.Float64(),
        "sigma": pl.Float64(),
        "ret_1": pl.Float64(),
        "ret_5": pl.Float64(),
        "ret_10": pl.Float64(),
        "ret_30": pl.Float64(),
        "direction_horizon": pl.Int64(),
        "sigma_window": pl.Int64(),
        "created_at": pl.Datetime("us"),
    },
    key=("symbol", "as_of", "model_version"),
    time_column="as_of",
    entity_column="symbol",
)

RAW_TABLES: dict[str, TableSpec] = {t.name: t for t in (OHLCV, OHLCV_1H, OHLCV_1M, ONCHAIN, MACRO)}
# every table the warehouse creates: the raw ones and the derived forecasts
TABLES: dict[str, TableSpec] = {**RAW_TABLES, FORECASTS.name: FORECASTS}


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(
            f"Unknown warehouse table {name!r}; known tables: {sorted(TABLES)}"
        ) from None


def conform(df: pl.DataFrame, spec: TableSpec, source: str) -> pl.DataFrame:
    """Check `df` against `spec` and return it with the declared column order and types.

    Raises SchemaError naming the source, the table and the problem: missing or extra columns,
    values that do not cast to the declared type, null keys, duplicate keys.
    """
    where = f"source {source!r} -> table {spec.name!r}"
    missing = [c for c in spec.columns if c not in df.columns]
    extra = [c for c in df.columns if c not in spec.columns]
    if missing or extra:
        raise SchemaError(
            f"{where}: columns do not match the declared schema "
            f"(missing {missing}, unexpected {extra}); expected {list(spec.columns)}"
        )
    try:
        out = df.select([pl.col(c).cast(t, strict=True) for c, t in spec.columns.items()])
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as exc:
        raise SchemaError(f"{where}: a column does not cast to its declared type: {exc}") from exc
    null_keys = out.select([pl.col(k).null_count().alias(k) for k in spec.key]).row(0, named=True)
    bad = {k: n for k, n in null_keys.items() if n}
    if bad:
        raise SchemaError(
            f"{where}: null values in key columns {bad}; every row needs {list(spec.key)}"
        )
    is_dup = pl.struct(list(spec.key)).is_duplicated()
    if out.select(is_dup.any()).item():
        dup = out.filter(is_dup).select(spec.key).unique()
        raise SchemaError(
            f"{where}: {dup.height} duplicate keys {list(spec.key)}, e.g. {dup.head(3).to_dicts()}"
        )
    numeric = [c for c, t in spec.columns.items() if t == pl.Float64()]
    nonfinite = out.select([(~pl.col(c).is_finite()).sum().alias(c) for c in numeric])
    nonfinite = {c: n for c, n in nonfinite.row(0, named=True).items() if n}
    if nonfinite:
        raise SchemaError(
            f"{where}: infinite or NaN values in {nonfinite}; drop or repair those rows "
            "at the source (missing values must be null)"
        )
    return out
