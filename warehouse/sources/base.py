"""The connector contract and the registry that maps (table, source name) to a connector."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Collection, Iterable
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


def in_days(first: date, stop: date, col: str = "date") -> pl.Expr:
    """Rows whose date column `col` falls in the days [first, stop) that day_window returned."""
    return (pl.col(col) >= first) & (pl.col(col) < stop)


# What any symbol / asset / series id may look like, whatever the connector: letters, digits and
# `. _ ^ = -` (BTC-USD, ^GSPC, EURUSD=X, BRK.B), `/` and `:` between parts (ccxt's BTC/USDT:USDT),
# starting with a letter, a digit or `^`, at most 64 characters, and no `..`, `//`, `/.` or a
# trailing `/`. Names become DuckDB values, Parquet partition folders (`symbol=<name>`) and URL
# parameters: nothing in them can climb out of a folder (`../x`, `a/../../b`), name an absolute
# path (`/tmp/x`), or carry a quote, a space, a NUL or a control character.
SAFE_ENTITY = re.compile(r"[A-Za-z0-9^][A-Za-z0-9._^=:/-]{0,63}")
SAFE_ENTITY_RULE = (
    "letters, digits and . _ ^ = - (and / : between the parts of an exchange pair such as "
    "BTC/USDT), starting with a letter, a digit or ^, at most 64 characters, without '..'"
)


def is_safe_entity(name: object) -> bool:
    """Whether `name` can be stored and used in paths and requests as it is (SAFE_ENTITY)."""
    return (
        isinstance(name, str)
        and SAFE_ENTITY.fullmatch(name) is not None
        and ".." not in name
        and "//" not in name
        and "/." not in name
        and not name.endswith("/")
    )


def check_safe_entities(names: Iterable[Any], *, source: str, what: str = "symbols") -> None:
    """Raise SourceError naming every entry of `names` that is not a safe entity name."""
    unsafe = [n for n in names if not is_safe_entity(n)]
    if unsafe:
        raise SourceError(
            f"Unsafe {what} {unsafe} for source {source!r}: a name may only hold "
            f"{SAFE_ENTITY_RULE}, so that it cannot become a path outside the data directory "
            f"or break a query. Fix the {what} option (e.g. 'BTC-USD', '^GSPC', 'BTC/USDT')."
        )


def check_entities(
    given: str | Iterable[Any],
    *,
    source: str,
    what: str = "symbols",
    hint: str,
    valid: Callable[[Any], bool],
    invalid: Callable[[list[Any]], str],
    normalize: Callable[[Any], str] | None = None,
) -> tuple[str, ...]:
    """The symbols / assets / series a connector was given, as a tuple, checked up front.

    Every connector validates its entity list the same way, so a bad option fails before
    anything is fetched, with a message that names the input and the fix. A lone string counts
    as one entity. Raises SourceError when the list is empty (`hint` says what to pass), when
    entries fail `valid` (`invalid` words the message from those entries, as given), or when
    two entries are the same once `normalize`d (e.g. upper-cased; the result is normalized).
    Entries the connector accepts must also be safe names (`check_safe_entities`), whatever
    `valid` says: no path separators that climb out (`../x`), absolute paths, quotes or NULs.
    """
    names = (given,) if isinstance(given, str) else tuple(given)
    if not names:
        raise SourceError(f"No {what} given for source {source!r}; {hint}")
    bad = [n for n in names if not valid(n)]
    if bad:
        raise SourceError(invalid(bad))
    check_safe_entities(names, source=source, what=what)
    out = tuple(normalize(n) for n in names) if normalize else names
    if len(set(out)) != len(out):
        raise SourceError(f"Duplicate {what} in {list(names)} for source {source!r}")
    return out


def check_timeframe(timeframe: str, supported: Collection[str], source: str) -> None:
    """Fail before anything is fetched when `timeframe` is not one of the `supported` ones."""
    if timeframe not in supported:
        raise SourceError(
            f"Unsupported timeframe {timeframe!r} for source {source!r}; "
            f"use one of {list(supported)}"
        )


def fetch_each_symbol(
    symbols: Iterable[str],
    start: datetime,
    end: datetime,
    source: str,
    now: Callable[[], datetime] | None,
    fetch_symbol: Callable[[str, datetime, datetime, datetime], pl.DataFrame],
) -> pl.DataFrame:
    """OHLCV bars of every symbol in [start, end): one `fetch_symbol` call per symbol, stacked.

    The window and the clock (`now`, else utc_now) become naive UTC first, so every symbol is
    fetched with the same "now" when deciding which bars have closed. An empty window returns
    no rows without calling the source; an inverted one raises SourceError.
    """
    start, end = naive_utc(start), naive_utc(end)
    if start > end:
        raise SourceError(
            f"Inverted window for source {source!r}: start {start} is after end {end}"
        )
    if start == end:
        return empty_frame("ohlcv")
    current = naive_utc((now or utc_now)())
    frames = [fetch_symbol(symbol, start, end, current) for symbol in symbols]
    return pl.concat(frames, how="vertical") if frames else empty_frame("ohlcv")


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
