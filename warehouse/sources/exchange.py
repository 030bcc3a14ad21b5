"""OHLCV bars from a crypto exchange through ccxt's unified REST API.

One connector serves every exchange ccxt supports; Binance is the default. Bars are paged with
`fetch_ohlcv(symbol, timeframe, since, limit)`, each page retried on rate limits and outages,
validated row by row, and cut to closed bars inside the requested window.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import ccxt
import polars as pl

from warehouse.sources.base import (
    SourceError,
    SourceFetchError,
    check_entities,
    check_timeframe,
    fetch_each_symbol,
    naive_utc,
    register,
)
from warehouse.sources.retry import RetryableError, RetryPolicy, with_retries

TIMEFRAMES: dict[str, timedelta] = {
    "1d": timedelta(days=1),
    "1h": timedelta(hours=1),
    "1m": timedelta(minutes=1),
}

# NetworkError is the parent of the other four; they are listed so the intent is explicit.
_TRANSIENT: tuple[type[Exception], ...] = (
    ccxt.RateLimitExceeded,
    ccxt.DDoSProtection,
    ccxt.RequestTimeout,
    ccxt.ExchangeNotAvailable,
    ccxt.NetworkError,
)
# What a garbled payload makes ccxt's parsers raise before our own row checks can run.
_PARSE_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    ccxt.BadResponse,
)


def warehouse_symbol(symbol: str) -> str:
    """The warehouse's name for a ccxt unified symbol: "BTC/USDT" -> "BTC-USDT".

    Derivative suffixes map the same way ("BTC/USDT:USDT" -> "BTC-USDT-USDT").
    """
    return symbol.replace("/", "-").replace(":", "-")


def _epoch_ms(ts: datetime) -> int:
    return int(naive_utc(ts).replace(tzinfo=UTC).timestamp() * 1000)


@register("ohlcv", "ccxt")
@dataclass
class CcxtOHLCV:
    """Closed OHLCV bars of `symbols` (ccxt unified, e.g. "BTC/USDT") from one exchange.

    Options: `exchange` is a ccxt exchange id (see `ccxt.exchanges`), `timeframe` one of
    "1d", "1h", "1m", `page_limit` the bars asked for per request, `retry` the backoff for rate
    limits and outages. `now` and `sleep` are injectable for tests. ccxt's own rate limiter
    (enableRateLimit) spaces the requests.
    """

    exchange: str = "binance"
    symbols: tuple[str, ...] = ("BTC/USDT",)
    timeframe: str = "1d"
    page_limit: int = 1000
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    now: Callable[[], datetime] | None = None
    sleep: Callable[[float], None] = time.sleep
    name: str = "ccxt"
    table: str = "ohlcv"
    client: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.exchange not in ccxt.exchanges:
            close = difflib.get_close_matches(str(self.exchange), ccxt.exchanges, n=5)
            hint = f"did you mean {close}? " if close else ""
            raise SourceError(
                f"Unknown ccxt exchange {self.exchange!r}; {hint}valid ids include "
                f"{ccxt.exchanges[:8]} ... ({len(ccxt.exchanges)} in all, listed in "
                "ccxt.exchanges). Set the source option exchange=<id>, e.g. exchange='binance'."
            )
        check_timeframe(self.timeframe, TIMEFRAMES, "ccxt")
        self.symbols = check_entities(
            self.symbols,
            source="ccxt",
            hint="pass ccxt unified symbols such as symbols=('BTC/USDT',)",
            valid=_is_unified_symbol,
            invalid=lambda bad: (
                f"Symbols {bad} are not ccxt unified symbols; write them as BASE/QUOTE "
                "(e.g. 'BTC/USDT', or 'BTC/USDT:USDT' for a perpetual)"
            ),
        )
        mapped = [warehouse_symbol(s) for s in self.symbols]
        if len(set(mapped)) != len(mapped):
            raise SourceError(
                f"Symbols {list(self.symbols)} collide once mapped to warehouse names {mapped}"
            )
        if not isinstance(self.page_limit, int) or self.page_limit < 1:
            raise SourceError(f"page_limit must be a positive integer, got {self.page_limit!r}")

        # Building the client is offline; markets are loaded on the first fetch.
        self.client = getattr(ccxt, self.exchange)({"enableRateLimit": True})
        if not self.client.has.get("fetchOHLCV"):
            raise SourceError(
                f"ccxt exchange {self.exchange!r} has no OHLCV endpoint; pick another exchange"
            )
        native = getattr(self.client, "timeframes", None) or {}
        if native and self.timeframe not in native:
            raise SourceError(
                f"Exchange {self.exchange!r} has no {self.timeframe!r} bars; "
                f"it offers {sorted(native)}"
            )

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(warehouse_symbol(s) for s in self.symbols)

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Closed bars with open time in [start, end) for every symbol, in the OHLCV schema.

        start and end are naive UTC. A bar is kept only once closed (open time + timeframe <= now).
        Raises SourceFetchError naming the exchange, symbol, timeframe and range when a request
        keeps failing, the exchange rejects the request, or a payload is malformed.
        """
        return fetch_each_symbol(self.symbols, start, end, "ccxt", self.now, self._fetch_symbol)

    # -- internals -----------------------------------------------------------------------------
    def _describe(self, symbol: str, start: datetime, end: datetime) -> str:
        return f"{self.exchange} {symbol} {self.timeframe} bars in [{start}, {end})"

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one exchange request with retries; map ccxt's errors onto the source errors."""

        def attempt() -> Any:
            try:
                return call()
            except _TRANSIENT as exc:
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc

        try:
            return with_retries(
                attempt, source=self.name, what=what, policy=self.retry, sleep=self.sleep
            )
        except SourceFetchError:
            raise
        except ccxt.BadSymbol as exc:
            raise SourceFetchError(f"{self.name}: fetching {what} failed: {exc}") from exc
        except ccxt.BaseError as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: the exchange rejected the request "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        except _PARSE_ERRORS as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: malformed response "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def _fetch_symbol(
        self, symbol: str, start: datetime, end: datetime, now: datetime
    ) -> pl.DataFrame:
        what = self._describe(symbol, start, end)
        self._call(f"the {self.exchange} market list (for {what})", self.client.load_markets)
        if symbol not in self.client.markets:
            close = difflib.get_close_matches(symbol, list(self.client.markets), n=5)
            hint = f"; similar listed symbols: {close}" if close else ""
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: symbol {symbol!r} is not listed on "
                f"{self.exchange}{hint}. Fix the symbols option or choose another exchange."
            )

        step_ms = int(TIMEFRAMES[self.timeframe].total_seconds() * 1000)
        start_ms, end_ms, now_ms = _epoch_ms(start), _epoch_ms(end), _epoch_ms(now)
        # Only bars with open + step <= now are closed; later ones need not be asked for.
        last_closed_open_ms = now_ms - step_ms
        rows: list[list[float]] = []
        since = start_ms
        while since < end_ms and since <= last_closed_open_ms:
            page = self._call(
                f"{what} (page from {_from_ms(since)})",
                lambda since=since: self.client.fetch_ohlcv(
                    symbol, self.timeframe, since=since, limit=self.page_limit
                ),
            )
            if not page:
                break
            parsed = [_check_row(row, what, i) for i, row in enumerate(page)]
            rows.extend(parsed)
            last_open = max(r[0] for r in parsed)
            if last_open < since:
                # Some exchanges ignore `since` past their history and repeat the tail.
                break
            since = int(last_open) + step_ms

        frame = pl.DataFrame(
            rows,
            schema={
                "ts_ms": pl.Int64,
                "open": pl.Float64,
                "high": pl.Float64,
                "low": pl.Float64,
                "close": pl.Float64,
                "volume": pl.Float64,
            },
            orient="row",
        )
        return (
            frame.filter(
                (pl.col("ts_ms") >= start_ms)
                & (pl.col("ts_ms") < end_ms)
                & (pl.col("ts_ms") + step_ms <= now_ms)
            )
            # Later pages are fresher, so a bar seen twice keeps its last version.
            .unique(subset="ts_ms", keep="last", maintain_order=True)
            .sort("ts_ms")
            .select(
                pl.lit(warehouse_symbol(symbol), dtype=pl.String).alias("symbol"),
                pl.from_epoch("ts_ms", time_unit="ms").cast(pl.Datetime("us")).alias("ts"),
                "open",
                "high",
                "low",
                "close",
                "volume",
            )
        )


def _is_unified_symbol(symbol: object) -> bool:
    if not isinstance(symbol, str) or "/" not in symbol:
        return False
    base, _, quote = symbol.partition("/")
    return bool(base) and bool(quote.partition(":")[0]) and " " not in symbol


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


# 10000-01-01 UTC: a later "time" is no epoch in milliseconds (and may not fit the Int64 column)
_MAX_EPOCH_MS = 253_402_300_800_000


def _check_row(row: object, what: str, index: int) -> list[float]:
    """One parsed candle as [open_ms, open, high, low, close, volume], or SourceFetchError."""

    def bad(reason: str) -> SourceFetchError:
        return SourceFetchError(
            f"ccxt: fetching {what} failed: malformed candle #{index} {row!r}: {reason}"
        )

    if not isinstance(row, list | tuple) or len(row) != 6:
        raise bad("expected 6 fields [time, open, high, low, close, volume]")
    values: list[float] = []
    for name, value in zip(("time", "open", "high", "low", "close", "volume"), row, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"{name} is missing or not a number")
        if not math.isfinite(value):
            raise bad(f"{name} is not finite")
        values.append(value)
    ts, open_, high, low, close, volume = values
    if ts != int(ts) or not 0 <= ts < _MAX_EPOCH_MS:
        raise bad("time is not an epoch in milliseconds between 1970 and 9999")
    if min(open_, high, low, close) <= 0:
        raise bad("prices must be positive")
    if volume < 0:
        raise bad("volume must not be negative")
    return [int(ts), open_, high, low, close, volume]
