"""The connector contract and the registry that maps (table, source name) to a connector."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, Protocol

import polars as pl


class SourceError(ValueError):
    """A source name, symbol or option is not valid; raised before anything is fetched or written."""


class SourceFetchError(RuntimeError):
    """Fetching failed (network, HTTP status, malformed or truncated payload); nothing was written.

    The message names the source and the range that was being fetched.
    """


def utc_now() -> datetime:
    """The current time as a naive UTC datetime, the convention of every table."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(ts: datetime) -> datetime:
    """`ts` in naive UTC (aware datetimes are converted, naive ones taken as UTC)."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def empty_frame(table: str) -> pl.DataFrame:
    """A frame with no rows in `table`'s declared schema."""
    from warehouse.schema import table_spec

    return pl.DataFrame(schema=table_spec(table).columns)


def day_window(start: datetime, end: datetime, source: str) -> tuple[date, date]:
    """The UTC days [first, stop) that the window [start, end) selects."""
    if start >= end:
        raise SourceError(
            f"{source}: empty or inverted window: start {start} is not before end {end}"
        )
    return start.date(), end.date()


class Source(Protocol):
    name: str  # the source's registry name, e.g. "synthetic"
    # OHLCV sources also have `timeframe`: "1d", "1h" or "1m" (bars keyed by their UTC open time)
    table: str  # the warehouse table it feeds: "ohlcv", "onchain" or "macro"
    entities: tuple[str, ...]  # the symbols / assets / series it returns

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Rows with time in [start, end), in the table's declared schema."""
        ...


# Built-in connectors by (table, name) -> the module that registers them. A module is imported
# only when its source is asked for: ccxt, yfinance and fredapi take seconds to import.
BUILTIN_SOURCES = {
    ("ohlcv", "synthetic"): "synthetic",
    ("ohlcv", "file"): "files",
    ("ohlcv", "ccxt"): "exchange",
    ("ohlcv", "yfinance"): "yahoo",
    ("onchain", "synthetic"): "synthetic",
    ("onchain", "coinmetrics"): "coinmetrics",
    ("onchain", "coinmetrics_csv"): "coinmetrics",
    ("macro", "synthetic"): "synthetic",
    ("macro", "fred"): "fred",
    ("macro", "fred_file"): "fred",
}

_REGISTRY: dict[str, dict[str, Callable[..., Source]]] = {"ohlcv": {}, "onchain": {}, "macro": {}}


def register(table: str, name: str) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    def deco(factory: Callable[..., Source]) -> Callable[..., Source]:
        _REGISTRY[table][name] = factory
        return factory

    return deco


def _factory(table: str, name: str) -> Callable[..., Source] | None:
    if name not in _REGISTRY.get(table, {}) and (table, name) in BUILTIN_SOURCES:
        importlib.import_module(f"warehouse.sources.{BUILTIN_SOURCES[table, name]}")
    return _REGISTRY.get(table, {}).get(name)


def registered_sources(table: str) -> list[str]:
    builtin = {n for t, n in BUILTIN_SOURCES if t == table}
    return sorted(builtin | set(_REGISTRY.get(table, {})))


def make_source(table: str, name: str, **options: Any) -> Source:
    """Build the connector `name` for `table`, validating its options (symbols, seed, ...)."""
    if table not in _REGISTRY:
        raise SourceError(f"Unknown table {table!r}; sources exist for {sorted(_REGISTRY)}")
    factory = _factory(table, name)
    if factory is None:
        raise SourceError(
            f"Unknown {table} source {name!r}; available: {registered_sources(table)}"
        )
    return factory(**options)


def accepted_options(table: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of `options` that source `name` takes (each connector ignores the others')."""
    factory = _factory(table, name)
    if factory is None:
        return options  # make_source will name the unknown source
    params = inspect.signature(factory).parameters
    return {k: v for k, v in options.items() if k in params}
