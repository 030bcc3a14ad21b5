"""OHLCV bars of stocks, ETFs and indices from Yahoo Finance through yfinance.

yfinance returns a pandas frame indexed by the exchange's local time; this connector turns it
into the warehouse's OHLCV schema (naive UTC bar open times), retries transient failures, and
turns yfinance's errors into SourceFetchError messages that name the symbol and the range.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
import polars as pl
import yfinance as yf
from yfinance.data import YfData
from yfinance.exceptions import (
    YFDataException,
    YFPricesMissingError,
    YFRateLimitError,
    YFTickerMissingError,
)

from warehouse.sources.base import (
    SourceError,
    SourceFetchError,
    check_entities,
    check_timeframe,
    empty_frame,
    fetch_each_symbol,
    register,
)
from warehouse.sources.retry import RetryableError, RetryPolicy, with_retries

TIMEFRAMES: dict[str, timedelta] = {"1d": timedelta(days=1), "1h": timedelta(hours=1)}
_SYMBOL = re.compile(r"^[A-Za-z0-9._^-]+$")  # what the lake accepts as a partition value
# Names of the connection-level exceptions of requests and curl_cffi (yfinance may use either).
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutError",
    "ChunkedEncodingError",
    "RemoteDisconnected",
    "ProxyError",
    "SSLError",
    "CurlError",
}


@register("ohlcv", "yfinance")
@dataclass
class YahooOHLCV:
    """Closed OHLCV bars of Yahoo Finance `symbols` (e.g. "SPY", "^GSPC", "BRK-B").

    `timeframe` is "1d" or "1h". With `auto_adjust=True` (the default) open, high, low and close
    are split- and dividend-adjusted, so close-to-close returns are total returns; with
    `auto_adjust=False` they are the raw traded prices (splits show up as jumps, dividends as
    drops). Daily bars are keyed by the exchange-local trading date at 00:00; hourly bars by
    their UTC open time. Yahoo serves hourly bars for roughly the last 730 days only.

    `retry` is the backoff for rate limits and outages; `now`, `sleep` and `session` (a requests
    or curl_cffi Session handed to yfinance) are injectable for tests.
    """

    symbols: tuple[str, ...] = ("SPY",)
    timeframe: str = "1d"
    auto_adjust: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    now: Callable[[], datetime] | None = None
    sleep: Callable[[float], None] = time.sleep
    session: Any = field(default=None, repr=False)
    name: str = "yfinance"
    table: str = "ohlcv"

    def __post_init__(self) -> None:
        check_timeframe(self.timeframe, TIMEFRAMES, "yfinance")
        self.symbols = check_entities(
            self.symbols,
            source="yfinance",
            hint="pass Yahoo tickers such as symbols=('SPY',)",
            valid=lambda s: isinstance(s, str) and bool(_SYMBOL.match(s)),
            invalid=lambda bad: (
                f"Symbols {bad} cannot be stored: warehouse symbols may only contain letters, "
                "digits and . _ ^ - (Yahoo FX tickers such as 'EURUSD=X' are not supported)"
            ),
        )
        if not isinstance(self.auto_adjust, bool):
            raise SourceError(f"auto_adjust must be True or False, got {self.auto_adjust!r}")

    @property
    def entities(self) -> tuple[str, ...]:
        return self.symbols

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Closed bars with open time in [start, end) for every symbol, in the OHLCV schema.

        start and end are naive UTC. Rows with a missing price are dropped. Raises
        SourceFetchError naming the symbol and the range when Yahoo does not know a symbol, keeps
        failing, or answers with something that is not price data.
        """
        return fetch_each_symbol(self.symbols, start, end, "yfinance", self.now, self._fetch_symbol)

    # -- internals -----------------------------------------------------------------------------
    def _fetch_symbol(
        self, symbol: str, start: datetime, end: datetime, now: datetime
    ) -> pl.DataFrame:
        what = f"{symbol} {self.timeframe} bars in [{start}, {end})"
        req_start: date | datetime
        req_end: date | datetime
        if self.timeframe == "1d":
            # Daily bars are keyed by local trading date; ask for whole local days covering the
            # window (yfinance reads dates in the exchange's time zone) and cut afterwards.
            req_start = start.date()
            req_end = (end - timedelta(microseconds=1)).date() + timedelta(days=1)
        else:
            req_start, req_end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)

        def attempt() -> pd.DataFrame:
            return self._history(symbol, req_start, req_end)

        try:
            history = with_retries(
                attempt, source=self.name, what=what, policy=self.retry, sleep=self.sleep
            )
        except SourceFetchError:
            raise
        except _UnknownSymbol as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: Yahoo Finance does not know symbol "
                f"{symbol!r} ({exc}). Check the ticker on finance.yahoo.com (indices start "
                "with '^', share classes use '-', e.g. 'BRK-B')."
            ) from exc
        except _YahooRefused as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: Yahoo Finance answered: {exc}"
            ) from exc
        except Exception as exc:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: malformed response "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return self._to_ohlcv(history, symbol, start, end, now, what)

    def _history(self, symbol: str, start: date | datetime, end: date | datetime) -> pd.DataFrame:
        """One yfinance history() call; transient failures become RetryableError."""
        # yfinance memoizes GETs of past ranges, failed ones included; a retry must refetch.
        _forget_yfinance_responses()
        ticker = yf.Ticker(symbol, session=self.session)
        try:
            with _yfinance_raises():
                return ticker.history(
                    start=start,
                    end=end,
                    interval=self.timeframe,
                    auto_adjust=self.auto_adjust,
                    actions=False,
                    repair=False,
                    keepna=False,
                )
        except YFRateLimitError as exc:
            raise RetryableError(f"rate limited by Yahoo Finance: {exc}") from exc
        except YFPricesMissingError as exc:
            if exc.yahoo_reason is not None:
                raise _YahooRefused(exc.yahoo_reason) from exc
            # history() stored the chart's metadata before raising, so this reads no network.
            if "exchangeTimezoneName" in ticker.get_history_metadata():
                return pd.DataFrame()  # a valid chart with no bars in the window
            raise RetryableError(f"Yahoo Finance sent no chart data: {exc}") from exc
        except YFTickerMissingError as exc:
            raise _UnknownSymbol(exc.rationale) from exc
        except (json.JSONDecodeError, YFDataException) as exc:
            # An HTML error page or a cut-off body: the service is down or the link dropped.
            raise RetryableError(f"unreadable response ({type(exc).__name__}: {exc})") from exc
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(status, int):
                if status == 429 or status >= 500:
                    raise RetryableError(f"HTTP {status}: {exc}") from exc
                if status == 404:
                    # yfinance falls back to the quote summary when the chart has no time zone;
                    # a 404 there means the ticker does not exist.
                    raise _UnknownSymbol(f"HTTP 404: {exc}") from exc
                raise _YahooRefused(f"HTTP {status}: {exc}") from exc
            if isinstance(exc, OSError) or type(exc).__name__ in _NETWORK_ERRORS:
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _to_ohlcv(
        self,
        history: pd.DataFrame,
        symbol: str,
        start: datetime,
        end: datetime,
        now: datetime,
        what: str,
    ) -> pl.DataFrame:
        if history.empty:
            return empty_frame("ohlcv")
        missing = [c for c in ("Open", "High", "Low", "Close", "Volume") if c not in history]
        if missing or not isinstance(history.index, pd.DatetimeIndex):
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: malformed response "
                f"(columns {list(history.columns)}, missing {missing})"
            )
        index = history.index
        if index.tz is None:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: malformed response (bar times have no "
                "time zone)"
            )
        if self.timeframe == "1d":
            # yfinance stamps daily bars at local midnight; the date is what identifies them.
            ts = index.tz_localize(None).normalize()
        else:
            ts = index.tz_convert("UTC").tz_localize(None)
        step = TIMEFRAMES[self.timeframe]
        frame = pl.DataFrame(
            {
                "symbol": pl.Series([symbol] * len(history), dtype=pl.String),
                "ts": pl.Series(ts.as_unit("us").to_numpy()).cast(pl.Datetime("us")),
                **{
                    col.lower(): pl.Series(history[col].to_numpy(dtype=float, na_value=math.nan))
                    for col in ("Open", "High", "Low", "Close", "Volume")
                },
            }
        )
        prices = ["open", "high", "low", "close"]
        frame = frame.with_columns(pl.col(prices).fill_nan(None)).drop_nulls(prices)
        bad = frame.filter(
            pl.any_horizontal([~pl.col(c).is_finite() | (pl.col(c) <= 0) for c in prices])
            | ~pl.col("volume").is_finite()
            | (pl.col("volume") < 0)
        )
        if bad.height:
            raise SourceFetchError(
                f"{self.name}: fetching {what} failed: malformed response, {bad.height} bars "
                f"with non-positive or infinite values, e.g. {bad.head(2).to_dicts()}"
            )
        return (
            frame.with_columns(pl.col("volume").fill_nan(0.0))
            .filter((pl.col("ts") >= start) & (pl.col("ts") < end) & (pl.col("ts") + step <= now))
            .unique(subset="ts", keep="last", maintain_order=True)
            .sort("ts")
        )


class _UnknownSymbol(Exception):
    """Yahoo has no chart for this ticker."""


class _YahooRefused(Exception):
    """Yahoo answered with an explicit error for this request (e.g. a range it does not serve)."""


@contextlib.contextmanager
def _yfinance_raises() -> Iterator[None]:
    """Make yfinance raise its errors instead of logging them and returning an empty frame."""
    previous = yf.config.debug.hide_exceptions
    yf.config.debug.hide_exceptions = False
    try:
        yield
    finally:
        yf.config.debug.hide_exceptions = previous


def _forget_yfinance_responses() -> None:
    cache_clear = getattr(YfData.cache_get, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
