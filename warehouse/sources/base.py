"""The connector contract and the registry that maps (table, source name) to a connector."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import polars as pl


class SourceError(ValueError):
    """A source name, symbol or option is not valid; raised before anything is fetched or written."""


class SourceFetchError(RuntimeError):
    """Fetching failed (network, HTTP status, malformed or truncated payload); nothing was written.

    The message names the source and the range that was being fetched.
    """


class Source(Protocol):
    name: str  # the source's registry name, e.g. "synthetic"
    # OHLCV sources also have `timeframe`: "1d", "1h" or "1m" (bars keyed by their UTC open time)
    table: str  # the warehouse table it feeds: "ohlcv", "onchain" or "macro"
    entities: tuple[str, ...]  # the symbols / assets / series it returns

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Rows with time in [start, end), in the table's declared schema."""
        ...


BUILTIN_MODULES = ("synthetic", "files")

_REGISTRY: dict[str, dict[str, Callable[..., Source]]] = {"ohlcv": {}, "onchain": {}, "macro": {}}


def register(table: str, name: str) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    def deco(factory: Callable[..., Source]) -> Callable[..., Source]:
        _REGISTRY[table][name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:  # importing a connector module registers it
        importlib.import_module(f"warehouse.sources.{module}")


def registered_sources(table: str) -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY[table])


def make_source(table: str, name: str, **options: Any) -> Source:
    """Build the connector `name` for `table`, validating its options (symbols, seed, ...)."""
    _load_builtins()
    if table not in _REGISTRY:
        raise SourceError(f"Unknown table {table!r}; sources exist for {sorted(_REGISTRY)}")
    factory = _REGISTRY[table].get(name)
    if factory is None:
        raise SourceError(
            f"Unknown {table} source {name!r}; available: {registered_sources(table)}"
        )
    return factory(**options)


def accepted_options(table: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of `options` that source `name` takes (each connector ignores the others')."""
    _load_builtins()
    factory = _REGISTRY.get(table, {}).get(name)
    if factory is None:
        return options  # make_source will name the unknown source
    params = inspect.signature(factory).parameters
    return {k: v for k, v in options.items() if k in params}
